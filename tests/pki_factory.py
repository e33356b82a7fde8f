"""Bad client certificates for attack tests, built with cryptography's x509 builders at test time.

`leaf()` makes a client certificate that differs from a good one (auth/certs.py `issue_client`)
in exactly the ways its keyword arguments say: signed by the stack's real CA key, by another CA,
or by itself; expired or not yet valid; with the wrong EKU, CA:TRUE, other SANs. Keys are P-256.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aigis.auth.pki import PkiPaths

CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH


@dataclass(frozen=True)
class Authority:
    """A CA that can sign leaves: the stack's real one, or an attacker's."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @staticmethod
    def load(pki: PkiPaths) -> Authority:
        """The stack's real CA (certificate and private key)."""
        key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return Authority(x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()), key)

    @staticmethod
    def create(common_name: str, now: datetime, *, path_length: int | None = 0) -> Authority:
        """A fresh self-signed CA (an attacker's, or a rogue one to cross-sign)."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name(common_name)
        cert = (
            _base(name, name, key.public_key(), now - timedelta(minutes=5), now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return Authority(cert, key)


@dataclass(frozen=True)
class ClientCert:
    """A client certificate chain (leaf first) and its private key, as PEM for grpc credentials."""

    chain_pem: bytes
    key_pem: bytes
    cert: x509.Certificate


def spiffe(path: str, trust_domain: str = "aigis.local") -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(f"spiffe://{trust_domain}/{path}")


def leaf(
    signer: Authority | None,
    now: datetime,
    *,
    common_name: str = "attacker",
    sans: Sequence[x509.GeneralName] | None = None,
    eku: Sequence[x509.ObjectIdentifier] | None = (CLIENT_AUTH,),
    ca: bool = False,
    digital_signature: bool = True,
    not_before: timedelta = timedelta(minutes=-5),
    not_after: timedelta = timedelta(days=1),
    chain: Sequence[x509.Certificate] = (),
) -> ClientCert:
    """A client certificate; `signer=None` makes it self-signed.

    Defaults match a good aigis client certificate: not a CA, digitalSignature, clientAuth EKU,
    one SPIFFE URI SAN in aigis.local. `ca=True` adds keyCertSign and cRLSign to the key usage,
    `digital_signature=False` drops the one usage a TLS client key needs. `sans=[]` omits the SAN
    extension, `eku=None` the EKU one. `not_before`/`not_after` are offsets from `now`; `chain`
    certificates are sent after the leaf.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(common_name)
    issuer_name = subject if signer is None else signer.cert.subject
    builder = (
        _base(subject, issuer_name, key.public_key(), now + not_before, now + not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=ca, digital_signature=digital_signature), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if signer is not None:
        ski = signer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    names = [spiffe(f"client/{common_name}")] if sans is None else list(sans)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(key if signer is None else signer.key, hashes.SHA256())
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ClientCert(pem, key_pem, cert)


def intermediate(signer: Authority, now: datetime, common_name: str = "rogue intermediate") -> Authority:
    """A CA certificate signed by `signer` (our CA has pathlen 0, so it may not sign one)."""
    key = ec.generate_private_key(ec.SECP256R1())
    ski = signer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        _base(_name(common_name), signer.cert.subject, key.public_key(), now - timedelta(minutes=5),
              now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(signer.key, hashes.SHA256())
    )  # fmt: skip
    return Authority(cert, key)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aigis"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _base(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, start: datetime, end: datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )


def _key_usage(*, cert_sign: bool, digital_signature: bool = True) -> x509.KeyUsage:
    # A CA key signs certificates and CRLs (and, for the CA-as-client case, the TLS handshake too).
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )

"""`aigis issuer` as a process of its own: two replicas sharing one signing key set from a Secret
volume, a server that trusts them only through the JWKS URL, key rotation through the Secret's
`..data` swap, probes, and a clean exit on SIGTERM."""

from __future__ import annotations

import json
import shutil
import signal
import ssl
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest

from aigis.auth.pki import PkiPaths
from aigis.auth.signing_keys import rotate_signing_key
from aigis.server.config import ExternalIssuer, IssuerSettings
from tests.calls import RPC_KINDS, bearer, channel, run
from tests.conftest import make_pki
from tests.kube_volume import project
from tests.procs import AigisProcess

ISS = "https://aigis-issuer.test"
KEY_FILES = ("token-signing-key.pem", "jwks.json", "signing-keys.json")


def _https_json(url: str, pki: PkiPaths, client: str | None = None, form: dict[str, str] | None = None) -> Any:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    if client is not None:
        context.load_cert_chain(str(pki.client_cert(client)), str(pki.client_key(client)))
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if form is not None else {}
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), context=context,
                                timeout=10) as response:
        return json.loads(response.read())


def _token(info: dict[str, Any], pki: PkiPaths, client: str = "demo") -> str:
    return _https_json(info["issuer_url"] + "/oauth2/token", pki, client, {"grant_type": "client_credentials"})[
        "access_token"]


def _kids(info: dict[str, Any], pki: PkiPaths) -> list[str]:
    return [k["kid"] for k in _https_json(info["jwks_url"], pki)["keys"]]


def _key_files(directory: Path) -> dict[str, bytes]:
    """The Secret's keys: the signing key, the JWK Set and (after a rotation) the key metadata."""
    return {name: (directory / name).read_bytes() for name in KEY_FILES if (directory / name).exists()}


@pytest.fixture
def issuers(tmp_path: Path) -> Any:
    """Two `aigis issuer` processes, the signing keys mounted from one Secret volume."""
    pki, _ = make_pki(tmp_path / "certs", datetime.now(UTC))
    secret = tmp_path / "signing-secret"
    project(secret, _key_files(pki.root), mode=0o400)
    config = tmp_path / "issuer.toml"
    config.write_text(
        f'[server]\ncerts = "{pki.root}"\ndrain_seconds = 1\n'
        f'[issuer]\nlisten = "127.0.0.1:0"\nurl = "{ISS}"\n'
        f'[files]\nsigning_key = "{secret}/token-signing-key.pem"\njwks = "{secret}/jwks.json"\n'
        f'signing_keys_metadata = "{secret}/signing-keys.json"\n'
        '[probes]\nlisten = "127.0.0.1:0"\n[metrics]\nenabled = false\n'
    )
    replicas = [AigisProcess("issuer", tmp_path / f"issuer-{i}", config=config) for i in (1, 2)]
    try:
        infos = [replica.wait_ready() for replica in replicas]
        yield pki, secret, replicas, infos
    finally:
        for replica in replicas:
            replica.stop()


def test_issuer_replicas_share_keys_and_a_server_verifies_through_jwks_url(
    issuers: Any, start_stack: Any, tmp_path: Path
) -> None:
    """Tokens from either replica verify at a server that knows only replica 1's JWKS URL; a key
    rotated in the Secret reaches both replicas and the server; SIGTERM ends each with exit 0."""
    pki, secret, replicas, infos = issuers
    assert _kids(infos[0], pki) == _kids(infos[1], pki)
    for info in infos:
        with urllib.request.urlopen(f"http://127.0.0.1:{info['probes_port']}/readyz", timeout=10) as response:
            assert json.loads(response.read()) == {"ready": True, "failing": {}}
    trusted = ExternalIssuer(issuer=ISS, audience="aigis", jwks_url=infos[0]["jwks_url"], ca_file=pki.ca_cert)
    stack = start_stack(pki, issuer=IssuerSettings(enabled=False), external_issuers=(trusted,),
                        jwks_min_refetch_seconds=0.5)
    for info in infos:
        token = _token(info, pki)
        assert jwt.decode(token, options={"verify_signature": False})["iss"] == ISS
        with channel(stack, "demo") as ch:
            assert run(lambda token=token: RPC_KINDS["unary"](ch, bearer(token))).value == 5

    # `aigis keys rotate` against a copy of the Secret, then the Secret is updated (..data swap).
    staging = tmp_path / "staging"
    staging.mkdir()
    for name in _key_files(secret):
        shutil.copy(secret / name, staging / name)
    rotation = rotate_signing_key(PkiPaths(staging), now=datetime.now(UTC))
    project(secret, _key_files(staging), mode=0o400)
    new_kid = rotation.active
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(_kids(i, pki)[0] == new_kid for i in infos):
        time.sleep(0.2)
    tokens = [_token(info, pki) for info in infos]
    assert [jwt.get_unverified_header(t)["kid"] for t in tokens] == [new_kid, new_kid]
    time.sleep(0.6)  # the server's minimum time between JWKS fetches
    with channel(stack, "demo") as ch:
        for token in tokens:
            assert run(lambda token=token: RPC_KINDS["unary"](ch, bearer(token))).value == 5

    for replica in replicas:
        replica.signal(signal.SIGTERM)
    assert [replica.wait(20) for replica in replicas] == [0, 0]


def test_issuer_refuses_to_start_without_its_key(tmp_path: Path) -> None:
    """A missing signing key stops `aigis issuer` with one line naming the file, exit 2."""
    pki, _ = make_pki(tmp_path / "certs", datetime.now(UTC))
    config = tmp_path / "issuer.toml"
    config.write_text(f'[server]\ncerts = "{pki.root}"\n[issuer]\nlisten = "127.0.0.1:0"\n'
                      f'[files]\nsigning_key = "{tmp_path}/absent.pem"\n[metrics]\nenabled = false\n')
    process = AigisProcess("issuer", tmp_path / "run", config=config)
    assert process.wait(60) == 2
    assert "aigis issuer: cannot start: issuer:" in process.output()
    assert "absent.pem" in process.output()

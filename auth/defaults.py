"""Defaults that the configuration shows and the checks apply, kept free of heavy imports.

`aigis.server.config` reads them, and the configuration must load on a client-only install
(`pip install aigis`: no PyJWT, no cryptography) because `aigis call` / `aigis token` read it
(tests/test_cli_errors.py: test_client_only_install_still_calls_and_reads_config). Stdlib only.
"""

from __future__ import annotations

from datetime import timedelta

# The longest `exp - iat` accepted from an issuer unless its configuration says otherwise; the
# embedded issuer's longest token lifetime (auth/issuer.py MAX_TOKEN_TTL) is 24 h too.
DEFAULT_MAX_LIFETIME = timedelta(hours=24)

# Asymmetric algorithms only: a JWK Set holds public keys, and an HS* allow-list would let a public
# key be used as an HMAC secret. The configuration accepts exactly these; the verifier enforces them.
SUPPORTED_ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}
)
DEFAULT_ALGORITHMS = ("ES256", "RS256", "EdDSA")

# The embedded issuer's token lifetime: its default, and the bounds the configuration accepts
# (signing keys stay published for the longest lifetime, auth/signing_keys.py RETIRED_KEY_GRACE).
DEFAULT_TOKEN_TTL = timedelta(minutes=5)
MIN_TOKEN_TTL = timedelta(seconds=1)
MAX_TOKEN_TTL = DEFAULT_MAX_LIFETIME

# The largest gRPC message either way; an image in ClassifyImage is bounded by it too.
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024

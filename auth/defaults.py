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

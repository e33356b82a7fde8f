"""The base URL of an HTTPS listener, from the address it is bound to.

One rule for the embedded issuer's own URL (its default `iss`), the configuration that predicts it
(`aigis config show`, servers trusting a separately run issuer) and the CLI's default token
endpoint: a wildcard address becomes `localhost`, an IPv6 address gets brackets, anything else is
used as given. So `127.0.0.1:8443` is `https://127.0.0.1:8443` everywhere.
"""

from __future__ import annotations

import ipaddress


def url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - recognising a wildcard, not binding one
        return "localhost"
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def https_base_url(host: str, port: int) -> str:
    return f"https://{url_host(host)}:{port}"

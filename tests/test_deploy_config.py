"""Configuration for containers: AIGIS_* environment variables, [files] locations, the Kubernetes
TLS Secret layout (tls.crt, tls.key, ca.crt) and rotation through the kubelet's `..data` symlink swap,
JSON log lines and the audit log on stdout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from aigis.auth import certs
from aigis.auth.audit_chain import verify_log
from aigis.auth.pki import PkiPaths
from aigis.server.config import ConfigError, FileLocations, HostPort, load_config
from tests.calls import RPC_KINDS, bearer, channel, issuer_token, run, served_serial
from tests.conftest import make_pki
from tests.kube_volume import DATA, project

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aigis.toml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ environment


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("AIGIS_SERVER_LISTEN", "10.0.0.2:6000", "listen", HostPort("10.0.0.2", 6000)),
        ("AIGIS_SERVER_GRACE_SECONDS", "2.5", "grace_seconds", 2.5),
        ("AIGIS_SERVER_DRAIN_SECONDS", "7", "drain_seconds", 7.0),
        ("AIGIS_SERVER_WORKERS", "3", "workers", 3),
        ("AIGIS_AUTH_ALGORITHMS", "ES256, RS256", "algorithms", ("ES256", "RS256")),
        ("AIGIS_AUTH_REQUIRE_BOUND_TOKENS", "true", "require_bound_tokens", True),
        ("AIGIS_AUTH_POLICY", "/etc/aigis/policy/policy.json", "policy", Path("/etc/aigis/policy/policy.json")),
        ("AIGIS_METRICS_LISTEN", "10.0.0.2:9464", "metrics_listen", HostPort("10.0.0.2", 9464)),
        ("AIGIS_METRICS_ENABLED", "off", "metrics_listen", None),
        ("AIGIS_PROBES_LISTEN", "10.0.0.2:8080", "probes_listen", HostPort("10.0.0.2", 8080)),
        ("AIGIS_LOG_FORMAT", "json", "log_format", "json"),
        ("AIGIS_AUDIT_OUTPUT", "stdout", "audit_output", "stdout"),
        ("AIGIS_FILES_TLS_SECRET", "/tls", "files", FileLocations(tls_secret=Path("/tls"))),
    ],
)
def test_environment_variable_overrides_the_file(tmp_path: Path, variable: str, value: str, field: str,
                                                 expected: Any) -> None:
    """AIGIS_<SECTION>_<KEY> overrides `[section] key` of the file, converted to the key's type."""
    path = write(tmp_path, '[server]\nlisten = "127.0.0.1:5000"\ngrace_seconds = 1.0\n[log]\nformat = "text"\n')
    config = load_config(path, environ={variable: value})
    assert getattr(config, field) == expected


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    """Precedence: file < environment < command-line flag."""
    path = write(tmp_path, '[server]\nlisten = "127.0.0.1:5000"\n')
    env = {"AIGIS_SERVER_LISTEN": "127.0.0.1:6000"}
    assert load_config(path, environ=env).listen.port == 6000
    assert load_config(path, environ=env, listen="127.0.0.1:7000").listen.port == 7000
    assert load_config(None, environ=env).listen.port == 6000


def test_relative_path_from_environment_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like a flag, and unlike a path in the file (relative to the file)."""
    (tmp_path / "conf").mkdir()
    path = write(tmp_path / "conf", '[server]\ncerts = "pki"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config(path, environ={"AIGIS_AUDIT_PATH": "logs/audit.jsonl"})
    assert config.certs == tmp_path / "conf" / "pki"
    assert config.audit_log == tmp_path / "logs" / "audit.jsonl"


def test_other_aigis_variables_are_not_settings(tmp_path: Path) -> None:
    """AIGIS_CONFIG (the file's path) and variables outside the settings' sections are left alone."""
    config = load_config(None, environ={"AIGIS_CONFIG": "/etc/aigis/aigis.toml", "AIGIS_TOKEN": "x", "HOME": "/"})
    assert config.listen == HostPort("127.0.0.1", 50051)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"AIGIS_SERVER_LISTEN": "nowhere"}, "AIGIS_SERVER_LISTEN: expected HOST:PORT"),
        ({"AIGIS_SERVER_WORKERS": "two"}, "AIGIS_SERVER_WORKERS: expected an integer, got 'two'"),
        ({"AIGIS_SERVER_GRACE_SECONDS": "-1"}, "AIGIS_SERVER_GRACE_SECONDS: must be greater than 0"),
        ({"AIGIS_ISSUER_ENABLED": "maybe"}, "AIGIS_ISSUER_ENABLED: expected true or false, got 'maybe'"),
        ({"AIGIS_SERVER_LISTNE": "127.0.0.1:1"}, "AIGIS_SERVER_LISTNE: unknown setting"),
        ({"AIGIS_AUTH_ISSUERS": "https://idp"}, "AIGIS_AUTH_ISSUERS: [auth] issuers can only be set in the file"),
        ({"AIGIS_LOG_FORMAT": "xml"}, "AIGIS_LOG_FORMAT: expected one of text, json, got 'xml'"),
        ({"AIGIS_AUDIT_OUTPUT": "syslog"}, "AIGIS_AUDIT_OUTPUT: expected one of file, stdout"),
        ({"AIGIS_FILES_TLS_SECRET": ""}, "AIGIS_FILES_TLS_SECRET: must not be empty"),
        ({"AIGIS_AUTH_ALGORITHMS": "HS256"}, "auth.algorithms[0]: 'HS256' is not one of"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else "",
)
def test_bad_environment_variable_is_named(environ: dict[str, str], message: str) -> None:
    """A bad or unknown AIGIS_* setting stops start-up with a message naming the variable."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ=environ)
    assert str(caught.value).startswith(message), caught.value


# ---------------------------------------------------------------------------- [files]


def test_tls_secret_layout_and_explicit_files(tmp_path: Path) -> None:
    """files.tls_secret names tls.crt / tls.key / ca.crt; an explicit file wins over it; the rest
    stay under `certs` with aigis's names unless set."""
    path = write(tmp_path, '[server]\ncerts = "pki"\n[files]\ntls_secret = "/tls"\nca_bundle = "/trust/ca.pem"\n'
                           'crl = "/crl/crl.pem"\njwks = "/keys/jwks.json"\nclient_registry = "/reg/clients.json"\n'
                           'signing_key = "/keys/key.pem"\n')
    pki = load_config(path, environ={}).pki
    assert (pki.server_cert, pki.server_key, pki.ca_cert) == (Path("/tls/tls.crt"), Path("/tls/tls.key"),
                                                              Path("/trust/ca.pem"))
    assert (pki.crl, pki.jwks, pki.clients_registry, pki.signing_key) == (
        Path("/crl/crl.pem"), Path("/keys/jwks.json"), Path("/reg/clients.json"), Path("/keys/key.pem"))
    assert pki.signing_keys_metadata == tmp_path / "pki" / "signing-keys.json"
    assert load_config(None, environ={}).pki == PkiPaths(Path("certs"))


# ------------------------------------------------------- Kubernetes volumes, end to end


def _tls_secret(pki: PkiPaths) -> dict[str, bytes]:
    return {"tls.crt": pki.server_cert.read_bytes(), "tls.key": pki.server_key.read_bytes(),
            "ca.crt": pki.ca_cert.read_bytes()}


def test_kubernetes_volumes_rotate_through_the_data_symlink_swap(
    start_stack: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Server certificate, key and CA from a TLS Secret volume, the policy and the CRL from ConfigMap
    volumes, exactly as the kubelet lays them out; each update (a new `..data` directory swapped in
    atomically, the old one deleted) reaches the running server without a restart."""
    monkeypatch.setattr("aigis.server.app.RELOAD_INTERVAL_SECONDS", 3600.0)  # only reload_now polls
    pki, _ = make_pki(tmp_path / "certs", datetime.now(UTC))
    tls_dir, policy_dir, crl_dir = tmp_path / "tls", tmp_path / "policy", tmp_path / "crl"
    project(tls_dir, _tls_secret(pki), mode=0o400)
    policy = json.loads((REPO / "server" / "policy.json").read_text())
    project(policy_dir, {"policy.json": json.dumps(policy).encode()})
    project(crl_dir, {"crl.pem": pki.crl.read_bytes()})
    files = FileLocations(tls_secret=tls_dir, crl=crl_dir / "crl.pem")
    stack = start_stack(pki, files=files, policy=policy_dir / "policy.json")
    client = stack.client_files("demo")
    assert (tls_dir / "tls.crt").is_symlink() and os.readlink(tls_dir / "tls.crt") == f"{DATA}/tls.crt"
    before = served_serial(stack.server.port, *client)
    token = issuer_token(stack, "demo")
    with channel(stack, "demo") as ch:
        assert run(lambda: RPC_KINDS["unary"](ch, bearer(token))).value == 5

    # cert-manager renews: a new key and certificate from the same CA land as a new ..data.
    staging = replace(pki, server_cert_file=tmp_path / "new" / "tls.crt", server_key_file=tmp_path / "new" / "tls.key")
    (tmp_path / "new").mkdir()
    issued = certs.issue_server_certificate(staging, now=datetime.now(UTC))
    project(tls_dir, _tls_secret(staging), mode=0o400)
    stack.run(stack.server.reload_now())
    assert served_serial(stack.server.port, *client) == issued.serial != before
    assert stack.server.tls is not None and stack.server.tls.refused_reloads == 0

    # The policy ConfigMap changes: calculator calls are no longer allowed for anyone.
    policy["allow_rules"] = [r for r in policy["allow_rules"] if "Calculator" not in json.dumps(r)]
    project(policy_dir, {"policy.json": json.dumps(policy).encode()})
    stack.run(stack.server.reload_now())
    with channel(stack, "demo") as ch:
        assert run(lambda: RPC_KINDS["unary"](ch, bearer(token))).code == grpc.StatusCode.PERMISSION_DENIED

    # A new CRL revoking demo is published through its ConfigMap.
    certs.revoke_client(pki, "demo", now=datetime.now(UTC))
    project(crl_dir, {"crl.pem": pki.crl.read_bytes()})
    stack.run(stack.server.reload_now())
    with channel(stack, "demo") as ch:
        outcome = run(lambda: RPC_KINDS["unary"](ch, bearer(token)))
    assert outcome.code == grpc.StatusCode.UNAUTHENTICATED
    reasons = [r["reason"] for r in stack.audit_records() if r["request_id"] == outcome.request_id]
    assert reasons == ["cert_revoked"]
    assert sorted(p.name for p in tls_dir.iterdir() if p.name.startswith("..2")) == [
        os.readlink(tls_dir / DATA)]  # the old payload directories are gone, as the kubelet leaves it


# ------------------------------------------------------------------- logs and audit on stdout


def test_json_logs_and_audit_on_stdout(tmp_path: Path) -> None:
    """`aigis serve` configured only by AIGIS_* variables writes JSON log lines and the chained audit
    records to stdout; the audit lines taken from it verify as a chain."""
    pki, _ = make_pki(tmp_path / "certs", datetime.now(UTC))
    config = write(tmp_path, '[server]\nlisten = "127.0.0.1:0"\n[issuer]\nlisten = "127.0.0.1:0"\n')
    ready = tmp_path / "ready.json"
    env = {**os.environ, "AIGIS_CONFIG": str(config), "AIGIS_SERVER_CERTS": str(pki.root),
           "AIGIS_LOG_FORMAT": "json", "AIGIS_AUDIT_OUTPUT": "stdout", "AIGIS_METRICS_ENABLED": "false",
           "AIGIS_SERVER_GRACE_SECONDS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "aigis.tools.cli", "serve", "--ready-file", str(ready)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        assert ready.exists(), process.stderr.read() if process.poll() is not None else "not ready in 60 s"  # type: ignore[union-attr]
        target = json.loads(ready.read_text())["target"]
        ca, cert, key = pki.ca_cert, pki.client_cert("demo"), pki.client_key("demo")
        credentials = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
        with grpc.secure_channel(target, credentials) as ch:
            for _ in range(3):  # no token: three audited denials
                assert run(lambda ch=ch: RPC_KINDS["unary"](ch, ())).code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    lines = [json.loads(line) for line in out.decode().splitlines()]  # every stdout line is JSON
    audit = [line for line in lines if "chain" in line]
    logs = [line for line in lines if "chain" not in line]
    assert [a["reason"] for a in audit] == ["token_missing"] * 3
    assert [a["seq"] for a in audit] == [1, 2, 3]
    assert {"time", "level", "logger", "message"} <= logs[0].keys()
    assert any(line["message"].startswith("aigis serving on") for line in logs)
    extracted = tmp_path / "collected-audit.jsonl"
    extracted.write_text("".join(json.dumps(a, separators=(",", ":")) + "\n" for a in audit))
    assert verify_log(extracted, None).ok
    assert not (tmp_path / "aigis-audit.jsonl").exists()

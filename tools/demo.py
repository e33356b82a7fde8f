"""`aigis demo`: the whole user flow on a throwaway directory, narrated.

certs -> server -> token -> calls through the SDK -> denied calls -> the audit log. The server
runs as a real `aigis serve` subprocess on ephemeral loopback ports, exactly as a user runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import jwt

from aigis.auth.audit import read_records
from aigis.auth.audit_format import request_ids
from aigis.auth.certs import init_pki, issue_client, revoke_client
from aigis.auth.pki import PkiPaths
from aigis.calculator.v1 import calculator_pb2, calculator_pb2_grpc
from aigis.client_sdk import AigisError, Client, ClientCredentials
from aigis.tools import audit_cmd

SAMPLE_DIGIT = Path(__file__).resolve().parent.parent / "server" / "models" / "digits" / "samples" / "7.png"
READY_TIMEOUT_SECONDS = 60.0
EXPECTED_DENIALS = ("token_missing", "scope_missing", "cert_revoked")


class DemoDirectoryError(Exception):
    """`--dir` names something the demo will not write into; the message says what and why."""


class DemoServerError(Exception):
    """The demo's server did not start; the message carries the last line it logged."""


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


class ServerProcess:
    """`aigis serve` in a subprocess; its ready file tells us the ports it bound."""

    def __init__(self, work: Path, pki: PkiPaths) -> None:
        self.ready_file = work / "ready.json"
        self.audit_log = work / "audit.jsonl"
        self.log = (work / "server.log").open("w")
        # An empty configuration of its own: the demo must not pick up an aigis.toml lying around.
        config = work / "aigis.toml"
        config.write_text("# aigis demo: built-in defaults, overridden by the flags below\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aigis.tools.cli", "serve", "--config", str(config), "--certs", str(pki.root),
             "--listen", "127.0.0.1:0", "--issuer-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
             "--audit-log", str(self.audit_log), "--ready-file", str(self.ready_file)],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parent.parent,
        )
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not self.ready_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                lines = (work / "server.log").read_text(errors="replace").strip().splitlines()
                # The temporary directory (and the log in it) is removed: quote the log's last line.
                raise DemoServerError(f"the server did not start: {lines[-1] if lines else 'no output'}")
            time.sleep(0.1)
        self.info: dict[str, Any] = json.loads(self.ready_file.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run_demo(work: Path, *, keep: bool = True) -> int:
    """The narrated flow in `work`; `keep` says whether `work` outlives the demo (--dir)."""
    now = datetime.now(UTC)
    pki = PkiPaths(work / "certs")

    step("1. certificates: a CA, a server certificate, a token-signing key, clients")
    init_pki(pki, now=now)
    issue_client(pki, "reader", scopes=["classifier:predict"], now=now)
    issue_client(pki, "mallory", scopes=["calculator:compute", "classifier:predict"], now=now)
    for name in ("demo", "reader", "mallory"):
        print(f"   client {name:8s} -> {pki.client_cert(name)}")

    step("2. server: aigis serve (mTLS-only gRPC + the embedded OAuth2 token issuer)")
    server = ServerProcess(work, pki)
    try:
        target, issuer = server.info["target"], server.info["issuer_url"]
        token_url = issuer + "/oauth2/token"
        print(f"   gRPC {target}   issuer {issuer}")
        denials = _calls(pki, target, token_url)
        step("6. the audit log of denied requests")
        time.sleep(0.2)  # the audit writer flushes in the background
        records = read_records(server.audit_log)
        print(audit_cmd.format_table(records))
    finally:
        server.stop()
    reasons = tuple(r["reason"] for r in records)
    ids = {rid for r in records for rid in request_ids(r)}
    ok = reasons == EXPECTED_DENIALS and all(rid in ids for rid in denials)
    print(f"\n{'OK' if ok else 'UNEXPECTED'}: {len(records)} denied request(s) audited: {', '.join(reasons)}")
    if keep:
        print(f"   everything is kept in {work}; read the log again with: "
              f"aigis audit show --audit-log {server.audit_log}")
    else:
        print("   the temporary directory is removed now; `aigis demo --dir DIR` keeps everything")
    return 0 if ok else 1


def _calls(pki: PkiPaths, target: str, token_url: str) -> list[str]:
    """Returns the request ids of the denied calls, to find them in the audit log."""
    ca = pki.ca_cert

    def creds(name: str) -> ClientCredentials:
        return ClientCredentials(token_url, ca=ca, cert=pki.client_cert(name), key=pki.client_key(name))

    step("3. token: client credentials, authenticated by the client certificate (RFC 8705)")
    demo_tokens = creds("demo")
    claims = jwt.decode(demo_tokens.token(), options={"verify_signature": False})
    print(f"   sub={claims['sub']} scope={claims['scope']!r} expires in {claims['exp'] - claims['iat']} s "
          "(the token itself is never printed)")

    step("4. calls through the SDK")
    with Client(target, ca=ca, cert=pki.client_cert("demo"), key=pki.client_key("demo"),
                token_provider=demo_tokens, default_timeout=10) as client:
        print(f"   Add(2, 40) = {client.add(2, 40)}")
        result = client.classify(SAMPLE_DIGIT, top_k=3)
        print(f"   ClassifyImage({SAMPLE_DIGIT.name}) = {result.category} (p={result.probability:.3f}, "
              f"model {result.model})")

    step("5. denied calls")
    denied: list[str] = []
    # a) a valid certificate but no token at all (raw gRPC: the SDK always sends one)
    channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(
        ca.read_bytes(), pki.client_key("demo").read_bytes(), pki.client_cert("demo").read_bytes()))
    try:
        calculator_pb2_grpc.CalculatorStub(channel).Add(calculator_pb2.AddRequest(a=1, b=1), timeout=10)
    except grpc.RpcError as err:
        rid = dict(err.trailing_metadata() or ()).get("aigis-request-id", "")
        print(f"   no token          -> {err.code().name}: {err.details()} (request {rid})")
        denied.append(rid)
    finally:
        channel.close()
    # b) a token without the calculator scope
    with Client(target, ca=ca, cert=pki.client_cert("reader"), key=pki.client_key("reader"),
                token_provider=creds("reader"), default_timeout=10) as client:
        try:
            client.add(1, 1)
        except AigisError as exc:
            print(f"   missing scope     -> {type(exc).__name__}: {exc}")
            denied.append(exc.request_id or "")
    # c) a certificate revoked while its holder still has a valid token
    mallory = creds("mallory")
    with Client(target, ca=ca, cert=pki.client_cert("mallory"), key=pki.client_key("mallory"),
                token_provider=mallory, default_timeout=10) as client:
        client.add(1, 1)
        revoke_client(pki, "mallory", now=datetime.now(UTC))
        print("   aigis certs revoke mallory (the server reloads the CRL without a restart)")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                client.add(1, 1)
            except AigisError as exc:
                print(f"   revoked cert      -> {type(exc).__name__}: {exc}")
                denied.append(exc.request_id or "")
                break
            time.sleep(0.5)
    return denied


def main(directory: Path | None = None) -> int:
    if directory is not None:
        if directory.exists() and not directory.is_dir():
            raise DemoDirectoryError(f"--dir {directory} is a file, not a directory")
        if directory.is_dir() and any(directory.iterdir()):
            raise DemoDirectoryError(f"--dir {directory} is not empty (a demo never overwrites): "
                                     "name a new directory, or remove this one")
        directory.mkdir(parents=True, exist_ok=True)
        return run_demo(directory, keep=True)
    with tempfile.TemporaryDirectory(prefix="aigis-demo-") as tmp:
        os.chmod(tmp, 0o700)
        return run_demo(Path(tmp), keep=False)

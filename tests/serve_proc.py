"""`aigis serve` as a real child process, for the fault tests (kill -9, worker crashes, disk full).

The server binds port 0 and reports its ports through `--ready-file`; the test reads them, never
guesses. Everything the child prints goes to a log file the test can show when it fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aigis.auth.pki import PkiPaths

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Served:
    """A running `aigis serve` child and what its ready file said."""

    proc: subprocess.Popen[bytes]
    info: dict[str, Any]
    log: Path
    pki: PkiPaths

    @property
    def target(self) -> str:
        return f"localhost:{self.info['port']}"

    def stack(self) -> SimpleNamespace:
        """What tests/calls.py's helpers need (target, token URL, client files)."""
        return SimpleNamespace(
            target=self.target,
            token_url=f"{self.info['issuer_url']}/oauth2/token",
            client_files=lambda name: (self.pki.ca_cert, self.pki.client_cert(name), self.pki.client_key(name)),
            pki=self.pki,
        )

    def kill(self, sig: int = signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(60)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def serve(
    workdir: Path,
    pki: PkiPaths,
    audit_log: Path,
    *,
    config: str = "",
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    name: str = "serve",
    timeout: float = 60.0,
    preexec: Any = None,
) -> Served:
    """Start `aigis serve` on loopback port 0 and wait for its ready file."""
    ready = workdir / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    log = workdir / f"{name}.log"
    command = [
        sys.executable, "-m", "aigis.tools.cli", "serve", "--certs", str(pki.root), "--listen", "127.0.0.1:0",
        "--issuer-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--audit-log", str(audit_log),
        "--ready-file", str(ready), *args,
    ]  # fmt: skip
    if config:
        config_file = workdir / f"{name}.toml"
        config_file.write_text(config)
        command += ["--config", str(config_file)]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            preexec_fn=preexec,
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"aigis serve exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"aigis serve not ready within {timeout:.0f} s:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    return Served(proc, json.loads(ready.read_text()), log, pki)

"""`aigis serve` / `aigis issuer` as real child processes, configured like a container: a TOML file
plus AIGIS_* variables, optionally inside a network namespace (`ip netns exec NAME ...`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

START_TIMEOUT_SECONDS = 60.0


class AigisProcess:
    """One `aigis <command>` child; `info` is its ready file (ports, urls) once it is serving."""

    def __init__(
        self,
        command: str,
        workdir: Path,
        *,
        config: Path | None = None,
        env: Mapping[str, str] | None = None,
        netns: str | None = None,
        args: Sequence[str] = (),
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.ready_file = workdir / "ready.json"
        self.ready_file.unlink(missing_ok=True)
        self.log = workdir / "process.log"
        environ = {**os.environ, **(env or {})}
        if config is not None:
            environ["AIGIS_CONFIG"] = str(config)
        argv = [sys.executable, "-m", "aigis.tools.cli", command, "--ready-file", str(self.ready_file), *args]
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        self._log_file = self.log.open("wb")
        self.process = subprocess.Popen(argv, cwd=workdir, env=environ, stdout=self._log_file,
                                        stderr=subprocess.STDOUT)
        self.info: dict[str, Any] = {}

    def wait_ready(self, timeout: float = START_TIMEOUT_SECONDS) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                self.info = json.loads(self.ready_file.read_text())
                return self.info
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"aigis did not become ready (exit {self.process.poll()}):\n{self.output()}")

    def output(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log_file.close()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; always reaps the child."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log_file.close()
        return self.process.returncode

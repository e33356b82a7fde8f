"""Child processes for `aigis bench`: start them, talk to them, time one measurement window.

Servers report their bound port in an atomically written ready file; load generators speak one
JSON object per line on stdin/stdout (see benchmarks/load.py). Every child is registered and
killed at exit, whatever happens. CPU time comes from /proc/<pid>/stat (all threads), read by the
parent at the start and end of the window that every process shares; /proc/stat gives the whole
machine's, so what other processes used meanwhile is reported too. `machine_lock` and
`wait_for_quiet` keep windows apart from other benchmark runs and test runs on a shared machine.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import math
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aigis.auth.pki import PkiPaths

REPO_ROOT = Path(__file__).resolve().parents[1]
KINDS = ("baseline", "aigis")
READY_TIMEOUT_SECONDS = 90.0
STOP_TIMEOUT_SECONDS = 10.0
# Safety bound on calls per client process; far above what a process can do in a window.
MAX_REQUESTS_PER_PROCESS = 5_000_000
# Shared by every `aigis bench` on the machine, so two runs take turns instead of measuring each other.
LOCK_PATH = Path(tempfile.gettempdir()) / "aigis-bench.lock"


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why (and what the child wrote to stderr)."""


@dataclass(frozen=True)
class WindowTiming:
    """How long a measurement window lasts, and the uncounted load before it."""

    seconds: float
    warmup: float


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a whole process (all threads) from /proc; None where there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime: fields 14 and 15


_LIVE: set[Child] = set()


def kill_all() -> None:
    for child in list(_LIVE):
        child.stop(grace=0.0)


atexit.register(kill_all)


class Child:
    """A worker process we started: JSON lines on stdin/stdout, stderr kept in a file for errors."""

    def __init__(self, name: str, module: str, args: Sequence[str], workdir: Path, *, pipes: bool = True,
                 command: Sequence[str] | None = None, env: dict[str, str] | None = None) -> None:
        """Runs `python -m module args`, or `command` as given (a peer server from its own venv)."""
        self.name = name
        self.stderr_path = workdir / f"{name}.stderr"
        if env is None:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                list(command) if command is not None else [sys.executable, "-m", module, *args],
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stderr=stderr,
                cwd=REPO_ROOT,
                env=env,
            )
        _LIVE.add(self)
        self._buffer = b""

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float | None:
        return process_cpu_seconds(self.pid)

    def stderr_tail(self, lines: int = 15) -> str:
        try:
            text = self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def fail(self, what: str) -> BenchError:
        tail = self.stderr_tail()
        return BenchError(f"{self.name}: {what}" + (f"\n--- its stderr ---\n{tail}" if tail else ""))

    def send(self, obj: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(obj).encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise self.fail("exited early") from None

    def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line from the child, within `timeout` seconds."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.fail(f"no answer within {timeout:.0f} s")
            readable, _, _ = select.select([fd], [], [], min(left, 1.0))
            if readable:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise self.fail(f"exited with status {self.process.wait(STOP_TIMEOUT_SECONDS)}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            raise self.fail("wrote something that is not JSON") from None

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self, grace: float = STOP_TIMEOUT_SECONDS) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; always reaps the process and closes pipes."""
        process = self.process
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        _LIVE.discard(self)


@dataclass
class ServerProc:
    """A running benchmark server (`benchmarks.server`) and what its ready file said."""

    kind: str
    child: Child
    port: int
    issuer_url: str | None
    token_url: str | None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_servers(
    kinds: Sequence[str], models: Path, pki: PkiPaths, workdir: Path, tag: str, timing_out: Path | None = None,
    extra_args: Sequence[str] = (),
) -> list[ServerProc]:
    """Start one server per kind in parallel; return them once each has written its ready file."""
    pending: list[tuple[str, Child, Path]] = []
    try:
        for kind in kinds:
            ready = workdir / f"{tag}-{kind}.ready.json"
            args = ["--kind", kind, "--certs", str(pki.root), "--models", str(models),
                    "--audit-log", str(workdir / f"{tag}-{kind}-audit.jsonl"), "--ready-file", str(ready)]
            if timing_out is not None:
                args += ["--time-security-out", str(timing_out)]
            args += list(extra_args)
            pending.append((kind, Child(f"{tag}-{kind}-server", "aigis.benchmarks.server", args, workdir, pipes=False),
                            ready))
        servers = []
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        for kind, child, ready in pending:
            while not ready.exists():
                if child.process.poll() is not None:
                    raise child.fail(f"exited with status {child.process.returncode} before it was ready")
                if time.monotonic() > deadline:
                    raise child.fail(f"not ready within {READY_TIMEOUT_SECONDS:.0f} s")
                time.sleep(0.05)
            info = json.loads(ready.read_text(encoding="utf-8"))
            if "error" in info:
                raise child.fail(info["error"])
            servers.append(ServerProc(kind, child, int(info["port"]), info.get("issuer_url"), info.get("token_url")))
        return servers
    except BaseException:
        for _, child, _ in pending:
            child.stop(grace=1.0)
        raise



def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Load:
    """One client process of a window: its role ("valid" traffic or "flood") and its spec."""

    role: str
    spec: dict[str, Any]


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _sleep_until(wall_time: float) -> None:
    left = wall_time - time.time()
    if left > 0:
        time.sleep(left)


def run_window(
    server: ServerProc,
    loads: Sequence[Load],
    timing: WindowTiming,
    workdir: Path,
    *,
    at_start: Callable[[], None] | None = None,
    at_end: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run `loads` against `server` for one window; summarise what the valid traffic got."""
    max_seconds = READY_TIMEOUT_SECONDS + timing.warmup + timing.seconds + 30
    children: list[Child] = []
    try:
        for i, load in enumerate(loads):
            child = Child(f"load-{server.kind}-{load.role}-{i}", "aigis.benchmarks.load", [], workdir)
            children.append(child)
            child.send({**load.spec, "target": server.target, "max_seconds": max_seconds,
                        "max_requests": MAX_REQUESTS_PER_PROCESS})
        for child in children:
            answer = child.read(READY_TIMEOUT_SECONDS)
            if "error" in answer:
                raise child.fail(answer["error"])
        start_at = time.time() + timing.warmup
        end_at = start_at + timing.seconds
        for child in children:
            child.send({"start_at": start_at, "end_at": end_at})
        _sleep_until(start_at)
        if at_start is not None:
            at_start()
        busy0 = machine_busy_seconds()
        server_cpu0 = server.child.cpu_seconds()
        client_cpu0 = [c.cpu_seconds() for c in children]
        _sleep_until(end_at)
        busy1 = machine_busy_seconds()
        server_cpu1 = server.child.cpu_seconds()
        client_cpu1 = [c.cpu_seconds() for c in children]
        if at_end is not None:
            at_end()
        results = []
        for child in children:
            result = child.read(timing.seconds + 60)
            if "error" in result:
                raise child.fail(result["error"])
            results.append(result)
    finally:
        for child in children:
            child.stop()
    server_cpu = _delta(server_cpu0, server_cpu1)
    client_cpu = [_delta(a, b) for a, b in zip(client_cpu0, client_cpu1, strict=True)]
    summary = summarise(loads, results, timing.seconds, server_cpu, client_cpu)
    busy = _delta(busy0, busy1)
    ours = [server_cpu, *client_cpu]
    summary["other_cpu_util"] = (
        max(0.0, busy - sum(c for c in ours if c is not None)) / timing.seconds
        if busy is not None and all(c is not None for c in ours) else None
    )
    return summary


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (/proc/stat), or None without /proc."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(v) for v in stat.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / _CLOCK_TICKS


@contextlib.contextmanager
def machine_lock(max_wait: float) -> Iterator[bool]:
    """One measurement window at a time on this machine, across concurrent `aigis bench` runs.

    Yields whether the lock was had: after `max_wait` seconds the window runs anyway (and its
    `other_cpu_util` will show the interference).
    """
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
    locked = False
    try:
        deadline = time.monotonic() + max_wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.2)
        yield locked
    finally:
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def wait_for_quiet(max_wait: float, threshold: float = 0.15, sample: float = 1.0) -> tuple[float, float | None]:
    """Wait (at most `max_wait` seconds) until other work uses less than `threshold` of a core.

    Other helpers' test runs share this machine; measuring through them compares noise. Returns
    the seconds waited and the last busy share seen (None without /proc).
    """
    waited = 0.0
    while True:
        before = machine_busy_seconds()
        time.sleep(sample)
        after = machine_busy_seconds()
        busy = _delta(before, after)
        share = busy / sample if busy is not None else None
        if share is None or share < threshold or waited + sample > max_wait:
            return waited, share
        waited += sample


def summarise(loads: Sequence[Load], results: Sequence[dict[str, Any]], seconds: float,
              server_cpu: float | None, client_cpu: Sequence[float | None]) -> dict[str, Any]:
    """The figures of one window (no raw latencies: they are summarised here)."""
    valid_codes: dict[str, int] = {}
    flood_codes: dict[str, int] = {}
    latencies: list[int] = []
    truncated = False
    for load, result in zip(loads, results, strict=True):
        codes = valid_codes if load.role == "valid" else flood_codes
        for code, n in result["codes"].items():
            codes[code] = codes.get(code, 0) + n
        if load.role == "valid":
            latencies.extend(result["latencies_us"])
        truncated = truncated or bool(result["truncated"])
    ok = valid_codes.get("OK", 0)
    summary: dict[str, Any] = {
        "seconds": seconds,
        "requests": ok,
        "errors": {code: n for code, n in valid_codes.items() if code != "OK"},
        "rps": ok / seconds,
        "p50_ms": percentile(latencies, 50) / 1000 if latencies else None,
        "p99_ms": percentile(latencies, 99) / 1000 if latencies else None,
        "server_cpu_us_per_req": server_cpu / ok * 1e6 if server_cpu is not None and ok else None,
        "server_cpu_util": server_cpu / seconds if server_cpu is not None else None,
        "client_cpu_util": sum(c for c in client_cpu if c is not None) / seconds
        if all(c is not None for c in client_cpu) else None,
        "client_procs": sum(1 for load in loads if load.role == "valid"),
        "truncated": truncated,
    }
    if any(load.role != "valid" for load in loads):  # even if no flood call ended in the window (held)
        flood_calls = sum(flood_codes.values())
        summary["flood"] = {
            "codes": flood_codes,
            "rps": flood_calls / seconds,
            # Valid and forged calls together: what one call costs the server under the flood.
            "server_cpu_us_per_call": server_cpu / (ok + flood_calls) * 1e6
            if server_cpu is not None and ok + flood_calls else None,
        }
    return summary


# -------------------------------------------------------------------------------- the suite


"""One server under test: the full aigis stack, or a bare grpc.aio baseline with the same parts.

The baseline has the same servicers, model registry, inference executor, mTLS server
credentials and transport options as aigis, and no interceptor, so the difference between the two
is exactly what aigis adds per call. The bound port (port 0) is reported through an atomically
written ready file, never guessed. SIGTERM stops the server; with `--time-security-out` (aigis only),
the security path is timed from inside (aigis.benchmarks.spans): SIGUSR1 starts counting, SIGUSR2
stops and writes the figures, so only the measurement window counts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from aigis.auth.audit import Durability
from aigis.auth.pki import PkiPaths
from aigis.benchmarks.spans import SecurityPathTimer
from aigis.calculator.v1 import calculator_pb2_grpc
from aigis.classifier.v1 import classifier_pb2_grpc
from aigis.inference import grpc_service_pb2_grpc
from aigis.server.app import StartupError, grpc_options, server_credentials, start_server
from aigis.server.calculator import CalculatorServicer
from aigis.server.classifier import ImageClassificationServicer
from aigis.server.config import Config, HostPort, IssuerSettings
from aigis.server.inference import InferenceServicer
from aigis.server.repository import ModelRepository

KINDS = ("baseline", "aigis")
# Long enough that the one token the load generators share outlives any benchmark run.
TOKEN_TTL = timedelta(hours=2)


def bench_config(certs: Path, models: Path, audit_log: Path) -> Config:
    """aigis's defaults, on loopback port 0 (issuer and metrics too), with a long token lifetime."""
    return replace(
        Config(),
        listen=HostPort("127.0.0.1", 0),
        certs=certs,
        models=models,
        audit_log=audit_log,
        issuer=IssuerSettings(listen=HostPort("127.0.0.1", 0), token_ttl=TOKEN_TTL),
        metrics_listen=HostPort("127.0.0.1", 0),
        grace_seconds=0.5,
    )


@dataclass
class Running:
    """What a started server reports and how to stop it."""

    port: int
    issuer_url: str | None
    token_url: str | None
    stop: Callable[[], Awaitable[None]]


async def start_baseline(config: Config) -> Running:
    """A bare grpc.aio server: aigis's servicers, credentials and options, no interceptors."""
    credentials: Any = await asyncio.to_thread(server_credentials, PkiPaths(config.certs))
    if not isinstance(credentials, grpc.ServerCredentials):  # a rotatable store: take what aigis serves
        credentials = credentials.credentials()
    repository = await asyncio.to_thread(ModelRepository.load, config.models)
    server = aio.server(options=grpc_options(config))
    executor = ThreadPoolExecutor(max_workers=config.inference_threads, thread_name_prefix="bench-infer")
    calculator_pb2_grpc.add_CalculatorServicer_to_server(CalculatorServicer(), server)
    classifier_pb2_grpc.add_ImageClassificationServiceServicer_to_server(
        ImageClassificationServicer(repository.classifiers(), executor), server
    )
    inference = InferenceServicer(repository, executor)
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)
    port = server.add_secure_port(str(config.listen), credentials)
    await server.start()

    async def stop() -> None:
        await server.stop(config.grace_seconds)
        inference.close()
        executor.shutdown(wait=False, cancel_futures=True)

    return Running(port, None, None, stop)


async def start_aigis(config: Config) -> Running:
    """The full stack exactly as `aigis serve` builds it."""
    running = await start_server(config)
    issuer = running.issuer
    return Running(
        running.port,
        issuer.issuer_url if issuer is not None else None,
        issuer.token_url if issuer is not None else None,
        running.stop,
    )


def write_ready(path: Path, info: dict[str, Any]) -> None:
    """Atomic: the parent never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info), encoding="utf-8")
    os.replace(tmp, path)


async def run(kind: str, config: Config, ready_file: Path, timing_out: Path | None) -> int:
    timer = SecurityPathTimer(timing_out) if timing_out is not None and kind == "aigis" else None
    if timer is not None:
        timer.install()  # before the services register: their metrics recorders are built then
    try:
        running = await (start_aigis(config) if kind == "aigis" else start_baseline(config))
    except (StartupError, OSError, RuntimeError, ValueError) as exc:
        await asyncio.to_thread(write_ready, ready_file, {"error": f"{kind} server cannot start: {exc}"})
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if timer is not None:
        loop.add_signal_handler(signal.SIGUSR1, timer.start)
        loop.add_signal_handler(signal.SIGUSR2, timer.stop)
    info = {"kind": kind, "pid": os.getpid(), "port": running.port,
            "issuer_url": running.issuer_url, "token_url": running.token_url}
    await asyncio.to_thread(write_ready, ready_file, info)
    try:
        await stop.wait()
    finally:
        if timer is not None:
            timer.stop()
        with contextlib.suppress(Exception):
            await running.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aigis.benchmarks.server", description=__doc__)
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--certs", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--audit-log", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--time-security-out", type=Path,
                        help="aigis only: time the security path from inside; figures to this file")
    parser.add_argument("--audit-durability", choices=[d.value for d in Durability],
                        help="[audit] durability of the aigis server (default: aigis's default)")
    parser.add_argument("--denial-hold", type=float,
                        help="[limits] denial_hold_seconds of the aigis server (default: aigis's default)")
    args = parser.parse_args(argv)
    config = bench_config(args.certs, args.models, args.audit_log)
    if args.audit_durability is not None:
        config = replace(config, audit_durability=Durability(args.audit_durability))
    if args.denial_hold is not None:
        config = replace(config, limits=replace(config.limits, denial_hold_seconds=args.denial_hold))
    return asyncio.run(run(args.kind, config, args.ready_file, args.time_security_out))


if __name__ == "__main__":
    sys.exit(main())

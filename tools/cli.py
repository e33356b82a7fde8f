"""The `aigis` command line: certificates, serve, tokens, calls, audit, and the demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aigis.auth.pki import PkiPaths
from aigis.tools import audit_cmd, bench, certs_cmd, keys_cmd

DEFAULT_TARGET = "localhost:50051"
DEFAULT_ISSUER = "https://localhost:8443"


def _serve(args: argparse.Namespace) -> int:
    from aigis.server.app import StartupError, serve
    from aigis.server.config import ConfigError, load_config
    from aigis.server.logs import configure_logging

    try:
        config = load_config(
            args.config,
            listen=args.listen,
            certs=args.certs,
            policy=args.policy,
            audit_log=args.audit_log,
            issuer_listen=args.issuer_listen,
            models=args.models,
            metrics_listen=args.metrics_listen,
            workers=args.workers,
        )
    except ConfigError as exc:
        print(f"aigis serve: invalid configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, config.log_format)

    def ready(running: object) -> None:
        port = running.port  # type: ignore[attr-defined]
        issuer = running.issuer  # type: ignore[attr-defined]
        info = {"target": f"localhost:{port}", "port": port, "issuer_url": issuer.url if issuer else None,
                "metrics_port": running.metrics_port, "probes_port": running.probes_port}  # type: ignore[attr-defined]
        issuer_note = f", token issuer {issuer.url}" if issuer else ""
        if config.log_format == "text":  # with JSON logs, stdout carries nothing but JSON lines
            print(f"aigis: serving on {config.listen.host}:{port}{issuer_note}", flush=True)
        write_ready(info)

    def write_ready(info: dict[str, object]) -> None:
        if args.ready_file:
            tmp = args.ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, args.ready_file)

    if config.workers > 1:
        from aigis.server.workers import run_workers

        def workers_ready(infos: list) -> None:  # type: ignore[type-arg]
            first = infos[0]
            if config.log_format == "text":
                print(f"aigis: {len(infos)} workers serving on {config.listen.host}:{first.port}, "
                      f"token issuer {first.issuer_url}", flush=True)
            write_ready({"target": f"localhost:{first.port}", "port": first.port, "issuer_url": first.issuer_url,
                         "metrics_ports": [i.metrics_port for i in infos], "pids": [i.pid for i in infos]})

        try:
            return run_workers(config, config.workers, ready=workers_ready)
        except RuntimeError as exc:
            print(f"aigis serve: cannot start: {exc}", file=sys.stderr)
            return 2

    try:
        asyncio.run(serve(config, ready=ready))
    except StartupError as exc:
        print(f"aigis serve: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


def _issuer(args: argparse.Namespace) -> int:
    from aigis.server.app import StartupError
    from aigis.server.config import ConfigError, load_config
    from aigis.server.issuer_role import run_issuer
    from aigis.server.logs import configure_logging

    try:
        config = load_config(args.config, certs=args.certs, issuer_listen=args.listen,
                             metrics_listen=args.metrics_listen)
    except ConfigError as exc:
        print(f"aigis issuer: invalid configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, config.log_format)

    def ready(running: object) -> None:
        issuer = running.issuer  # type: ignore[attr-defined]
        info = {"issuer_url": issuer.url, "iss": issuer.issuer_url, "port": issuer.port,
                "jwks_url": issuer.jwks_url, "probes_port": running.probes_port,  # type: ignore[attr-defined]
                "metrics_port": running.metrics_port}  # type: ignore[attr-defined]
        if config.log_format == "text":
            print(f"aigis: token issuer at {issuer.url}", flush=True)
        if args.ready_file:
            tmp = args.ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, args.ready_file)

    try:
        asyncio.run(run_issuer(config, ready=ready))
    except StartupError as exc:
        print(f"aigis issuer: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


def _client_paths(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    pki = PkiPaths(args.certs)
    return pki.ca_cert, pki.client_cert(args.client), pki.client_key(args.client)


def _token_provider(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from aigis.client_sdk import ClientCredentials

    ca, cert, key = _client_paths(args)
    return ClientCredentials(
        args.issuer.rstrip("/") + "/oauth2/token", ca=ca, cert=cert, key=key, scopes=tuple(args.scope or ())
    )


def _token(args: argparse.Namespace) -> int:
    from aigis.client_sdk import AigisError

    try:
        print(_token_provider(args).token())
    except AigisError as exc:
        print(f"aigis token: {exc}", file=sys.stderr)
        return 1
    return 0


def _call(args: argparse.Namespace) -> int:
    from aigis.client_sdk import AigisError, Client

    ca, cert, key = _client_paths(args)
    try:
        with Client(args.target, ca=ca, cert=cert, key=key, token_provider=_token_provider(args),
                    default_timeout=args.timeout) as client:
            if args.rpc == "add":
                print(client.add(args.a, args.b))
            elif args.rpc == "sum":
                print(client.sum(args.numbers))
            elif args.rpc == "fibonacci":
                print(" ".join(str(n) for n in client.fibonacci(args.count)))
            elif args.rpc == "running-sum":
                print(" ".join(str(n) for n in client.running_sum(args.numbers)))
            elif args.rpc == "classify":
                result = client.classify(args.file, model=args.model, top_k=args.top_k)
                print(f"{result.category}  p={result.probability:.4f}  model={result.model}")
                for item in result.top[1:]:
                    print(f"  {item.label}  p={item.probability:.4f}")
            elif args.rpc == "models":
                for model in client.list_models():
                    print(f"{model.name} {model.version} input={list(model.input_shape)} "
                          f"labels={len(model.labels)}{' (default)' if model.is_default else ''}")
            elif args.rpc == "health":
                print(client.health())
            elif args.rpc == "metadata":
                _print_metadata(client.model_metadata(args.model, args.version))
            elif args.rpc == "infer":
                inputs = _load_inputs(args.input)
                outputs = client.infer(args.model, inputs, args.output or None, args.version)
                _print_outputs(outputs, args.save_dir)
    except InputFileError as exc:
        print(f"aigis call {args.rpc}: {exc}", file=sys.stderr)
        return 2
    except AigisError as exc:
        print(f"aigis call {args.rpc}: {exc}", file=sys.stderr)
        return 1
    return 0


class InputFileError(ValueError):
    """An --input the CLI cannot use; the message names the file."""


def _input_arg(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.npy, got {value!r}")
    return name, Path(path)


def _load_inputs(pairs: list[tuple[str, Path]]) -> dict[str, Any]:
    """Each NAME=FILE.npy as an array; pickled (object) arrays are refused, never unpickled."""
    import numpy as np

    inputs: dict[str, Any] = {}
    for name, path in pairs:
        if name in inputs:
            raise InputFileError(f"--input {name}: given twice")
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputFileError(f"--input {name}={path}: not a readable .npy array ({exc})") from None
    return inputs


def _print_metadata(meta: Any) -> None:
    print(f"{meta.name}  versions={','.join(meta.versions)}  platform={meta.platform}")
    for kind, tensors in (("input", meta.inputs), ("output", meta.outputs)):
        for t in tensors:
            print(f"  {kind:6} {t.name}  {t.datatype}  {list(t.shape)}")


def _print_outputs(outputs: dict[str, Any], save_dir: Path | None) -> None:
    import numpy as np

    for name, array in outputs.items():
        print(f"{name}  {array.dtype}  {list(array.shape)}")
        print(np.array2string(array, threshold=64, precision=6))
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            np.save(save_dir / f"{name}.npy", array, allow_pickle=False)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aigis", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    certs_cmd.register(sub)
    keys_cmd.register(sub)
    audit_cmd.register(sub)
    bench.register(sub)

    serve = sub.add_parser("serve", help="run the gRPC server and the embedded token issuer")
    serve.add_argument("--config", type=Path, default=_env_path("AIGIS_CONFIG"),
                       help="aigis.toml (default: $AIGIS_CONFIG; defaults apply without one)")
    serve.add_argument("--listen", help="HOST:PORT for gRPC (default 127.0.0.1:50051)")
    serve.add_argument("--certs", type=Path, help="certificate directory (default ./certs)")
    serve.add_argument("--policy", type=Path, help="authorization policy JSON (default: bundled)")
    serve.add_argument("--audit-log", type=Path, help="audit log path (default ./aigis-audit.jsonl)")
    serve.add_argument("--issuer-listen", help="HOST:PORT for the token issuer (default 127.0.0.1:8443)")
    serve.add_argument("--models", type=Path, help="model directory (default: the bundled models)")
    serve.add_argument("--metrics-listen", help="HOST:PORT for Prometheus /metrics, or 'off' (default 127.0.0.1:9464)")
    serve.add_argument("--workers", type=int, help="server processes sharing the port (default 1)")
    serve.add_argument("--ready-file", type=Path,
                       help="once serving, write {target, port, issuer_url} JSON here")
    serve.set_defaults(func=_serve)

    issuer = sub.add_parser("issuer", help="run the token issuer alone (HTTPS: token, JWKS, metadata)")
    issuer.add_argument("--config", type=Path, default=_env_path("AIGIS_CONFIG"),
                        help="aigis.toml: [issuer], [files], [probes], [metrics], [log] (default: $AIGIS_CONFIG)")
    issuer.add_argument("--listen", help="HOST:PORT (default: [issuer] listen, 127.0.0.1:8443)")
    issuer.add_argument("--certs", type=Path, help="certificate directory (default ./certs)")
    issuer.add_argument("--metrics-listen", help="HOST:PORT for Prometheus /metrics, or 'off'")
    issuer.add_argument("--ready-file", type=Path, help="once serving, write {issuer_url, jwks_url, ...} JSON here")
    issuer.set_defaults(func=_issuer)

    def client_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--certs", type=Path, default=Path("certs"), help="certificate directory")
        p.add_argument("--client", default="demo", help="client name (its certificate authenticates)")
        p.add_argument("--issuer", default=DEFAULT_ISSUER, help="token issuer base URL")
        p.add_argument("--scope", action="append", help="request only this scope (repeatable)")

    token = sub.add_parser("token", help="obtain an access token from the issuer (client credentials)")
    client_options(token)
    token.set_defaults(func=_token)

    call = sub.add_parser("call", help="call the server through the SDK")
    client_options(call)
    call.add_argument("--target", default=DEFAULT_TARGET, help="server HOST:PORT")
    call.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds")
    rpcs = call.add_subparsers(dest="rpc", required=True)
    add = rpcs.add_parser("add", help="Add A B")
    add.add_argument("a", type=int)
    add.add_argument("b", type=int)
    for name, what in (("sum", "Sum N..."), ("running-sum", "RunningSum N...")):
        p = rpcs.add_parser(name, help=what)
        p.add_argument("numbers", type=int, nargs="+")
    fib = rpcs.add_parser("fibonacci", help="Fibonacci COUNT")
    fib.add_argument("count", type=int)
    classify = rpcs.add_parser("classify", help="ClassifyImage FILE (PNG or JPEG)")
    classify.add_argument("file", type=Path)
    classify.add_argument("--model", default="")
    classify.add_argument("--top-k", type=int, default=3)
    rpcs.add_parser("models", help="ListModels")
    rpcs.add_parser("health", help="grpc.health.v1 Check")
    metadata = rpcs.add_parser("metadata", help="ModelMetadata MODEL (Open Inference Protocol)")
    metadata.add_argument("model")
    metadata.add_argument("--version", default=None, help="model version (default: the newest)")
    infer = rpcs.add_parser("infer", help="ModelInfer MODEL --input NAME=FILE.npy ... (Open Inference Protocol)")
    infer.add_argument("model")
    infer.add_argument("--input", type=_input_arg, action="append", required=True, metavar="NAME=FILE.npy",
                       help="an input tensor from a NumPy .npy file (repeat for each input)")
    infer.add_argument("--output", action="append", metavar="NAME", help="only this output (repeatable)")
    infer.add_argument("--version", default=None, help="model version (default: the newest)")
    infer.add_argument("--save-dir", type=Path, help="also write each output to DIR/NAME.npy")
    call.set_defaults(func=_call)

    demo = sub.add_parser("demo", help="the whole flow on a throwaway directory")
    demo.add_argument("--dir", type=Path, help="keep everything here instead of a temporary directory")
    demo.set_defaults(func=lambda args: __import__("aigis.tools.demo", fromlist=["main"]).main(args.dir))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())

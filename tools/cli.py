# PYTHON_ARGCOMPLETE_OK
"""The `aigis` command line: certificates, serve, tokens, calls, audit, configuration, doctor, demo.

Exit codes, for every subcommand:
  0  success
  1  the call was refused or failed, or a check found a problem (audit verify, doctor)
  2  usage or configuration error: a bad argument, a missing or unreadable file, a busy port,
     an invalid configuration, or a subcommand that needs the `aigis[server]` extra

A user's mistake is one line on stderr naming the file, port or value, never a traceback
(`--log-level DEBUG` adds the traceback of an unexpected error).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from aigis.auth.pki import PkiPaths
from aigis.auth.urls import url_host
from aigis.server.config import Config, ConfigError, find_config_file, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_CLIENT = "demo"
# Imported only by server-side subcommands; `pip install aigis` (the client) has none of them.
SERVER_EXTRA_MODULES = frozenset(
    {"cryptography", "jwt", "onnxruntime", "PIL", "prometheus_client", "grpc_reflection", "grpc_status", "aiohttp"}
)
INSTALL_SERVER = "pip install 'aigis[server]'"


class UsageError(Exception):
    """A mistake the user can fix; the message names the file, port or value. Exit code 2."""


def _missing_server_module(exc: ImportError) -> str | None:
    name = (getattr(exc, "name", None) or "").split(".")[0]
    return name if name in SERVER_EXTRA_MODULES else None


def load_cli_config(args: argparse.Namespace) -> Config:
    """The configuration `aigis serve` would use: --config, else ./aigis.toml, else defaults."""
    try:
        return load_config(find_config_file(getattr(args, "config", None)))
    except ConfigError as exc:
        raise UsageError(f"invalid configuration: {exc}") from None


# ------------------------------------------------------------------------------------------- serve


def _serve(args: argparse.Namespace) -> int:
    from aigis.server.app import StartupError, serve
    from aigis.server.logs import configure_logging

    try:
        config = load_config(
            find_config_file(args.config),
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
        raise UsageError(f"invalid configuration: {exc}") from None
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

        def workers_ready(infos: list[Any]) -> None:
            first = infos[0]
            if config.log_format == "text":
                print(f"aigis: {len(infos)} workers serving on {config.listen.host}:{first.port}, "
                      f"token issuer {first.issuer_url}", flush=True)
            write_ready({"target": f"localhost:{first.port}", "port": first.port, "issuer_url": first.issuer_url,
                         "metrics_ports": [i.metrics_port for i in infos], "pids": [i.pid for i in infos]})

        try:
            return run_workers(config, config.workers, ready=workers_ready)
        except RuntimeError as exc:
            raise UsageError(f"cannot start: {exc}") from None

    try:
        asyncio.run(serve(config, ready=ready))
    except StartupError as exc:
        raise UsageError(f"cannot start: {exc}") from None
    return EXIT_OK


def _issuer(args: argparse.Namespace) -> int:
    from aigis.server.app import StartupError
    from aigis.server.issuer_role import run_issuer
    from aigis.server.logs import configure_logging

    try:
        config = load_config(find_config_file(args.config), certs=args.certs, issuer_listen=args.listen,
                             metrics_listen=args.metrics_listen)
    except ConfigError as exc:
        raise UsageError(f"invalid configuration: {exc}") from None
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
        raise UsageError(f"cannot start: {exc}") from None
    return EXIT_OK


# --------------------------------------------------------------------------------- token and call


@dataclass(frozen=True)
class ClientSettings:
    """Where `call` and `token` connect, with which files: flags, else the configuration."""

    target: str
    token_url: str
    ca: Path
    cert: Path
    key: Path


def _require_file(path: Path, what: str, hint: str = "") -> Path:
    if path.is_dir():
        raise UsageError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise UsageError(f"{what} {path} not found{hint}")
    return path


def client_settings(args: argparse.Namespace) -> ClientSettings:
    config = load_cli_config(args)
    pki = PkiPaths(args.certs) if args.certs else config.pki
    issuer = (args.issuer or config.issuer.issuer_url()).rstrip("/")
    target = getattr(args, "target", None) or f"{url_host(config.listen.host)}:{config.listen.port}"
    ca = _require_file(pki.ca_cert, "CA certificate", " (run `aigis certs init`, or pass --certs DIR)")
    client_hint = (f" (no client {args.client!r} in {pki.root}: see `aigis certs list`, "
                   f"or `aigis certs issue {args.client} --scope SCOPE`)")
    cert = _require_file(pki.client_cert(args.client), "client certificate", client_hint)
    key = _require_file(pki.client_key(args.client), "client key", client_hint)
    return ClientSettings(target, issuer + "/oauth2/token", ca, cert, key)


def _token_provider(args: argparse.Namespace, settings: ClientSettings):  # type: ignore[no-untyped-def]
    from aigis.client_sdk import ClientCredentials

    return ClientCredentials(settings.token_url, ca=settings.ca, cert=settings.cert, key=settings.key,
                             scopes=tuple(args.scope or ()))


def _token(args: argparse.Namespace) -> int:
    from aigis.client_sdk import AigisError, decode_unverified

    settings = client_settings(args)
    try:
        token = _token_provider(args, settings).token()
    except AigisError as exc:
        print(f"aigis token: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.decode:
        header, claims = decode_unverified(token)
        print(json.dumps({"header": header, "claims": claims}, indent=2, sort_keys=True))
    else:
        print(token)
    return EXIT_OK


def _call_result(client: Any, args: argparse.Namespace) -> tuple[Any, list[str]]:
    """(JSON-ready result, human lines) of one RPC."""
    if args.rpc == "add":
        value = client.add(args.a, args.b)
        return value, [str(value)]
    if args.rpc == "sum":
        value = client.sum(args.numbers)
        return value, [str(value)]
    if args.rpc in ("fibonacci", "running-sum"):
        numbers = list(client.fibonacci(args.count) if args.rpc == "fibonacci" else client.running_sum(args.numbers))
        return numbers, [" ".join(str(n) for n in numbers)]
    if args.rpc == "classify":
        result = client.classify(args.file, model=args.model, top_k=args.top_k)
        top = [{"label": item.label, "probability": item.probability} for item in result.top]
        lines = [f"{result.category}  p={result.probability:.4f}  model={result.model}"]
        lines += [f"  {item.label}  p={item.probability:.4f}" for item in result.top[1:]]
        return {"category": result.category, "probability": result.probability, "model": result.model,
                "top": top}, lines
    if args.rpc == "models":
        models = client.list_models()
        data = [{"name": m.name, "version": m.version, "input_shape": list(m.input_shape), "labels": len(m.labels),
                 "default": m.is_default} for m in models]
        lines = [f"{m.name} {m.version} input={list(m.input_shape)} labels={len(m.labels)}"
                 f"{' (default)' if m.is_default else ''}" for m in models]
        return data, lines
    if args.rpc == "metadata":
        return _metadata_result(client.model_metadata(args.model, args.version))
    if args.rpc == "infer":
        outputs = client.infer(args.model, _load_inputs(args.input), args.output or None, args.version)
        return _outputs_result(outputs, args.save_dir)
    status = client.health()
    return str(status), [str(status)]


def _call(args: argparse.Namespace) -> int:
    from aigis.client_sdk import AigisError, Client

    if args.rpc == "classify":
        _require_file(args.file, "image file")
    settings = client_settings(args)
    try:
        with Client(settings.target, ca=settings.ca, cert=settings.cert, key=settings.key,
                    token_provider=_token_provider(args, settings), default_timeout=args.timeout) as client:
            data, lines = _call_result(client, args)
    except AigisError as exc:
        print(f"aigis call {args.rpc}: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"rpc": args.rpc, "error": type(exc).__name__, "message": str(exc),
                              "request_id": getattr(exc, "request_id", None)}))
        return EXIT_FAILED
    if args.json:
        print(json.dumps({"rpc": args.rpc, "result": data}))
    else:
        print("\n".join(lines))
    return EXIT_OK


class InputFileError(UsageError):
    """An --input the CLI cannot use; the message names the file (exit 2)."""


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


def _metadata_result(meta: Any) -> tuple[Any, list[str]]:
    lines = [f"{meta.name}  versions={','.join(meta.versions)}  platform={meta.platform}"]
    tensors: dict[str, list[dict[str, Any]]] = {"inputs": [], "outputs": []}
    for kind, found in (("input", meta.inputs), ("output", meta.outputs)):
        for t in found:
            lines.append(f"  {kind:6} {t.name}  {t.datatype}  {list(t.shape)}")
            tensors[f"{kind}s"].append({"name": t.name, "datatype": t.datatype, "shape": list(t.shape)})
    return {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform, **tensors}, lines


def _outputs_result(outputs: dict[str, Any], save_dir: Path | None) -> tuple[Any, list[str]]:
    import numpy as np

    lines: list[str] = []
    data: dict[str, Any] = {}
    for name, array in outputs.items():
        lines += [f"{name}  {array.dtype}  {list(array.shape)}", np.array2string(array, threshold=64, precision=6)]
        data[name] = {"datatype": str(array.dtype), "shape": list(array.shape), "data": array.tolist()}
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            np.save(save_dir / f"{name}.npy", array, allow_pickle=False)
    return data, lines


# ---------------------------------------------------------------------------------------- the tree


def _register_optional(sub: argparse._SubParsersAction, module: str, command: str, help_text: str) -> None:
    """Register `aigis.tools.<module>`'s command; on a client-only install, a stub naming the extra."""
    try:
        importlib.import_module(f"aigis.tools.{module}").register(sub)
    except ImportError as exc:
        missing = _missing_server_module(exc)
        if missing is None:
            raise
        stub = sub.add_parser(command, help=f"{help_text} (needs {INSTALL_SERVER})", add_help=False)
        stub.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        stub.set_defaults(func=lambda _args: _needs_server_extra(missing))


def _needs_server_extra(missing: str) -> int:
    raise UsageError(f"this command needs the server extra (module {missing!r} is not installed): {INSTALL_SERVER}")


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options accepted before and after the subcommand (`aigis serve --log-level DEBUG`)."""
    default: Any = argparse.SUPPRESS
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        default="INFO" if top else default, help="log verbosity (default INFO)")
    parser.add_argument("--config", type=Path, default=None if top else default,
                        help="aigis.toml to use (default: $AIGIS_CONFIG, else ./aigis.toml when it exists, "
                             "else built-in defaults)")


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_subparsers(child)]
    return found


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--certs", type=Path,
                   help="certificate directory (default: [server] certs of the configuration, i.e. ./certs)")
    p.add_argument("--client", default=DEFAULT_CLIENT,
                   help="client name; its certificate authenticates (default: %(default)s)")
    p.add_argument("--issuer", help="token issuer base URL (default: [issuer] url, else the [issuer] listen "
                                    "address: https://127.0.0.1:8443)")
    p.add_argument("--scope", action="append", help="request only this scope (repeatable; default: all the "
                                                    "client is registered for)")


def _version() -> str:
    try:
        return version("aigis")
    except PackageNotFoundError:
        return "unknown"


# Commands defined in their own modules: (module, command, one-line help). Their modules import
# heavy libraries (cryptography, aiohttp, onnxruntime), so `main` loads only the one it runs.
MODULE_COMMANDS = (
    ("certs_cmd", "certs", "manage the local PKI and the OAuth2 client registry"),
    ("keys_cmd", "keys", "rotate and list the token-signing keys"),
    ("audit_cmd", "audit", "read the audit log of denied requests"),
    ("bench", "bench", "benchmarks: aigis side by side with a bare server"),
    ("config_cmd", "config", "show or check the configuration"),
    ("doctor_cmd", "doctor", "check certificates, CRL, policy, keys, ports, clock"),
)
_GLOBAL_WITH_VALUE = ("--log-level", "--config")


def command_word(argv: Sequence[str]) -> str:
    """The subcommand named in `argv` ("" when none), skipping the global options and their values."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in _GLOBAL_WITH_VALUE:
            skip = True
        elif not word.startswith("-"):
            return word
    return ""


def _register_lazy(sub: argparse._SubParsersAction[argparse.ArgumentParser], command: str, help_text: str) -> None:
    """A placeholder listed in `aigis --help`; `main` never runs it (it loads the real command)."""
    stub = sub.add_parser(command, help=help_text, add_help=False)
    stub.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command tree, or with `command`, only that module command in full (fast start)."""
    parser = argparse.ArgumentParser(prog="aigis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"aigis {_version()}")
    _global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    for module, name, help_text in MODULE_COMMANDS:
        if command is None or command == name:
            _register_optional(sub, module, name, help_text)
        else:
            _register_lazy(sub, name, help_text)

    serve = sub.add_parser("serve", help="run the gRPC server and the embedded token issuer")
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
    issuer.add_argument("--listen", help="HOST:PORT (default: [issuer] listen, 127.0.0.1:8443)")
    issuer.add_argument("--certs", type=Path, help="certificate directory (default ./certs)")
    issuer.add_argument("--metrics-listen", help="HOST:PORT for Prometheus /metrics, or 'off'")
    issuer.add_argument("--ready-file", type=Path, help="once serving, write {issuer_url, jwks_url, ...} JSON here")
    issuer.set_defaults(func=_issuer)

    token = sub.add_parser("token", help="obtain an access token from the issuer (client credentials)")
    _client_options(token)
    token.add_argument("--decode", action="store_true",
                       help="print the token's header and claims as JSON (not verified) instead of the token")
    token.set_defaults(func=_token)

    call = sub.add_parser("call", help="call the server through the SDK")
    _client_options(call)
    call.add_argument("--target", help="server HOST:PORT (default: the [server] listen address, 127.0.0.1:50051)")
    call.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds (default: %(default)s)")
    call.add_argument("--json", action="store_true", help="print the result (or the error) as one JSON object")
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
    classify.add_argument("--model", default="", help="model name (default: the server's default model)")
    classify.add_argument("--top-k", type=int, default=3, help="labels to show (default: %(default)s)")
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
    demo.add_argument("--dir", type=Path, help="keep everything in this new (or empty) directory instead of a "
                                               "temporary one")
    demo.set_defaults(func=_demo)

    for child in _subparsers(parser):
        _global_options(child, top=False)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from aigis.tools import demo

    try:
        return demo.main(args.dir)
    except demo.DemoDirectoryError as exc:
        raise UsageError(str(exc)) from None
    except demo.DemoServerError as exc:
        print(f"aigis demo: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _complete(parser: argparse.ArgumentParser) -> None:
    """Shell completion through argcomplete: `eval "$(register-python-argcomplete aigis)"`."""
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


def _command_name(args: argparse.Namespace) -> str:
    words = ["aigis"] + [str(getattr(args, name)) for name in ("command", "certs_command", "keys_command",
                                                                "audit_command", "config_command", "rpc")
                         if getattr(args, name, None)]
    return " ".join(words)


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run one subcommand; every failure becomes one line and a documented exit code."""
    name = _command_name(args)
    try:
        return int(func(args))
    except UsageError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:  # a command that read the configuration for its defaults
        print(f"{name}: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as exc:
        missing = _missing_server_module(exc)
        if missing is None:
            raise
        print(f"{name}: needs the server extra (module {missing!r} is not installed): {INSTALL_SERVER}",
              file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{name}: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Completion needs the whole tree; a run needs only its own command's module.
    parser = build_parser(None if "_ARGCOMPLETE" in os.environ else command_word(argv))
    _complete(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args.func, args)
    except Exception as exc:  # the last guard: one line, the traceback only when asked for
        if args.log_level == "DEBUG":
            traceback.print_exc()
        print(f"{_command_name(args)}: unexpected error: {type(exc).__name__}: {exc} "
              "(--log-level DEBUG shows the traceback)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())

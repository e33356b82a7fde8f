"""MLServer as a peer in `aigis bench --infer`: its own virtual environment, a model repository, a process.

MLServer is not a dependency of aigis. The benchmark installs it, with onnxruntime, into a virtual
environment of its own under the user's cache directory (created once, reused: `MLSERVER_SPEC`
pins the version), writes a model repository whose runtime is benchmarks/mlserver_runtime.py, and
starts `mlserver start` on loopback ports. MLServer's gRPC port has no TLS and no authentication:
that is the point of the comparison (secured aigis against an unsecured peer).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from aigis.benchmarks.harness import READY_TIMEOUT_SECONDS, BenchError, Child, ServerProc

MLSERVER_SPEC = "mlserver==1.7.1"
RUNTIME = Path(__file__).resolve().parent / "mlserver_runtime.py"
INSTALL_TIMEOUT_SECONDS = 1200


def venv_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "aigis-bench" / f"venv-{MLSERVER_SPEC.replace('==', '-')}"


def ensure_venv(progress: object = None) -> Path:
    """The `mlserver` executable of the benchmark's own MLServer environment (installed if missing)."""
    root = venv_dir()
    mlserver = root / "bin" / "mlserver"
    marker = root / ".complete"
    if marker.is_file() and mlserver.is_file():
        return mlserver
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    if callable(progress):
        progress(f"installing {MLSERVER_SPEC} and onnxruntime into {root} (once)")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, capture_output=True, timeout=120)
        subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "--quiet", MLSERVER_SPEC,
                        "onnxruntime", "numpy"], check=True, capture_output=True, text=True,
                       timeout=INSTALL_TIMEOUT_SECONDS)
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or "").strip().splitlines()[-5:] if isinstance(exc.stderr, str) else []
        raise BenchError(f"cannot install {MLSERVER_SPEC} into {root}: " + " | ".join(tail)) from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"cannot install {MLSERVER_SPEC} into {root}: {exc}") from None
    marker.write_text(MLSERVER_SPEC + "\n")
    return mlserver


def _free_port() -> int:
    """A loopback port nothing listens on now. MLServer cannot report a port it chose itself, so
    this is bind-close-reuse: racy in principle, tolerable in a benchmark (a clash fails start-up)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_repository(root: Path, model: str, onnx_file: Path) -> tuple[Path, int]:
    """An MLServer repository with one model served by our runtime; returns it and its gRPC port."""
    root.mkdir(parents=True)
    grpc_port = _free_port()
    settings = {"host": "127.0.0.1", "grpc_port": grpc_port, "http_port": _free_port(),
                "metrics_port": _free_port(), "parallel_workers": 0, "debug": False,
                "grpc_max_message_length": 16 * 1024 * 1024}
    (root / "settings.json").write_text(json.dumps(settings, indent=2))
    model_dir = root / model
    model_dir.mkdir()
    shutil.copyfile(RUNTIME, model_dir / "aigis_onnx_runtime.py")
    shutil.copyfile(onnx_file, model_dir / "model.onnx")
    model_settings = {"name": model, "implementation": "aigis_onnx_runtime.OnnxRuntime",
                      "parameters": {"uri": "./model.onnx"}}
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    return root, grpc_port


def start_mlserver(mlserver: Path, model: str, onnx_file: Path, workdir: Path, tag: str) -> ServerProc:
    """`mlserver start` on a fresh repository; returns once its gRPC port answers ModelReady."""
    repo, port = write_repository(workdir / f"{tag}-mlserver-repo", model, onnx_file)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(repo / model)
    child = Child(f"{tag}-mlserver", "", [], workdir, pipes=False, command=[str(mlserver), "start", str(repo)],
                  env=env)
    try:
        _wait_ready(child, port, model)
    except BaseException:
        child.stop(grace=1.0)
        raise
    return ServerProc("mlserver", child, port, None, None)


def _wait_ready(child: Child, port: int, model: str) -> None:
    import grpc

    from aigis.inference import grpc_service_pb2, grpc_service_pb2_grpc

    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        while True:
            if child.process.poll() is not None:
                raise child.fail(f"exited with status {child.process.returncode} before it was ready")
            try:
                if stub.ModelReady(grpc_service_pb2.ModelReadyRequest(name=model), timeout=2).ready:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise child.fail(f"not ready within {READY_TIMEOUT_SECONDS:.0f} s")
            time.sleep(0.25)

"""Model directories for the benchmark, and raw onnxruntime measured without any RPC.

`model_variant` copies a model directory and sets or removes its `[batching]` table;
`write_null_model` writes a model with the same input and labels whose graph costs nothing
(flatten + slice), so a server's ClassifyImage throughput with it is the RPC stack's own limit.
Run as `python -m aigis.benchmarks.inference` (spec on stdin, one JSON line out) it times
`session.run` at batch 1 (latency) and at several batch sizes (throughput) in its own process.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aigis.server.model import CONFIG_FILE, ModelConfig, ModelConfigError, read_labels

BATCHING_TABLE = "batching"
_TABLE_HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\-\"']+)\s*\]\]?\s*(#.*)?$")


def strip_table(text: str, table: str) -> str:
    """`text` (TOML) without the `[table]` section: from its header to the next header."""
    out: list[str] = []
    inside = False
    for line in text.splitlines(keepends=True):
        header = _TABLE_HEADER.match(line)
        if header is not None:
            name = header.group(1).strip("\"'")
            inside = name == table or name.startswith(table + ".")
        if not inside:
            out.append(line)
    return "".join(out)


def batching_table(enabled: bool, max_batch_size: int, max_queue_delay_us: int) -> str:
    return (f"\n[{BATCHING_TABLE}]\nenabled = {'true' if enabled else 'false'}\n"
            f"max_batch_size = {max_batch_size}\nmax_queue_delay_us = {max_queue_delay_us}\n")


def model_variant(source: Path, models_root: Path, batching: str | None) -> Path:
    """Copy model directory `source` into `models_root/<name>/`, its model.toml ending with
    `batching` (a TOML table, or None for no table). Returns the copy's model directory."""
    target = models_root / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("samples", "__pycache__"))
    toml = target / CONFIG_FILE
    text = strip_table(toml.read_text(encoding="utf-8"), BATCHING_TABLE)
    toml.write_text(text.rstrip("\n") + "\n" + (batching or ""), encoding="utf-8")
    return target


def config_refusal(model_dir: Path) -> str | None:
    """Why the server's model loader would refuse this model.toml, or None if it accepts it."""
    try:
        ModelConfig.from_toml(model_dir / CONFIG_FILE)
    except ModelConfigError as exc:
        return str(exc)
    return None


def write_null_model(source: Path, models_root: Path) -> Path:
    """A model with `source`'s model.toml and labels whose graph only flattens and slices."""
    import onnx
    from onnx import TensorProto, helper

    target = model_variant(source, models_root, None)
    config = ModelConfig.from_toml(target / CONFIG_FILE)
    n_labels = len(read_labels(target / config.labels_file))
    shape = config.input_shape(1)
    features = int(np.prod(shape[1:]))
    if features < n_labels:
        raise ValueError(f"{source}: a null model needs at least as many input values ({features}) "
                         f"as labels ({n_labels})")
    output_name = config.output_name or "probabilities"
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", [config.input_name], ["flat"], axis=1),
            helper.make_node("Slice", ["flat", "starts", "ends", "axes"], [output_name]),
        ],
        "null",
        [helper.make_tensor_value_info(config.input_name, TensorProto.FLOAT, ["N", *shape[1:]])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", n_labels])],
        initializer=[
            helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
            helper.make_tensor("ends", TensorProto.INT64, [1], [n_labels]),
            helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="aigis-bench")
    model.ir_version = 8  # old enough for any onnxruntime we support
    onnx.checker.check_model(model)
    (target / config.model_file).write_bytes(model.SerializeToString())
    return target


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _run_threads(run: Callable[[], object], threads: int, seconds: float, max_runs: int) -> tuple[int, float]:
    """Call `run` in a loop on `threads` threads for `seconds`; onnxruntime releases the GIL."""
    counts = [0] * threads
    stop_at = time.perf_counter() + seconds

    def loop(k: int) -> None:
        while time.perf_counter() < stop_at and counts[k] < max_runs:
            run()
            counts[k] += 1

    started = time.perf_counter()
    workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts), time.perf_counter() - started


def measure_raw(model_dir: Path, batch_sizes: list[int], seconds: float, threads: int,
                max_runs: int) -> dict[str, Any]:
    """session.run alone: batch-1 latency (one thread), then images/s per batch size (`threads`)."""
    import onnxruntime as ort

    from aigis.server.model import session_options

    config = ModelConfig.from_toml(model_dir / CONFIG_FILE)
    session = ort.InferenceSession(str(model_dir / config.model_file), sess_options=session_options(),
                                   providers=["CPUExecutionProvider"])
    outputs = [config.output_name] if config.output_name else None
    rng = np.random.default_rng(0)

    def batch(n: int) -> np.ndarray:
        return rng.random(config.input_shape(n), dtype=np.float32)

    one = batch(1)
    for _ in range(10):
        session.run(outputs, {config.input_name: one})
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline and len(latencies) < max_runs:
        started = time.perf_counter()
        session.run(outputs, {config.input_name: one})
        latencies.append((time.perf_counter() - started) * 1e6)

    throughput: dict[str, Any] = {}
    for size in batch_sizes:
        data = batch(size)
        try:
            session.run(outputs, {config.input_name: data})
        except Exception as exc:  # a graph with a fixed batch of 1 refuses larger batches
            throughput[str(size)] = {"error": type(exc).__name__}
            continue
        def run_once(data: np.ndarray = data) -> object:
            return session.run(outputs, {config.input_name: data})

        runs, elapsed = _run_threads(run_once, threads, seconds, max_runs)
        throughput[str(size)] = {"images_per_second": runs * size / elapsed, "runs": runs}
    return {
        "batch1_latency_us": {
            "p50": statistics.median(latencies), "p99": percentile(latencies, 99), "runs": len(latencies),
        },
        "throughput": throughput,
        "threads": threads,
    }


def main() -> int:
    try:
        spec = json.loads(sys.stdin.readline())
        result = measure_raw(Path(spec["model_dir"]), [int(b) for b in spec["batch_sizes"]],
                             float(spec["seconds"]), int(spec["threads"]), int(spec["max_runs"]))
    except Exception as exc:  # reported to the parent as a skipped measurement, not a traceback
        result = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result) + "\n")
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())

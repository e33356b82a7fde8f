"""Write a 224x224 RGB image classifier with random weights, for benchmarks of batching.

``python -m aigis.tools.make_cnn OUT_DIR`` writes ``OUT_DIR/<name>/`` with model.onnx, labels.txt and
model.toml — a model directory the server loads like any other. The weights are random (fixed
seed, so the same arguments write the same bytes): the answers mean nothing, but the cost is that
of a real image model, milliseconds per image. (The bundled digits MLP costs ~5 µs, so there the
RPC stack, not the model, is what a benchmark measures.) Nothing is committed to the repository:
benchmarks generate it into a temporary directory (~55 MB with the defaults).

Graph: four 3x3 stride-2 Conv+Relu stages (a 2x2 MaxPool after the first), GlobalAveragePool, a
VGG-style head of two 3072-wide Gemm+Relu layers, Gemm, Softmax; NCHW float input with a symbolic
batch dimension. Why the head: on CPU, onnxruntime convolves each image of a batch on its own, so a
conv-only network costs the same per image at any batch size (measured here: 2.2 ms/image at batch
1, 2.5 at 32) and batching has nothing to win. A wide fully connected layer reads all its weights
once per run, whatever the batch: that is where batching pays (this default: ~2.8 ms at batch 1,
~1.3-1.5 ms/image at 8-32). `--hidden ""` gives the conv-only network.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aigis.server.model import CONFIG_FILE, BatchingConfig, ColorMode, Layout, ModelConfig, OutputKind, model_toml

SIZE = 224
LABELS = 1000
# (output channels, stride) of each 3x3 Conv+Relu stage (~0.8 ms per 224x224 image on one core)
# and the widths of the hidden fully connected layers (~2 ms at batch 1, a tenth per image at 32).
STAGES = ((32, 2), (64, 2), (128, 2), (256, 2))
HIDDEN = (3072, 3072)
SEED = 0
NAME = "cnn224"
# Pinned like tools/train_digits.py, so a newer onnx package does not change the bytes.
OPSET = 21
IR_VERSION = 10
# ImageNet's per-channel statistics: a realistic normalisation for an RGB model.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def cnn_config(*, name: str = NAME, size: int = SIZE, batching: BatchingConfig | None = None) -> ModelConfig:
    """The model.toml of a generated CNN."""
    return ModelConfig(
        name=name,
        version="1",
        input_name="image",
        layout=Layout.NCHW,
        width=size,
        height=size,
        color_mode=ColorMode.RGB,
        scale=1 / 255,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        output_name="probabilities",
        output_kind=OutputKind.PROBABILITIES,
        batching=batching or BatchingConfig(),
    )


def labels(n: int) -> tuple[str, ...]:
    """`class-0000` ... : placeholder labels, one per output."""
    return tuple(f"class-{i:04d}" for i in range(n))


def build_cnn(*, size: int = SIZE, n_labels: int = LABELS, stages: tuple[tuple[int, int], ...] = STAGES,
              hidden: tuple[int, ...] = HIDDEN, seed: int = SEED) -> onnx.ModelProto:
    """The graph, He-initialised from `seed` so activations neither vanish nor explode."""
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    x, c_in = "image", 3
    for i, (c_out, stride) in enumerate(stages, start=1):
        w = rng.normal(0.0, np.sqrt(2.0 / (c_in * 9)), (c_out, c_in, 3, 3)).astype(np.float32)
        b = rng.normal(0.0, 0.01, c_out).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"conv{i}_w"), numpy_helper.from_array(b, f"conv{i}_b")]
        nodes += [
            helper.make_node("Conv", [x, f"conv{i}_w", f"conv{i}_b"], [f"conv{i}"], name=f"conv{i}",
                             kernel_shape=[3, 3], strides=[stride, stride], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"),
        ]
        x, c_in = f"relu{i}", c_out
        if i == 1:
            nodes.append(helper.make_node("MaxPool", [x], ["pool1"], name="pool1", kernel_shape=[2, 2],
                                          strides=[2, 2]))
            x = "pool1"
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["features"], name="flatten", axis=1),
    ]
    x = "features"
    for i, width in enumerate((*hidden, n_labels), start=1):
        relu = i <= len(hidden)  # the hidden layers; the last Gemm gives the logits
        w = rng.normal(0.0, np.sqrt((2.0 if relu else 1.0) / c_in), (c_in, width)).astype(np.float32)
        b = np.zeros(width, dtype=np.float32)
        inits += [numpy_helper.from_array(w, f"fc{i}_w"), numpy_helper.from_array(b, f"fc{i}_b")]
        out = f"fc{i}" if relu else "logits"
        nodes.append(helper.make_node("Gemm", [x, f"fc{i}_w", f"fc{i}_b"], [out], name=f"fc{i}"))
        if relu:
            nodes.append(helper.make_node("Relu", [out], [f"fc{i}_relu"], name=f"fc{i}_relu"))
            out = f"fc{i}_relu"
        x, c_in = out, width
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1))
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", n_labels])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="aigis tools/make_cnn.py",
                              doc_string=f"random-weight {size}x{size} RGB CNN (seed {seed}) for benchmarks")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def config_toml(config: ModelConfig) -> str:
    """model.toml text for `config`, with its [batching] table written out in full."""
    return model_toml(
        config, "Written by `python -m aigis.tools.make_cnn`: random weights, for benchmarks only.", with_batching=True
    )


def write_cnn(out_dir: Path, *, name: str = NAME, size: int = SIZE, n_labels: int = LABELS,
              stages: tuple[tuple[int, int], ...] = STAGES, hidden: tuple[int, ...] = HIDDEN,
              seed: int = SEED, batching: BatchingConfig | None = None) -> Path:
    """Write the model directory `out_dir/name/` and return it."""
    config = cnn_config(name=name, size=size, batching=batching)
    model_dir = Path(out_dir) / config.name
    model_dir.mkdir(parents=True, exist_ok=True)
    model = build_cnn(size=size, n_labels=n_labels, stages=stages, hidden=hidden, seed=seed)
    (model_dir / config.model_file).write_bytes(model.SerializeToString())
    (model_dir / config.labels_file).write_text("\n".join(labels(n_labels)) + "\n", encoding="utf-8")
    (model_dir / CONFIG_FILE).write_text(config_toml(config), encoding="utf-8")
    return model_dir


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"widths must be positive: {text!r}")
    return widths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the model directory <name>/ into")
    parser.add_argument("--name", default=NAME, help=f"model name (default {NAME})")
    parser.add_argument("--size", type=int, default=SIZE, help=f"image width and height (default {SIZE})")
    parser.add_argument("--labels", type=int, default=LABELS, help=f"number of classes (default {LABELS})")
    parser.add_argument("--hidden", type=_widths, default=HIDDEN,
                        help="comma-separated widths of the hidden fully connected layers "
                             f"(default {','.join(map(str, HIDDEN))}; \"\" for none)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"weights seed (default {SEED})")
    parser.add_argument("--batching", action="store_true", help="write [batching] enabled = true")
    parser.add_argument("--max-batch-size", type=int, default=BatchingConfig().max_batch_size)
    parser.add_argument("--max-queue-delay-us", type=int, default=BatchingConfig().max_queue_delay_us)
    args = parser.parse_args(argv)
    try:
        batching = BatchingConfig(enabled=args.batching, max_batch_size=args.max_batch_size,
                                  max_queue_delay_us=args.max_queue_delay_us)
        model_dir = write_cnn(args.out, name=args.name, size=args.size, n_labels=args.labels,
                              hidden=args.hidden, seed=args.seed, batching=batching)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {model_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train the bundled digits classifier and export it to server/models/digits/ as ONNX.

``python -m aigis.tools.train_digits`` rebuilds model.onnx, labels.txt, model.toml and samples/ from scikit-learn's
bundled 8x8 digits (no download) with a fixed split and seed, so the same script on the same
machine writes the same bytes. A 64-32-10 MLP (ReLU, softmax) trained with plain numpy is enough:
the point is a real model served end to end, not the model itself.

The network is trained on exactly what the server feeds it: digit values 0..16 become uint8 pixels
round(v * 255 / 16), and `server.images.pixels_to_input` turns pixels into the model input, so a
PNG of a held-out digit classifies exactly as it did here.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from aigis.server.images import pixels_to_input
from aigis.server.model import ColorMode, Layout, ModelConfig, OutputKind, model_toml

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO_ROOT / "server" / "models" / "digits"
SEED = 0
HIDDEN = 32
EPOCHS = 60
BATCH = 32
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-3
# onnxruntime 1.20+ runs opset 21 (IR 10); pinned so a newer onnx package does not change the bytes.
OPSET = 21
IR_VERSION = 10
MIN_ACCURACY = 0.95

CONFIG = ModelConfig(
    name="digits",
    version="1",
    default=True,
    input_name="pixels",
    layout=Layout.FLAT,
    width=8,
    height=8,
    color_mode=ColorMode.L,
    scale=1 / 255,
    mean=(0.0,),
    std=(1.0,),
    output_name="probabilities",
    output_kind=OutputKind.PROBABILITIES,
)
LABELS = tuple(str(d) for d in range(10))


def digits_to_pixels(values: np.ndarray) -> np.ndarray:
    """scikit-learn digit values 0..16 as 8-bit grayscale pixels, shaped (N, 8, 8)."""
    return np.rint(np.asarray(values, dtype=np.float64) * 255 / 16).astype(np.uint8).reshape(-1, 8, 8)


def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = digits_to_pixels(digits.data)
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, labels, test_size=0.2, random_state=SEED, stratify=labels
    )
    return train_x, test_x, train_y, test_y


def heldout_split() -> tuple[np.ndarray, np.ndarray]:
    """The held-out digits the model never saw: uint8 images (N, 8, 8) and int64 labels (N,)."""
    _, test_x, _, test_y = _split()
    return test_x, test_y


@dataclass(frozen=True)
class Weights:
    w1: np.ndarray  # (64, HIDDEN)
    b1: np.ndarray
    w2: np.ndarray  # (HIDDEN, 10)
    b2: np.ndarray


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def forward(weights: Weights, x: np.ndarray) -> np.ndarray:
    """The exported graph in numpy: Gemm, Relu, Gemm, Softmax."""
    h = np.maximum(x @ weights.w1 + weights.b1, 0.0)
    return _softmax(h @ weights.w2 + weights.b2)


def train(pixels: np.ndarray, labels: np.ndarray, seed: int = SEED) -> Weights:
    """Mini-batch Adam on cross-entropy with weight decay; float64 for stable, repeatable sums."""
    rng = np.random.default_rng(seed)
    x = pixels_to_input(pixels, CONFIG).astype(np.float64)
    y = np.eye(len(LABELS))[labels]
    n_in = x.shape[1]
    params = {
        "w1": rng.normal(0.0, np.sqrt(2.0 / n_in), (n_in, HIDDEN)),  # He initialisation for ReLU
        "b1": np.zeros(HIDDEN),
        "w2": rng.normal(0.0, np.sqrt(1.0 / HIDDEN), (HIDDEN, len(LABELS))),
        "b2": np.zeros(len(LABELS)),
    }
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step = 0
    for _ in range(EPOCHS):
        order = rng.permutation(len(x))
        for start in range(0, len(x), BATCH):
            idx = order[start:start + BATCH]
            xb, yb = x[idx], y[idx]
            pre = xb @ params["w1"] + params["b1"]
            h = np.maximum(pre, 0.0)
            p = _softmax(h @ params["w2"] + params["b2"])
            dz2 = (p - yb) / len(idx)
            dh = (dz2 @ params["w2"].T) * (pre > 0)
            grads = {
                "w1": xb.T @ dh + WEIGHT_DECAY * params["w1"],
                "b1": dh.sum(axis=0),
                "w2": h.T @ dz2 + WEIGHT_DECAY * params["w2"],
                "b2": dz2.sum(axis=0),
            }
            step += 1
            for k, g in grads.items():
                m[k] = beta1 * m[k] + (1 - beta1) * g
                v[k] = beta2 * v[k] + (1 - beta2) * g * g
                m_hat = m[k] / (1 - beta1**step)
                v_hat = v[k] / (1 - beta2**step)
                params[k] = params[k] - LEARNING_RATE * m_hat / (np.sqrt(v_hat) + eps)
    return Weights(**{k: p.astype(np.float32) for k, p in params.items()})


def build_onnx(weights: Weights) -> onnx.ModelProto:
    """Gemm -> Relu -> Gemm -> Softmax with a symbolic batch dimension; no timestamps, so the
    serialised bytes depend only on the weights."""
    inits = [
        numpy_helper.from_array(weights.w1, "w1"),
        numpy_helper.from_array(weights.b1, "b1"),
        numpy_helper.from_array(weights.w2, "w2"),
        numpy_helper.from_array(weights.b2, "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", [CONFIG.input_name, "w1", "b1"], ["hidden_pre"], name="dense1"),
        helper.make_node("Relu", ["hidden_pre"], ["hidden"], name="relu1"),
        helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"], name="dense2"),
        helper.make_node("Softmax", ["logits"], [CONFIG.output_name], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info(CONFIG.input_name, TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info(CONFIG.output_name, TensorProto.FLOAT, ["batch", len(LABELS)])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="aigis tools/train_digits.py",
        model_version=int(CONFIG.version),
        doc_string="8x8 grayscale digit classifier trained on scikit-learn's digits; input pixels/255.",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def config_toml(config: ModelConfig) -> str:
    """model.toml text for `config`."""
    return model_toml(
        config, "Served by server/model.py; written by `python -m aigis.tools.train_digits` (do not edit by hand)."
    )


def write_model_dir(out_dir: Path, weights: Weights) -> None:
    """Write model.onnx, labels.txt and model.toml into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG.model_file).write_bytes(build_onnx(weights).SerializeToString())
    (out_dir / CONFIG.labels_file).write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    (out_dir / "model.toml").write_text(config_toml(CONFIG), encoding="utf-8")


def write_samples(out_dir: Path, pixels: np.ndarray, labels: np.ndarray) -> None:
    """samples/<digit>.png: the first held-out image of each digit (not picked for being easy),
    for the demo and for trying the server by hand."""
    from PIL import Image

    samples = out_dir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    for digit in range(len(LABELS)):
        first = int(np.flatnonzero(labels == digit)[0])
        Image.fromarray(pixels[first], mode="L").save(samples / f"{digit}.png", "PNG")


def build(out_dir: Path) -> float:
    """Train, export to out_dir, and return the held-out accuracy measured through onnxruntime."""
    from aigis.server.model import OnnxClassifier

    train_x, test_x, train_y, test_y = _split()
    write_model_dir(out_dir, train(train_x, train_y))
    write_samples(out_dir, test_x, test_y)
    classifier = OnnxClassifier.load(out_dir)
    predicted = classifier.predict(pixels_to_input(test_x, CONFIG)).argmax(axis=1)
    return float((predicted == test_y).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=MODEL_DIR, help=f"output directory (default {MODEL_DIR})")
    args = parser.parse_args(argv)
    accuracy = build(args.out)
    n = len(heldout_split()[1])
    print(f"held-out accuracy {accuracy:.4f} on {n} digits; wrote {args.out}")
    if accuracy < MIN_ACCURACY:
        print(f"error: accuracy below {MIN_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

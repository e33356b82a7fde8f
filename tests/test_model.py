"""Model serving: model.toml validation, the ONNX signature check, the registry, the bundled digits
model's accuracy and reproducibility, and a user-dropped model of another shape."""

from __future__ import annotations

import asyncio
import io
import shutil
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from aigis.classifier.v1 import classifier_pb2
from aigis.server import images
from aigis.server.classifier import ImageClassificationServicer, resolve_top_k
from aigis.server.errors import InvalidArgument, NotFound
from aigis.server.model import (
    ColorMode,
    Layout,
    ModelConfig,
    ModelConfigError,
    ModelRegistry,
    OnnxClassifier,
    OutputKind,
)
from aigis.tools import train_digits

DIGITS_DIR = Path(__file__).resolve().parent.parent / "server" / "models" / "digits"
RGB_LABELS = ("red", "green", "blue")


@pytest.fixture(scope="module")
def digits() -> OnnxClassifier:
    return OnnxClassifier.load(DIGITS_DIR)


@pytest.fixture(scope="module")
def heldout() -> tuple[np.ndarray, np.ndarray]:
    return train_digits.heldout_split()


def copy_digits(dest: Path) -> Path:
    shutil.copytree(DIGITS_DIR, dest)
    return dest


def rgb_config(**changes: object) -> ModelConfig:
    base = ModelConfig(
        name="colours", version="2024.1", input_name="image", layout=Layout.NCHW, width=16, height=16,
        color_mode=ColorMode.RGB, scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        output_kind=OutputKind.LOGITS,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def write_rgb_model(model_dir: Path, *, default: bool = False, name: str = "colours") -> Path:
    """A user's model: NCHW 3x16x16 in, logits out; it answers the dominant colour channel.

    Mean over each channel's pixels (inputs in [-1, 1]), then logits = 10 * means: a pure red
    image gives logits (10, -10, -10).
    """
    model_dir.mkdir(parents=True)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image", "axes"], ["means"], keepdims=0),
            helper.make_node("Gemm", ["means", "w", "b"], ["logits"]),
        ],
        "colours",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        initializer=[
            numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes"),
            numpy_helper.from_array(np.eye(3, dtype=np.float32) * 10, "w"),
            numpy_helper.from_array(np.zeros(3, dtype=np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    (model_dir / "net.onnx").write_bytes(model.SerializeToString())
    (model_dir / "classes.txt").write_text("\n".join(RGB_LABELS) + "\n", encoding="utf-8")
    (model_dir / "model.toml").write_text(
        f'name = "{name}"\nversion = "2024.1"\ndefault = {str(default).lower()}\n'
        'model_file = "net.onnx"\nlabels_file = "classes.txt"\n'
        '[input]\nname = "image"\nlayout = "NCHW"\nwidth = 16\nheight = 16\ncolor_mode = "RGB"\n'
        "scale = 0.00392156862745098\nmean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\n"
        '[output]\nkind = "logits"\n',
        encoding="utf-8",
    )
    return model_dir


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


# --- the bundled digits model -------------------------------------------------------------------


def test_digits_heldout_accuracy(digits: OnnxClassifier, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    """The committed digits model classifies at least 95 % of the held-out digits correctly."""
    pixels, labels = heldout
    predicted = digits.predict(images.pixels_to_input(pixels, digits.config)).argmax(axis=1)
    assert len(labels) == 360
    assert (predicted == labels).mean() >= train_digits.MIN_ACCURACY


def test_digits_png_path_matches_training_input(digits: OnnxClassifier,
                                                heldout: tuple[np.ndarray, np.ndarray]) -> None:
    """A PNG of a held-out digit reaches the model bit for bit as the training representation did."""
    pixels, _ = heldout
    direct = images.pixels_to_input(pixels[:50], digits.config)
    via_png = np.concatenate(
        [images.prepare(encode(Image.fromarray(p, mode="L")), 0, 0, digits.config) for p in pixels[:50]]
    )
    np.testing.assert_array_equal(via_png, direct)


def test_digits_info(digits: OnnxClassifier) -> None:
    """ListModels describes the digits model as the server feeds it: 8x8 grayscale, flat (1, 64)."""
    assert digits.info.name == "digits"
    assert digits.info.version == "1"
    assert digits.info.input_shape == (1, 64)
    assert digits.info.labels == tuple(str(d) for d in range(10))
    assert (digits.info.color_mode, digits.info.image_width, digits.info.image_height) == ("L", 8, 8)


def test_committed_config_is_what_training_writes() -> None:
    """model.toml, labels.txt on disk are exactly what tools/train_digits.py writes, and load back
    to the same configuration."""
    assert (DIGITS_DIR / "model.toml").read_text(encoding="utf-8") == train_digits.config_toml(
        train_digits.CONFIG)
    assert ModelConfig.from_toml(DIGITS_DIR / "model.toml") == train_digits.CONFIG
    assert (DIGITS_DIR / "labels.txt").read_text(encoding="utf-8") == "0\n1\n2\n3\n4\n5\n6\n7\n8\n9\n"


def test_training_is_deterministic(tmp_path: Path) -> None:
    """Training twice writes identical bytes, and the result meets the accuracy bar."""
    first = train_digits.build(tmp_path / "a")
    second = train_digits.build(tmp_path / "b")
    assert first == second >= train_digits.MIN_ACCURACY
    for name in ("model.onnx", "labels.txt", "model.toml", *(f"samples/{d}.png" for d in range(10))):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_samples_are_heldout_digits_and_classify(digits: OnnxClassifier,
                                                 heldout: tuple[np.ndarray, np.ndarray]) -> None:
    """samples/<d>.png is the first held-out image of digit d, and the model names it d."""
    pixels, labels = heldout
    for d in range(10):
        data = (DIGITS_DIR / "samples" / f"{d}.png").read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            np.testing.assert_array_equal(np.asarray(img), pixels[np.flatnonzero(labels == d)[0]])
        probs = digits.predict(images.prepare(data, 0, 0, digits.config))[0]
        assert digits.top(probs, 1)[0][0] == str(d)


def test_predict_refuses_wrong_tensor(digits: OnnxClassifier) -> None:
    """predict refuses a batch of the wrong dtype or shape rather than letting onnxruntime guess."""
    with pytest.raises(ValueError, match="float32"):
        digits.predict(np.zeros((1, 64), dtype=np.float64))
    with pytest.raises(ValueError, match="float32"):
        digits.predict(np.zeros((1, 63), dtype=np.float32))


def test_top_is_best_first_and_stable(digits: OnnxClassifier) -> None:
    """top(k) lists labels best first; equal probabilities keep label order."""
    probs = np.array([0.1, 0.3, 0.0, 0.3, 0.05, 0.05, 0.1, 0.05, 0.05, 0.0], dtype=np.float32)
    assert [label for label, _ in digits.top(probs, 4)] == ["1", "3", "0", "6"]
    assert digits.top(probs, 1) == [("1", pytest.approx(0.3))]


# --- model.toml validation -----------------------------------------------------------------------

BASE_TOML = train_digits.config_toml(train_digits.CONFIG)

BAD_CONFIGS = [
    pytest.param('name = "digits"', 'name = "../x"',
                 "name: must be 1-64 of A-Z a-z 0-9 . _ - (not starting with . _ -), got '../x'", id="name-path"),
    pytest.param('name = "digits"', "name = 5", "name: must be a string, got 5", id="name-not-string"),
    pytest.param('version = "1"\n', "", "version: missing", id="version-missing"),
    pytest.param('version = "1"', 'version = ""', "version: must be 1-64 printable characters, got ''",
                 id="version-empty"),
    pytest.param("default = true", 'default = "yes"', "default: must be true or false, got 'yes'",
                 id="default-not-bool"),
    pytest.param('layout = "flat"', 'layout = "CHW"',
                 "input.layout: must be 'flat' | 'NCHW' | 'NHWC', got 'CHW'", id="layout-unknown"),
    pytest.param("width = 8", "width = 0", "input.width: must be from 1 to 4096, got 0", id="width-zero"),
    pytest.param("height = 8", "height = 5000", "input.height: must be from 1 to 4096, got 5000",
                 id="height-huge"),
    pytest.param("width = 8", 'width = "8"', "input.width: must be an integer, got '8'", id="width-string"),
    pytest.param("width = 8", "width = true", "input.width: must be an integer, got True", id="width-bool"),
    pytest.param('color_mode = "L"', 'color_mode = "CMYK"',
                 "input.color_mode: must be 'L' | 'RGB', got 'CMYK'", id="color-mode-unknown"),
    pytest.param("scale = 0.00392156862745098", "scale = 0",
                 "input.scale: must be a finite number > 0, got 0.0", id="scale-zero"),
    pytest.param("scale = 0.00392156862745098", "scale = nan",
                 "input.scale: must be a finite number > 0, got nan", id="scale-nan"),
    pytest.param("mean = [0.0]", "mean = [0.0, 0.0, 0.0]",
                 "input.mean: needs 1 value(s) for color_mode 'L', got 3", id="mean-wrong-count"),
    pytest.param("std = [1.0]", "std = [0.0]", "input.std: values must be > 0", id="std-zero"),
    pytest.param("std = [1.0]", "std = [inf]", "input.std: values must be finite numbers", id="std-inf"),
    pytest.param("std = [1.0]", 'std = ["1"]', "input.std: must be a number or a list of numbers, got ['1']",
                 id="std-strings"),
    pytest.param('kind = "probabilities"', 'kind = "scores"',
                 "output.kind: must be 'probabilities' | 'logits', got 'scores'", id="output-kind-unknown"),
    pytest.param("[output]", "[outputs]", "output: missing", id="output-table-missing"),
    pytest.param("default = true", "defualt = true", "defualt: unknown key", id="typo-top-level"),
    pytest.param("height = 8", "height = 8\nheigth = 8", "input.heigth: unknown key", id="typo-input"),
    pytest.param('model_file = "model.onnx"', 'model_file = "../digits/model.onnx"',
                 "model_file: must be a plain file name in the model directory, got '../digits/model.onnx'",
                 id="model-file-outside"),
    pytest.param('labels_file = "labels.txt"', 'labels_file = "/etc/passwd"',
                 "labels_file: must be a plain file name in the model directory, got '/etc/passwd'",
                 id="labels-file-absolute"),
]


@pytest.mark.parametrize(("old", "new", "message"), BAD_CONFIGS)
def test_bad_config_is_refused_naming_file_and_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    """An invalid model.toml stops loading with a message naming the file and the key."""
    assert old in BASE_TOML
    path = tmp_path / "model.toml"
    path.write_text(BASE_TOML.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ModelConfigError) as caught:
        ModelConfig.from_toml(path)
    assert str(caught.value) == f"{path}: {message}"


def test_config_not_toml(tmp_path: Path) -> None:
    """A model.toml that is not TOML at all is refused, naming the file."""
    path = tmp_path / "model.toml"
    path.write_text("name = \n", encoding="utf-8")
    with pytest.raises(ModelConfigError, match=r"model\.toml: not valid TOML: "):
        ModelConfig.from_toml(path)


# --- the ONNX graph against model.toml ------------------------------------------------------------

MISMATCHES = [
    pytest.param("model.toml", 'name = "pixels"', 'name = "x"',
                 "{model}: input is named 'pixels' but model.toml input.name is 'x'", id="input-name"),
    pytest.param("model.toml", 'layout = "flat"', 'layout = "NCHW"',
                 "{model}: input shape ['batch', 64] does not match model.toml (layout 'NCHW', 8x8 L: "
                 "[1, 1, 8, 8])", id="layout"),
    pytest.param("model.toml", "width = 8", "width = 16",
                 "{model}: input shape ['batch', 64] does not match model.toml (layout 'flat', 16x8 L: "
                 "[1, 128])", id="size"),
    pytest.param("model.toml", 'color_mode = "L"\nscale = 0.00392156862745098\nmean = [0.0]\nstd = [1.0]',
                 'color_mode = "RGB"', "{model}: input shape ['batch', 64] does not match model.toml "
                 "(layout 'flat', 8x8 RGB: [1, 192])", id="colour-mode"),
    pytest.param("model.toml", 'name = "probabilities"', 'name = "scores"',
                 "{model}: no output named 'scores' (outputs: ['probabilities'])", id="output-name"),
    pytest.param("labels.txt", "9\n", "",
                 "{model}: output shape ['batch', 10] does not match (N, 9 labels)", id="label-count"),
    pytest.param("labels.txt", "9\n", "8\n", "{labels}: duplicate labels", id="labels-duplicate"),
    pytest.param("labels.txt", "5\n", "\n", "{labels}: line 6: empty label", id="labels-empty-line"),
]


@pytest.mark.parametrize(("file", "old", "new", "message"), MISMATCHES)
def test_model_not_matching_config_is_refused(tmp_path: Path, file: str, old: str, new: str,
                                              message: str) -> None:
    """A graph whose input or output disagrees with model.toml or the labels is refused at load."""
    model_dir = copy_digits(tmp_path / "digits")
    text = (model_dir / file).read_text(encoding="utf-8")
    assert old in text
    (model_dir / file).write_text(text.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ModelConfigError) as caught:
        OnnxClassifier.load(model_dir)
    assert str(caught.value) == message.format(model=model_dir / "model.onnx", labels=model_dir / "labels.txt")


@pytest.mark.parametrize(
    ("damage", "start"),
    [
        pytest.param("garbage-onnx", "{model}: onnxruntime cannot load the model: ", id="garbage-onnx"),
        pytest.param("no-onnx", "{model}: onnxruntime cannot load the model: ", id="missing-onnx"),
        pytest.param("no-labels", "{labels}: cannot read labels: ", id="missing-labels"),
        pytest.param("no-config", "{config}: cannot read: ", id="missing-config"),
    ],
)
def test_missing_or_corrupt_files_are_refused(tmp_path: Path, damage: str, start: str) -> None:
    """A model directory with a missing or corrupt file is refused, naming the file."""
    model_dir = copy_digits(tmp_path / "digits")
    if damage == "garbage-onnx":
        (model_dir / "model.onnx").write_bytes(b"\x08\x07not an onnx model")
    else:
        {"no-onnx": model_dir / "model.onnx", "no-labels": model_dir / "labels.txt",
         "no-config": model_dir / "model.toml"}[damage].unlink()
    with pytest.raises(ModelConfigError) as caught:
        OnnxClassifier.load(model_dir)
    assert str(caught.value).startswith(start.format(
        model=model_dir / "model.onnx", labels=model_dir / "labels.txt", config=model_dir / "model.toml"))


# --- a model the user drops in -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("colour", "fmt", "size", "expected"),
    [
        pytest.param((230, 10, 10), "PNG", (16, 16), "red", id="png-red-native-size"),
        pytest.param((10, 200, 20), "PNG", (40, 30), "green", id="png-green-downscaled"),
        pytest.param((0, 0, 255), "JPEG", (7, 5), "blue", id="jpeg-blue-upscaled"),
    ],
)
def test_user_dropped_rgb_model(tmp_path: Path, colour: tuple[int, int, int], fmt: str,
                                size: tuple[int, int], expected: str) -> None:
    """A 3-channel 16x16 NCHW logits model with its own file names works: images are converted,
    resized, normalised per channel and the logits turned into probabilities."""
    model = OnnxClassifier.load(write_rgb_model(tmp_path / "colours"))
    assert model.config == replace(rgb_config(), model_file="net.onnx", labels_file="classes.txt")
    assert model.info.input_shape == (1, 3, 16, 16)
    batch = images.prepare(encode(Image.new("RGB", size, colour), fmt), 0, 0, model.config)
    probs = model.predict(batch)
    assert probs.shape == (1, 3)
    assert probs.sum() == pytest.approx(1.0, abs=1e-6)
    assert model.top(probs[0], 1)[0][0] == expected
    assert model.top(probs[0], 1)[0][1] > 0.99


# --- the registry --------------------------------------------------------------------------------


def test_registry_loads_every_model_and_knows_the_default(tmp_path: Path) -> None:
    """Every subdirectory with a model.toml is loaded; "" means the model marked default."""
    copy_digits(tmp_path / "digits")
    write_rgb_model(tmp_path / "colours")
    (tmp_path / "notes").mkdir()  # no model.toml: not a model
    registry = ModelRegistry.load(tmp_path)
    assert [m.name for m in registry.models] == ["colours", "digits"]
    assert registry.default_name == "digits"
    assert registry.get("").name == "digits"
    assert registry.get("colours").name == "colours"


def test_registry_without_default_uses_first_by_name(tmp_path: Path) -> None:
    """With no model marked default, the first model by name is the default."""
    write_rgb_model(tmp_path / "b", name="zebra")
    write_rgb_model(tmp_path / "a", name="apple")
    assert ModelRegistry.load(tmp_path).default_name == "apple"


def test_registry_unknown_model_is_not_found(tmp_path: Path) -> None:
    """Asking for a model the server does not host is NOT_FOUND, without echoing the name."""
    registry = ModelRegistry.load(write_rgb_model(tmp_path / "m").parent)
    with pytest.raises(NotFound) as caught:
        registry.get("../../etc/passwd")
    assert caught.value.message == "unknown model: ListModels names the models this server hosts"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        pytest.param("empty", "{root}: no model directories (a subdirectory with model.toml)", id="empty"),
        pytest.param("missing", "{root}/nowhere: models directory does not exist", id="missing-dir"),
        pytest.param("two-defaults", "{root}: default: more than one model says default = true (apple, zebra)",
                     id="two-defaults"),
        pytest.param("same-name", "{root}/b/model.toml: name: 'apple' is already used by {root}/a/model.toml",
                     id="duplicate-name"),
    ],
)
def test_registry_refuses_bad_directories(tmp_path: Path, setup: str, message: str) -> None:
    """A models directory with no models, two defaults or two models of one name stops start-up."""
    root = tmp_path
    if setup == "two-defaults":
        write_rgb_model(root / "a", name="apple", default=True)
        write_rgb_model(root / "b", name="zebra", default=True)
    elif setup == "same-name":
        write_rgb_model(root / "a", name="apple")
        write_rgb_model(root / "b", name="apple")
    target = root / "nowhere" if setup == "missing" else root
    with pytest.raises(ModelConfigError) as caught:
        ModelRegistry.load(target)
    assert str(caught.value) == message.format(root=root)


# --- the servicer's conversions (the gRPC path itself is tested end to end over mTLS) --------------


@pytest.mark.parametrize(
    ("top_k", "outcome"),
    [
        pytest.param(0, 1, id="zero-means-one"),
        pytest.param(1, 1, id="one"),
        pytest.param(10, 10, id="all-labels"),
        pytest.param(11, "top_k must be between 0 and the model's label count 10; got 11", id="too-many"),
        pytest.param(-1, "top_k must be between 0 and the model's label count 10; got -1", id="negative"),
        pytest.param(-(2**31), "top_k must be between 0 and the model's label count 10; got -2147483648",
                     id="int32-min"),
    ],
)
def test_resolve_top_k(top_k: int, outcome: int | str) -> None:
    """top_k 0 means 1; negative or above the label count is INVALID_ARGUMENT."""
    if isinstance(outcome, int):
        assert resolve_top_k(top_k, 10) == outcome
    else:
        with pytest.raises(InvalidArgument) as caught:
            resolve_top_k(top_k, 10)
        assert caught.value.message == outcome


def test_servicer_converts_requests_and_results(tmp_path: Path, heldout: tuple[np.ndarray, np.ndarray]) -> None:
    """ClassifyImage/ClassifyStream answer in order with category, model and top best first;
    ListModels marks the default."""
    copy_digits(tmp_path / "digits")
    write_rgb_model(tmp_path / "colours")
    registry = ModelRegistry.load(tmp_path)
    pixels, labels = heldout
    requests = [classifier_pb2.Image(data=encode(Image.fromarray(p, mode="L")), top_k=3) for p in pixels[:8]]
    requests.append(classifier_pb2.Image(data=pixels[8].tobytes(), width=8, height=8, model="digits"))

    async def stream() -> AsyncIterator[classifier_pb2.Image]:
        for request in requests:
            yield request

    async def scenario(servicer: ImageClassificationServicer) -> tuple[object, list[object], object]:
        single = await servicer.ClassifyImage(requests[0], None)  # type: ignore[arg-type]
        streamed = [r async for r in servicer.ClassifyStream(stream(), None)]  # type: ignore[arg-type]
        listed = await servicer.ListModels(classifier_pb2.ListModelsRequest(), None)  # type: ignore[arg-type]
        return single, streamed, listed

    with ThreadPoolExecutor(max_workers=2) as executor:
        single, streamed, listed = asyncio.run(scenario(ImageClassificationServicer(registry, executor)))

    assert isinstance(single, classifier_pb2.ClassificationResult)
    assert single == streamed[0]
    assert len(streamed) == len(requests)
    for result, label in zip(streamed, labels[:9], strict=True):
        assert isinstance(result, classifier_pb2.ClassificationResult)
        assert result.model == "digits"
        assert (result.top[0].label, result.top[0].probability) == (result.category, result.probability)
        assert [t.probability for t in result.top] == sorted((t.probability for t in result.top), reverse=True)
        assert result.category == str(label)
    assert [len(r.top) for r in streamed] == [3] * 8 + [1]  # type: ignore[attr-defined]
    assert isinstance(listed, classifier_pb2.ListModelsReply)
    assert [(m.name, m.is_default, list(m.input_shape)) for m in listed.models] == [
        ("colours", False, [1, 3, 16, 16]), ("digits", True, [1, 64])]

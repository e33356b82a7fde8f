"""ONNX image classifiers: the per-model configuration, one onnxruntime session per model, a registry.

A model is a directory holding ``model.toml``, the ONNX file and a labels file. Any ONNX image
classifier with one float input laid out as ``flat`` (N, H*W*C), ``NCHW`` or ``NHWC`` and one
(N, labels) output works; everything the server needs to feed it is in ``model.toml``, checked
against the ONNX graph at load so a mismatch stops start-up instead of failing requests. An optional
``[batching]`` table turns on dynamic batching (server/batching.py); a model that cannot batch
without changing its answers is refused then too.
"""

from __future__ import annotations

import enum
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort

from aigis.server.errors import NotFound

CONFIG_FILE = "model.toml"
MAX_IMAGE_SIDE = 4096
MAX_LABELS = 100_000
MAX_BATCH_SIZE = 4096
MAX_QUEUE_DELAY_US = 10_000_000  # 10 s: anything longer is a typo, not a latency budget
MAX_QUEUE_SIZE = 1_000_000
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_E = TypeVar("_E", bound=enum.StrEnum)


class ModelConfigError(ValueError):
    """A model directory the server refuses to load; the message names the file and the key."""


def read_model_toml(path: Path) -> dict[str, Any]:
    """The parsed model.toml at `path`; an unreadable or invalid file raises ModelConfigError naming it."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ModelConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ModelConfigError(f"{path}: not valid TOML: {exc}") from exc


class Layout(enum.StrEnum):
    """How the image tensor is laid out for the model (N is the batch dimension)."""

    FLAT = "flat"  # (N, H*W*C), pixels row-major with channels last
    NCHW = "NCHW"
    NHWC = "NHWC"


class ColorMode(enum.StrEnum):
    """What images are converted to before inference (Pillow mode names)."""

    L = "L"
    RGB = "RGB"

    @property
    def channels(self) -> int:
        return 1 if self is ColorMode.L else 3


class OutputKind(enum.StrEnum):
    """Whether the model ends in a softmax already or the server must apply one."""

    PROBABILITIES = "probabilities"
    LOGITS = "logits"


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """``[batching]`` in model.toml: Triton-style dynamic batching of this model's requests.

    Requests wait in a queue; a batch runs when `max_batch_size` requests are queued, or when the
    oldest has waited `max_queue_delay_us` (0: at once, so batches form only while earlier ones
    are still running). At most `max_queue_size` requests wait; more are refused (RESOURCE_EXHAUSTED).
    """

    enabled: bool = False
    max_batch_size: int = 32
    max_queue_delay_us: int = 0
    max_queue_size: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ModelConfigError(f"batching.enabled: must be true or false, got {self.enabled!r}")
        for key, value, low, high in (
            ("max_batch_size", self.max_batch_size, 1, MAX_BATCH_SIZE),
            ("max_queue_delay_us", self.max_queue_delay_us, 0, MAX_QUEUE_DELAY_US),
            ("max_queue_size", self.max_queue_size, 1, MAX_QUEUE_SIZE),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ModelConfigError(f"batching.{key}: must be an integer from {low} to {high}, got {value!r}")
        if self.max_queue_size < self.max_batch_size:
            # A queue shorter than a batch could never fill one; say so rather than silently wait.
            raise ModelConfigError(f"batching.max_queue_size: must be at least batching.max_batch_size "
                                   f"({self.max_batch_size}), got {self.max_queue_size}")

    @property
    def max_queue_delay(self) -> float:
        """`max_queue_delay_us` in seconds."""
        return self.max_queue_delay_us / 1e6


_NO_BATCHING = BatchingConfig()


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One model's ``model.toml``: input = ((pixel * scale) - mean[c]) / std[c], laid out per `layout`."""

    name: str
    version: str
    input_name: str
    layout: Layout
    width: int
    height: int
    color_mode: ColorMode
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    output_kind: OutputKind
    output_name: str = ""  # empty: the model must have exactly one output
    model_file: str = "model.onnx"
    labels_file: str = "labels.txt"
    default: bool = False
    batching: BatchingConfig = _NO_BATCHING

    def __post_init__(self) -> None:
        # Plain strings from code become the enums (comparisons below are by identity).
        for field, kind in (("layout", Layout), ("color_mode", ColorMode), ("output_kind", OutputKind)):
            object.__setattr__(self, field, kind(getattr(self, field)))
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))
        # Messages name the TOML key, so from_toml only has to prefix the file.
        if not _NAME_RE.fullmatch(self.name):
            raise ModelConfigError(f"name: must be 1-64 of A-Z a-z 0-9 . _ - (not starting with . _ -), "
                                   f"got {self.name!r}")
        if not (0 < len(self.version) <= 64 and self.version.isprintable()):
            raise ModelConfigError(f"version: must be 1-64 printable characters, got {self.version!r}")
        if not self.input_name:
            raise ModelConfigError("input.name: must not be empty")
        for key, side in (("input.width", self.width), ("input.height", self.height)):
            if not 1 <= side <= MAX_IMAGE_SIDE:
                raise ModelConfigError(f"{key}: must be from 1 to {MAX_IMAGE_SIDE}, got {side}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ModelConfigError(f"input.scale: must be a finite number > 0, got {self.scale}")
        channels = self.color_mode.channels
        for key, values in (("input.mean", self.mean), ("input.std", self.std)):
            if len(values) != channels:
                raise ModelConfigError(f"{key}: needs {channels} value(s) for color_mode "
                                       f"{self.color_mode.value!r}, got {len(values)}")
            if not all(math.isfinite(v) for v in values):
                raise ModelConfigError(f"{key}: values must be finite numbers")
        if not all(v > 0 for v in self.std):
            raise ModelConfigError("input.std: values must be > 0")
        for key, file_name in (("model_file", self.model_file), ("labels_file", self.labels_file)):
            # A bare file name keeps every model's files inside its own directory.
            if not file_name or file_name.startswith(".") or Path(file_name).name != file_name \
                    or "\\" in file_name:
                raise ModelConfigError(f"{key}: must be a plain file name in the model directory, "
                                       f"got {file_name!r}")

    @property
    def channels(self) -> int:
        return self.color_mode.channels

    def input_shape(self, batch: int = 1) -> tuple[int, ...]:
        """The tensor shape the server feeds the model for `batch` images."""
        h, w, c = self.height, self.width, self.channels
        if self.layout is Layout.FLAT:
            return (batch, h * w * c)
        if self.layout is Layout.NCHW:
            return (batch, c, h, w)
        return (batch, h, w, c)

    @classmethod
    def from_toml(cls, path: Path) -> ModelConfig:
        """Read and validate `path`; any problem raises ModelConfigError naming the file and key."""
        doc = read_model_toml(path)
        try:
            return cls._from_dict(doc)
        except ModelConfigError as exc:
            raise ModelConfigError(f"{path}: {exc}") from exc

    @classmethod
    def _from_dict(cls, doc: dict[str, Any]) -> ModelConfig:
        top = _Table(doc, "")
        inp = _Table(top.table("input"), "input.")
        out = _Table(top.table("output"), "output.")
        bat = _Table(top.table("batching", {}), "batching.")
        color_mode = inp.choice("color_mode", ColorMode)
        config = cls(
            name=top.string("name"),
            version=top.string("version"),
            default=top.boolean("default", False),
            model_file=top.string("model_file", "model.onnx"),
            labels_file=top.string("labels_file", "labels.txt"),
            input_name=inp.string("name"),
            layout=inp.choice("layout", Layout),
            width=inp.integer("width"),
            height=inp.integer("height"),
            color_mode=color_mode,
            scale=inp.number("scale", 1.0),
            mean=inp.numbers("mean", (0.0,) * color_mode.channels),
            std=inp.numbers("std", (1.0,) * color_mode.channels),
            output_name=out.string("name", ""),
            output_kind=out.choice("kind", OutputKind),
            batching=BatchingConfig(
                enabled=bat.boolean("enabled", _NO_BATCHING.enabled),
                max_batch_size=bat.integer("max_batch_size", _NO_BATCHING.max_batch_size),
                max_queue_delay_us=bat.integer("max_queue_delay_us", _NO_BATCHING.max_queue_delay_us),
                max_queue_size=bat.integer("max_queue_size", _NO_BATCHING.max_queue_size),
            ),
        )
        for table in (top, inp, out, bat):
            table.refuse_unknown()
        return config


_REQUIRED: Any = object()


class _Table:
    """Typed reads from one TOML table that remember which keys were used (typos are errors)."""

    def __init__(self, data: dict[str, Any], prefix: str) -> None:
        self._data = data
        self._prefix = prefix
        self._used: set[str] = set()

    def _get(self, key: str, default: Any) -> Any:
        self._used.add(key)
        if key in self._data:
            return self._data[key]
        if default is _REQUIRED:
            raise ModelConfigError(f"{self._prefix}{key}: missing")
        return default

    def _bad(self, key: str, want: str, value: Any) -> ModelConfigError:
        return ModelConfigError(f"{self._prefix}{key}: must be {want}, got {value!r}")

    def table(self, key: str, default: Any = _REQUIRED) -> dict[str, Any]:
        value = self._get(key, default)
        if not isinstance(value, dict):
            raise self._bad(key, "a table", value)
        return value

    def string(self, key: str, default: Any = None) -> str:
        value = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value

    def integer(self, key: str, default: Any = _REQUIRED) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer", value)
        return value

    def number(self, key: str, default: float) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, "a number", value)
        return float(value)

    def numbers(self, key: str, default: tuple[float, ...]) -> tuple[float, ...]:
        value = self._get(key, default)
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        ):
            raise self._bad(key, "a number or a list of numbers", value)
        return tuple(float(v) for v in value)

    def choice(self, key: str, kind: type[_E]) -> _E:
        value = self._get(key, _REQUIRED)
        try:
            return kind(value)
        except ValueError:
            choices = " | ".join(repr(m.value) for m in kind)
            raise self._bad(key, choices, value) from None

    def refuse_unknown(self) -> None:
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            raise ModelConfigError(f"{self._prefix}{unknown[0]}: unknown key")



@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What ListModels says about a model."""

    name: str
    version: str
    input_shape: tuple[int, ...]
    labels: tuple[str, ...]
    color_mode: str
    image_width: int
    image_height: int


def read_labels(path: Path) -> tuple[str, ...]:
    """One label per line; blank trailing lines are ignored, empty or duplicate labels are refused."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{path}: cannot read labels: {exc}") from exc
    labels = tuple(line.strip() for line in text.rstrip().splitlines())
    if not labels or labels == ("",):
        raise ModelConfigError(f"{path}: no labels")
    if len(labels) > MAX_LABELS:
        raise ModelConfigError(f"{path}: more than {MAX_LABELS} labels")
    for number, label in enumerate(labels, start=1):
        if not label:
            raise ModelConfigError(f"{path}: line {number}: empty label")
    if len(set(labels)) != len(labels):
        raise ModelConfigError(f"{path}: duplicate labels")
    return labels


def session_options(intra_op_threads: int = 1) -> ort.SessionOptions:
    """One thread per run: the server's executor runs requests in parallel, so onnxruntime's own
    thread pool would only oversubscribe a small box (and spin)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: onnxruntime warnings go to stderr, not our log
    return opts


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row maximum so large logits cannot overflow."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class OnnxClassifier:
    """One loaded model: its configuration, labels and a single onnxruntime session.

    `predict` may be called from several threads at once: onnxruntime sessions are thread-safe
    for `run`.
    """

    def __init__(self, config: ModelConfig, labels: tuple[str, ...], session: ort.InferenceSession,
                 output_name: str) -> None:
        self.config = config
        self.labels = labels
        self._session = session
        self._output_name = output_name
        self.info = ModelInfo(
            name=config.name,
            version=config.version,
            input_shape=config.input_shape(1),
            labels=labels,
            color_mode=config.color_mode.value,
            image_width=config.width,
            image_height=config.height,
        )

    @classmethod
    def load(cls, model_dir: Path, *, intra_op_threads: int = 1) -> OnnxClassifier:
        """Load `model_dir`, check the ONNX graph against model.toml and run it once on zeros."""
        model_dir = Path(model_dir)
        config = ModelConfig.from_toml(model_dir / CONFIG_FILE)
        labels = read_labels(model_dir / config.labels_file)
        model_path = model_dir / config.model_file
        try:
            session = ort.InferenceSession(
                str(model_path), sess_options=session_options(intra_op_threads),
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime raises its own unrelated exception types
            raise ModelConfigError(f"{model_path}: onnxruntime cannot load the model: {exc}") from exc
        output_name = _check_signature(session, config, len(labels), model_path)
        classifier = cls(config, labels, session, output_name)
        try:
            probe = classifier.predict(np.zeros(config.input_shape(1), dtype=np.float32))
        except Exception as exc:
            raise ModelConfigError(f"{model_path}: a trial run on a zero image failed: {exc}") from exc
        if probe.shape != (1, len(labels)):
            raise ModelConfigError(f"{model_path}: output shape {probe.shape} does not match "
                                   f"{len(labels)} labels")
        if config.batching.enabled and config.batching.max_batch_size > 1:
            _check_batchable(classifier, model_path)
        return classifier

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def session(self) -> ort.InferenceSession:
        """The session, shared with the Open Inference Protocol's view of this model (server/repository.py)."""
        return self._session

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities, shape (N, labels), for a float32 batch shaped like input_shape(N)."""
        if batch.dtype != np.float32 or batch.shape[1:] != self.config.input_shape(1)[1:]:
            raise ValueError(f"batch must be float32 shaped {self.config.input_shape(len(batch))}, "
                             f"got {batch.dtype} {batch.shape}")
        (out,) = self._session.run([self._output_name], {self.config.input_name: batch})
        out = np.asarray(out, dtype=np.float32).reshape(len(batch), -1)
        if self.config.output_kind is OutputKind.LOGITS:
            out = softmax(out)
        return out

    def top(self, probabilities: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The k best (label, probability) pairs of one probability row, best first; ties keep
        label order so answers are deterministic."""
        order = np.argsort(-probabilities, kind="stable")[:k]
        return [(self.labels[i], float(probabilities[i])) for i in order]


def _check_batchable(model: OnnxClassifier, model_path: Path) -> None:
    """Batching must not change answers: two different images run together must each get the bits
    they get alone.

    A symbolic batch dimension can hide a graph that only runs one image (a Reshape to a constant)
    or one whose rows mix (statistics over the batch). And onnxruntime's CPU Gemm is only
    row-independent because it pre-packs constant weights and then runs the same kernel for any
    batch size; weights that are not constant take MLAS's separate one-row path, whose sums differ
    (measured: most outputs, by up to thousands of ulps). A trial catches all of these at load.
    """
    pair = np.random.default_rng(0).standard_normal(model.config.input_shape(2)).astype(np.float32)
    try:
        together = model.predict(pair)
        alone = np.concatenate([model.predict(pair[:1]), model.predict(pair[1:])])
    except Exception as exc:
        raise ModelConfigError(f"{model_path}: batching.enabled: the model fails on a batch of 2 images "
                               f"({exc}); export it with a dynamic batch dimension, or set enabled = false"
                               ) from exc
    if together.shape != alone.shape:
        raise ModelConfigError(f"{model_path}: batching.enabled: a batch of 2 images gives output shape "
                               f"{together.shape}, not {alone.shape}")
    if together.tobytes() != alone.tobytes():
        raise ModelConfigError(f"{model_path}: batching.enabled: an image's probabilities change with the "
                               f"other images in its batch, so batching would change answers; set "
                               f"enabled = false")


def _check_signature(session: ort.InferenceSession, config: ModelConfig, n_labels: int,
                     model_path: Path) -> str:
    """Refuse a graph whose input or output does not match model.toml; return the output name."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelConfigError(f"{model_path}: the model has {len(inputs)} inputs; exactly 1 is supported")
    (inp,) = inputs
    if inp.name != config.input_name:
        raise ModelConfigError(f"{model_path}: input is named {inp.name!r} but model.toml "
                               f"input.name is {config.input_name!r}")
    if inp.type != "tensor(float)":
        raise ModelConfigError(f"{model_path}: input {inp.name!r} is {inp.type}; tensor(float) is required")
    want = config.input_shape(1)
    got = list(inp.shape)
    # Symbolic (str/None) dimensions accept any size; a fixed batch dimension must be 1.
    if len(got) != len(want) or any(isinstance(g, int) and g != w for g, w in zip(got, want, strict=True)):
        raise ModelConfigError(f"{model_path}: input shape {got} does not match model.toml "
                               f"(layout {config.layout.value!r}, {config.width}x{config.height} "
                               f"{config.color_mode.value}: {list(want)})")
    batching = config.batching
    if batching.enabled and batching.max_batch_size > 1 and isinstance(got[0], int):
        raise ModelConfigError(f"{model_path}: batching.enabled: input {inp.name!r} has a fixed batch "
                               f"dimension {got[0]}, but batching.max_batch_size is {batching.max_batch_size}; "
                               f"export the model with a dynamic (symbolic) first dimension, or set "
                               f"enabled = false")

    outputs = {o.name: o for o in session.get_outputs()}
    if config.output_name:
        if config.output_name not in outputs:
            raise ModelConfigError(f"{model_path}: no output named {config.output_name!r} "
                                   f"(outputs: {sorted(outputs)})")
        out = outputs[config.output_name]
    elif len(outputs) == 1:
        (out,) = outputs.values()
    else:
        raise ModelConfigError(f"{model_path}: the model has {len(outputs)} outputs; "
                               f"set output.name in model.toml")
    if out.type != "tensor(float)":
        raise ModelConfigError(f"{model_path}: output {out.name!r} is {out.type}; tensor(float) is required")
    shape = list(out.shape)
    if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != n_labels):
        raise ModelConfigError(f"{model_path}: output shape {shape} does not match (N, {n_labels} labels)")
    return out.name


class ModelRegistry:
    """Every model the server hosts, by name, and which one answers when a request names none."""

    def __init__(self, models: Mapping[str, OnnxClassifier], default_name: str) -> None:
        # Empty is allowed: a repository of non-image models serves no ClassifyImage (NOT_FOUND).
        if models and default_name not in models:
            raise ValueError(f"default model {default_name!r} is not among the models")
        self._models = dict(sorted(models.items()))
        self.default_name = default_name

    @classmethod
    def load(cls, models_dir: Path, *, intra_op_threads: int = 1) -> ModelRegistry:
        """Load every subdirectory of `models_dir` that holds a model.toml."""
        models_dir = Path(models_dir)
        if not models_dir.is_dir():
            raise ModelConfigError(f"{models_dir}: models directory does not exist")
        dirs = sorted(p for p in models_dir.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())
        if not dirs:
            raise ModelConfigError(f"{models_dir}: no model directories (a subdirectory with {CONFIG_FILE})")
        models: dict[str, OnnxClassifier] = {}
        sources: dict[str, Path] = {}
        for model_dir in dirs:
            model = OnnxClassifier.load(model_dir, intra_op_threads=intra_op_threads)
            if model.name in models:
                raise ModelConfigError(f"{model_dir / CONFIG_FILE}: name: {model.name!r} is already used "
                                       f"by {sources[model.name] / CONFIG_FILE}")
            models[model.name] = model
            sources[model.name] = model_dir
        defaults = sorted(name for name, m in models.items() if m.config.default)
        if len(defaults) > 1:
            raise ModelConfigError(f"{models_dir}: default: more than one model says default = true "
                                   f"({', '.join(defaults)})")
        return cls(models, defaults[0] if defaults else min(models))

    @property
    def models(self) -> tuple[OnnxClassifier, ...]:
        """All models, ordered by name."""
        return tuple(self._models.values())

    def get(self, name: str) -> OnnxClassifier:
        """The model called `name`; the default model for ""."""
        model = self._models.get(name or self.default_name)
        if model is None:
            # The name is the caller's own input; not echoed, so nothing odd lands in logs or clients.
            raise NotFound("unknown model: ListModels names the models this server hosts")
        return model


def model_toml(config: ModelConfig, header: str, *, with_batching: bool = False) -> str:
    """model.toml text for `config` (floats written with repr, so they load back exactly).

    The writers of generated models (tools/train_digits.py, tools/make_cnn.py) share this, so what
    they write is always what `ModelConfig.from_toml` reads.
    """

    def floats(values: tuple[float, ...]) -> str:
        return "[" + ", ".join(repr(v) for v in values) + "]"

    text = (
        f"# {header}\n"
        f'name = "{config.name}"\n'
        f'version = "{config.version}"\n'
        f"default = {'true' if config.default else 'false'}\n"
        f'model_file = "{config.model_file}"\n'
        f'labels_file = "{config.labels_file}"\n'
        "\n"
        "# input = (pixel * scale - mean[c]) / std[c], pixels 0..255 after conversion and resizing.\n"
        "[input]\n"
        f'name = "{config.input_name}"\n'
        f'layout = "{config.layout.value}"\n'
        f"width = {config.width}\n"
        f"height = {config.height}\n"
        f'color_mode = "{config.color_mode.value}"\n'
        f"scale = {config.scale!r}\n"
        f"mean = {floats(config.mean)}\n"
        f"std = {floats(config.std)}\n"
        "\n"
        "[output]\n"
        f'name = "{config.output_name}"\n'
        f'kind = "{config.output_kind.value}"\n'
    )
    if with_batching:
        batching = config.batching
        text += (
            "\n"
            "[batching]\n"
            f"enabled = {'true' if batching.enabled else 'false'}\n"
            f"max_batch_size = {batching.max_batch_size}\n"
            f"max_queue_delay_us = {batching.max_queue_delay_us}\n"
            f"max_queue_size = {batching.max_queue_size}\n"
        )
    return text

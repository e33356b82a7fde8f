"""The model repository: every ONNX model in the models directory, by name and version.

Three layouts load as they are (each subdirectory of the models directory is one model):

- ``<model>/model.onnx`` alone: served under the directory's name, version "1", its signature
  (input/output names, datatypes, shapes) read from the onnxruntime session.
- ``<model>/<version>/model.onnx`` (Triton's layout; versions are positive integers): every version
  is served, a request without a version gets the highest. Triton's ``config.pbtxt`` is ignored.
- ``<model>/model.toml`` with an ``[input]`` table: an image classifier (server/model.py) reachable
  through ClassifyImage *and* ModelInfer, one session for both.

``model.toml`` is optional for the first two and says what the file cannot: ``name``, ``version``
(single-version layout only), ``default``, ``model_file`` and ``[batching]``. Everything is checked
at load (a trial run on zeros, and a batching trial when batching is on), so a broken model stops
start-up instead of failing requests.
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from aigis.auth.policy import ModelRef
from aigis.inference.tensors import DATATYPES, ONNX_DATATYPES, TensorSpec
from aigis.server.errors import InvalidArgument, NotFound
from aigis.server.model import (
    _NAME_RE,
    CONFIG_FILE,
    BatchingConfig,
    ModelConfigError,
    ModelRegistry,
    OnnxClassifier,
    _Table,
    read_model_toml,
    session_options,
)

MODEL_FILE = "model.onnx"
PLATFORM = "onnxruntime_onnx"
_VERSION_MAX = 10**12
_NO_BATCHING = BatchingConfig()
# A model whose trial run (median of 5) takes at most this long runs small requests on the event
# loop: a thread hop costs more (~50-100 µs round trip) than the model (digits: ~7 µs).
INLINE_MAX_SECONDS = 50e-6


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """The general part of a model.toml (no [input] table): what the ONNX file cannot say."""

    name: str = ""
    version: str = ""
    default: bool = False
    model_file: str = MODEL_FILE
    batching: BatchingConfig = _NO_BATCHING

    @staticmethod
    def from_toml(path: Path) -> ModelSettings:
        doc = read_model_toml(path)
        try:
            top = _Table(doc, "")
            bat = _Table(top.table("batching", {}), "batching.")
            default = _NO_BATCHING
            settings = ModelSettings(
                name=top.string("name", ""),
                version=top.string("version", ""),
                default=top.boolean("default", False),
                model_file=top.string("model_file", MODEL_FILE),
                batching=BatchingConfig(
                    enabled=bat.boolean("enabled", default.enabled),
                    max_batch_size=bat.integer("max_batch_size", default.max_batch_size),
                    max_queue_delay_us=bat.integer("max_queue_delay_us", default.max_queue_delay_us),
                    max_queue_size=bat.integer("max_queue_size", default.max_queue_size),
                ),
            )
            top.refuse_unknown()
            bat.refuse_unknown()
        except ModelConfigError as exc:
            raise ModelConfigError(f"{path}: {exc}") from exc
        file_name = settings.model_file
        if not file_name or file_name.startswith(".") or Path(file_name).name != file_name or "\\" in file_name:
            raise ModelConfigError(f"{path}: model_file: must be a plain file name in the model directory, "
                                   f"got {file_name!r}")
        return settings


def _specs(args: Sequence[Any], where: str, what: str) -> tuple[TensorSpec, ...]:
    specs = []
    for arg in args:
        datatype = ONNX_DATATYPES.get(arg.type)
        if datatype is None:
            raise ModelConfigError(f"{where}: {what} {arg.name!r} has type {arg.type}, which the Open Inference "
                                   f"Protocol cannot carry")
        shape = None if arg.shape is None else tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
        specs.append(TensorSpec(arg.name, datatype, shape))
    return tuple(specs)


def _trial_inputs(specs: Sequence[TensorSpec], batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs of the model's signature: variable dimensions 1 (the first one `batch`), small values."""
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        dims = spec.shape if spec.shape is not None else (-1,)
        shape = tuple((batch if i == 0 else 1) if d == -1 else d for i, d in enumerate(dims))
        dt = DATATYPES[spec.datatype]
        if spec.datatype == "BYTES":
            array = np.full(shape, b"", dtype=object)
        elif dt.dtype.kind == "f":
            array = rng.standard_normal(shape).astype(dt.dtype)
        elif dt.dtype.kind == "b":
            array = rng.integers(0, 2, shape).astype(bool)
        else:
            array = rng.integers(0, 2, shape).astype(dt.dtype)
        out[spec.name] = array
    return out


class OnnxModel:
    """One version of one model: an onnxruntime session and its protocol signature.

    `run` may be called from several threads at once (onnxruntime sessions are thread-safe).
    """

    def __init__(self, name: str, version: str, session: ort.InferenceSession, *,
                 batching: BatchingConfig = _NO_BATCHING, default: bool = False,
                 classifier: OnnxClassifier | None = None, source: str = "") -> None:
        self.name = name
        self.version = version
        self.session = session
        self.batching = batching
        self.default = default
        self.classifier = classifier
        self.inputs = _specs(session.get_inputs(), source, "input")
        self.outputs = _specs(session.get_outputs(), source, "output")
        self.output_names = tuple(s.name for s in self.outputs)
        # Requests with at most this many input elements run on the event loop (set by `check`).
        self.inline_max_elements = 0

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.version)

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """The named outputs for `inputs` (already checked against the signature)."""
        feed = dict(inputs)
        for spec in self.inputs:
            if spec.datatype == "BYTES":
                feed[spec.name] = _utf8(spec.name, feed[spec.name])
        try:
            values = self.session.run(list(outputs), feed)
        except Exception as exc:  # onnxruntime's own exception types; the client's tensors caused it
            # The signature check passed, so the tensors disagree with each other or with what the
            # graph needs inside (e.g. two variable dimensions that must be equal). Not echoed:
            # onnxruntime's text names graph internals.
            raise InvalidArgument(f"model {self.name!r} cannot run on these inputs (their shapes fit the "
                                  f"signature but not each other, or values are out of the model's range)"
                                  ) from exc
        return {name: np.asarray(value) for name, value in zip(outputs, values, strict=True)}

    def batch_size(self, inputs: Mapping[str, np.ndarray]) -> int:
        """The first dimension all inputs share (for dynamic batching); InvalidArgument when they differ."""
        sizes = {a.shape[0] if a.ndim else 0 for a in inputs.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise InvalidArgument(f"model {self.name!r} batches on the first dimension: every input needs the "
                                  f"same non-zero first dimension, got {sorted(sizes)}")
        return sizes.pop()

    @classmethod
    def load(cls, path: Path, name: str, version: str, settings: ModelSettings) -> OnnxModel:
        try:
            session = ort.InferenceSession(str(path), sess_options=session_options(),
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelConfigError(f"{path}: onnxruntime cannot load the model: {exc}") from exc
        model = cls(name, version, session, batching=settings.batching, default=settings.default, source=str(path))
        model.check(path)
        return model

    def check(self, path: Path) -> None:
        """A trial run, and for batching a trial that batching leaves every row's bits unchanged."""
        rng = np.random.default_rng(0)
        trial = _trial_inputs(self.inputs, 1, rng)
        try:
            timings = []
            for _ in range(5):
                started = time.perf_counter()
                self.session.run(None, trial)
                timings.append(time.perf_counter() - started)
        except Exception as exc:
            raise ModelConfigError(f"{path}: a trial run on inputs of its signature failed: {exc}") from exc
        # Cheap enough to run on the event loop for inputs no larger than the trial's (server/inference.py).
        if sorted(timings)[2] <= INLINE_MAX_SECONDS:
            self.inline_max_elements = sum(a.size for a in trial.values())
        batching = self.batching
        if not (batching.enabled and batching.max_batch_size > 1):
            return
        for spec in (*self.inputs, *self.outputs):
            if spec.shape is None or not spec.shape or spec.shape[0] != -1:
                raise ModelConfigError(f"{path}: batching.enabled: {spec.name!r} has no variable first (batch) "
                                       f"dimension; export the model with one, or set enabled = false")
        pair = _trial_inputs(self.inputs, 2, rng)
        try:
            together = self.session.run(None, pair)
            alone = [self.session.run(None, {k: v[i:i + 1] for k, v in pair.items()}) for i in (0, 1)]
        except Exception as exc:
            raise ModelConfigError(f"{path}: batching.enabled: the model fails on a batch of 2 ({exc})") from exc
        for i, out in enumerate(together):
            joined = np.concatenate([alone[0][i], alone[1][i]])
            if out.shape != joined.shape or out.tobytes() != joined.tobytes():
                raise ModelConfigError(f"{path}: batching.enabled: output {self.outputs[i].name!r} of a row "
                                       f"changes with the other rows in its batch, so batching would change "
                                       f"answers; set enabled = false")


def _utf8(name: str, array: np.ndarray) -> np.ndarray:
    """ONNX string tensors hold text: BYTES elements must be UTF-8 (onnxruntime would str() bytes)."""
    try:
        return np.array([bytes(item).decode("utf-8") for item in array.reshape(-1)], dtype=object).reshape(
            array.shape)
    except UnicodeDecodeError:
        raise InvalidArgument(f"input {name!r}: the model takes text; BYTES elements must be UTF-8") from None


def _bounded(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "\u2026"


def _version_key(version: str) -> tuple[int, int, str]:
    """Numeric versions order by value and above non-numeric ones."""
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


def _load_dir(model_dir: Path) -> list[OnnxModel]:
    """Every version in one model directory (see the module docstring for the layouts)."""
    toml = model_dir / CONFIG_FILE
    if toml.is_file():
        with toml.open("rb") as f:
            try:
                is_classifier = "input" in tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise ModelConfigError(f"{toml}: not valid TOML: {exc}") from exc
        if is_classifier:
            classifier = OnnxClassifier.load(model_dir)
            config = classifier.config
            model = OnnxModel(config.name, config.version, classifier.session, batching=config.batching,
                              default=config.default, classifier=classifier, source=str(model_dir))
            model.check(model_dir / config.model_file)
            return [model]
        settings = ModelSettings.from_toml(toml)
    else:
        settings = ModelSettings()
    name = settings.name or model_dir.name
    if not _NAME_RE.fullmatch(name):
        raise ModelConfigError(f"{model_dir}: model name {name!r} must be 1-64 of A-Z a-z 0-9 . _ - "
                               f"(not starting with . _ -); set name in {CONFIG_FILE}")
    versions = sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()),
                      key=lambda p: int(p.name))
    single = model_dir / settings.model_file
    if versions:
        if settings.version:
            raise ModelConfigError(f"{toml}: version: the versions are the numbered subdirectories; remove it")
        if single.is_file():
            raise ModelConfigError(f"{model_dir}: holds both {settings.model_file} and numbered version "
                                   f"directories; keep one layout")
        models = []
        for version_dir in versions:
            if not 0 < int(version_dir.name) < _VERSION_MAX:
                raise ModelConfigError(f"{version_dir}: versions must be integers from 1 to {_VERSION_MAX - 1}")
            path = version_dir / settings.model_file
            if not path.is_file():
                raise ModelConfigError(f"{version_dir}: no {settings.model_file}")
            models.append(OnnxModel.load(path, name, str(int(version_dir.name)), settings))
        return models
    if not single.is_file():
        raise ModelConfigError(f"{model_dir}: no {settings.model_file} and no numbered version directories")
    version = settings.version or "1"
    if not (0 < len(version) <= 64 and version.isprintable() and "/" not in version):
        raise ModelConfigError(f"{toml}: version: must be 1-64 printable characters without '/', got {version!r}")
    return [OnnxModel.load(single, name, version, settings)]


def is_model_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and (
        (path / CONFIG_FILE).is_file() or (path / MODEL_FILE).is_file()
        or any(p.is_dir() and p.name.isdigit() for p in path.iterdir())
    )


class ModelRepository:
    """Every model version the server hosts, and which model answers when a request names none."""

    def __init__(self, models: Sequence[OnnxModel], default_name: str) -> None:
        self._versions: dict[str, dict[str, OnnxModel]] = {}
        for model in models:
            versions = self._versions.setdefault(model.name, {})
            if model.version in versions:
                raise ModelConfigError(f"model {model.name!r} version {model.version!r} is defined twice")
            versions[model.version] = model
        self._versions = {
            name: dict(sorted(v.items(), key=lambda item: _version_key(item[0])))
            for name, v in sorted(self._versions.items())
        }
        if default_name not in self._versions:
            raise ValueError(f"default model {default_name!r} is not among the models")
        self.default_name = default_name

    @classmethod
    def load(cls, models_dir: Path) -> ModelRepository:
        """Load every model directory under `models_dir` (blocking: at start-up or in a thread)."""
        models_dir = Path(models_dir)
        if not models_dir.is_dir():
            raise ModelConfigError(f"{models_dir}: models directory does not exist")
        dirs = sorted(p for p in models_dir.iterdir() if is_model_dir(p))
        if not dirs:
            raise ModelConfigError(f"{models_dir}: no model directories (a subdirectory with {MODEL_FILE}, "
                                   f"{CONFIG_FILE} or numbered version directories)")
        models: list[OnnxModel] = []
        sources: dict[str, Path] = {}
        for model_dir in dirs:
            loaded = _load_dir(model_dir)
            name = loaded[0].name
            if name in sources:
                raise ModelConfigError(f"{model_dir}: model name {name!r} is already used by {sources[name]}")
            sources[name] = model_dir
            models += loaded
        defaults = sorted({m.name for m in models if m.default})
        if len(defaults) > 1:
            raise ModelConfigError(f"{models_dir}: default: more than one model says default = true "
                                   f"({', '.join(defaults)})")
        if defaults:
            default = defaults[0]
        else:
            classifiers = sorted(m.name for m in models if m.classifier is not None)
            default = (classifiers or sorted(m.name for m in models))[0]
        return cls(models, default)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._versions)

    def versions(self, name: str) -> tuple[str, ...]:
        """A model's versions, oldest first; () for an unknown model."""
        return tuple(self._versions.get(name, ()))

    def newest(self) -> tuple[OnnxModel, ...]:
        """The newest version of every model, by name."""
        return tuple(v[next(reversed(v))] for v in self._versions.values())

    def all(self) -> tuple[OnnxModel, ...]:
        return tuple(m for v in self._versions.values() for m in v.values())

    def resolve(self, name: str, version: str = "") -> ModelRef:
        """What a request names, as authorization sees it: never raises, never says whether it exists
        (an unknown model keeps its name and the version asked for)."""
        # Names are the caller's input and land in the audit log: bounded (no real name is longer).
        name = _bounded(name or self.default_name)
        version = _bounded(version)
        if not version:
            versions = self._versions.get(name)
            if versions:
                version = next(reversed(versions))
        return ModelRef(name, version)

    def get(self, name: str, version: str = "") -> OnnxModel:
        """The model version a request names (NotFound when there is none)."""
        ref = self.resolve(name, version)
        model = self._versions.get(ref.name, {}).get(ref.version)
        if model is None:
            # Not echoed: the names are the caller's input. ModelMetadata/ListModels name what exists.
            raise NotFound("unknown model or version")
        return model

    def classifiers(self) -> ModelRegistry:
        """The image classifiers (newest version of each) for ClassifyImage/ListModels."""
        found = {m.name: m.classifier for m in self.newest() if m.classifier is not None}
        default = self.default_name if self.default_name in found else min(found, default="")
        return ModelRegistry(found, default)

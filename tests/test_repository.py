"""The model repository: which directory layouts load, and what is refused at start-up (with the file named)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from onnx_models import write_affine

from aigis.auth.policy import ModelRef
from aigis.server.config import BUNDLED_MODELS
from aigis.server.errors import NotFound
from aigis.server.model import ModelConfigError
from aigis.server.repository import ModelRepository


def test_plain_triton_and_classifier_layouts_load_together(tmp_path: Path) -> None:
    """model.onnx alone, Triton's <model>/<version>/ and a classifier's model.toml, side by side."""
    shutil.copytree(BUNDLED_MODELS / "digits", tmp_path / "digits")
    write_affine(tmp_path / "plain" / "model.onnx")
    for version in ("1", "2", "10"):
        write_affine(tmp_path / "tri" / version / "model.onnx")
    (tmp_path / "tri" / "config.pbtxt").write_text('name: "tri"\nplatform: "onnxruntime_onnx"\n')
    repo = ModelRepository.load(tmp_path)
    assert repo.names == ("digits", "plain", "tri")
    assert repo.versions("tri") == ("1", "2", "10")  # by value, not as text
    assert repo.get("tri").version == "10"
    assert repo.default_name == "digits"  # the classifier that says default = true
    assert [m.name for m in repo.classifiers().models] == ["digits"]


def test_resolution_never_reveals_existence(tmp_path: Path) -> None:
    """resolve() fills in the default model and the newest version; an unknown model keeps its name."""
    write_affine(tmp_path / "tri" / "3" / "model.onnx")
    repo = ModelRepository.load(tmp_path)
    assert repo.resolve("") == ModelRef("tri", "3")
    assert repo.resolve("tri", "1") == ModelRef("tri", "1")
    assert repo.resolve("nope") == ModelRef("nope", "")
    with pytest.raises(NotFound, match="unknown model or version"):
        repo.get("tri", "1")
    assert repo.classifiers().models == ()  # no image model: ClassifyImage answers NOT_FOUND


def test_general_model_toml_names_versions_and_batching(tmp_path: Path) -> None:
    """A model.toml without [input] may set name, version, default and [batching]."""
    write_affine(tmp_path / "dir" / "net.onnx")
    (tmp_path / "dir" / "model.toml").write_text(
        'name = "renamed"\nversion = "2024-06"\ndefault = true\nmodel_file = "net.onnx"\n'
        "[batching]\nenabled = true\nmax_batch_size = 4\n"
    )
    model = ModelRepository.load(tmp_path).get("renamed")
    assert (model.version, model.default, model.batching.max_batch_size) == ("2024-06", True, 4)


BROKEN = {
    "both-layouts": (lambda d: (write_affine(d / "m" / "model.onnx"), write_affine(d / "m" / "1" / "model.onnx")),
                     "keep one layout"),
    "version-without-file": (lambda d: (d / "m" / "1").mkdir(parents=True), "no model.onnx"),
    "version-zero": (lambda d: write_affine(d / "m" / "0" / "model.onnx"), "versions must be integers from 1"),
    "bad-name": (lambda d: write_affine(d / "-m" / "model.onnx"), "model name '-m'"),
    "unknown-key": (lambda d: (write_affine(d / "m" / "model.onnx"), (d / "m" / "model.toml").write_text("colour = 1")),
                    "colour: unknown key"),
    "not-onnx": (lambda d: (d / "m").mkdir() or (d / "m" / "model.onnx").write_bytes(b"junk"),
                 "onnxruntime cannot load the model"),
    "duplicate-name": (lambda d: (write_affine(d / "a" / "model.onnx"), write_affine(d / "b" / "model.onnx"),
                                  (d / "b" / "model.toml").write_text('name = "a"')), "is already used"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_repository_stops_startup(tmp_path: Path, case: str) -> None:
    """Every broken layout is refused at load with a message naming the problem."""
    make, message = BROKEN[case]
    make(tmp_path)
    with pytest.raises(ModelConfigError, match=message.replace("(", r"\(")):
        ModelRepository.load(tmp_path)

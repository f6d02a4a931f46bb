"""Atomic writes with the modes of a plain open/mkdir (deeplab_tf/files.py), and the
outputs of export, training, evaluation and prediction readable by other users."""

import io
import json
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deeplab_tf import files
from deeplab_tf.data.specs import SPECS
from deeplab_tf.export import export
from deeplab_tf.inference import Predictor
from deeplab_tf.prediction import predict_files
from tests.helpers import assert_tree_modes, file_mode, tiny_model, umask


@pytest.mark.parametrize("mask, directory, regular", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_modes_follow_the_umask(tmp_path, mask, directory, regular):
    class Model:  # what save_model_atomic needs of a Keras model
        def save(self, path):
            Path(path).write_bytes(b"zip")

    with umask(mask):
        files.write_json_atomic(tmp_path / "a" / "config.json", {"x": 1})
        files.write_text_atomic(tmp_path / "a" / "table.md", "| x |\n")
        files.save_model_atomic(Model(), tmp_path / "a" / "best.keras")
        tmp = files.temporary_dir(tmp_path / "out")
        (tmp / "inside.txt").write_text("x")
        files.replace_dir(tmp, tmp_path / "out")
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == {"x": 1}
    for name in ("config.json", "table.md", "best.keras"):
        assert file_mode(tmp_path / "a" / name) == regular, name
    assert file_mode(tmp_path / "out") == directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "out"]  # no temporary left
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "best.keras", "config.json", "table.md"
    ]  # fmt: skip


def _write_half_through_a_file(path):
    with files.atomic_file(path) as f:
        f.write('{"new": ')
        raise RuntimeError("killed half way")


def _write_half_through_a_path(path):  # as Keras, PIL or a TFLite writer would
    with files.atomic_path(path, suffix=".keras") as tmp:
        tmp.write_text('{"new": ')
        raise RuntimeError("killed half way")


@pytest.mark.parametrize("write", [_write_half_through_a_file, _write_half_through_a_path])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, write):
    path = tmp_path / "results.json"
    files.write_json_atomic(path, {"old": True})
    with pytest.raises(RuntimeError, match="half way"):
        write(path)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_replace_dir_replaces_only_when_complete(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "old.txt").write_text("old")
    tmp = files.temporary_dir(out)
    (tmp / "new.txt").write_text("new")
    files.replace_dir(tmp, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(tiny_model(SPECS["shapes"].num_classes))


def test_an_export_is_readable_by_another_user(predictor, tmp_path):
    """TF Serving often runs as its own user: every path down to variables/ must be
    readable (and directories searchable) by others under umask 022."""
    with umask(0o022):
        done = export(
            predictor, tmp_path, formats=("savedmodel", "keras"), name="net",
            spec=SPECS["shapes"], log=lambda *_: None,
        )  # fmt: skip
    assert_tree_modes(tmp_path / "net")
    for path in [done.path, done.path / "saved_model.pb", done.path / "variables"]:
        assert file_mode(path) & stat.S_IROTH, path


def test_prediction_outputs_are_readable(predictor, tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    with umask(0o022):
        predict_files(
            predictor, [str(tmp_path / "photo.png")], tmp_path / "out", SPECS["shapes"],
            stream=io.StringIO(),
        )  # fmt: skip
    assert_tree_modes(tmp_path / "out")

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import predict
from deeplab_tf.data.specs import SPECS
from deeplab_tf.inference import Predictor
from tests.helpers import needs_bfloat16, tiny_model, write_model_dir
from tests.tolerances import sum_to_one_atol

rng = np.random.default_rng(11)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tiny_model(6), tmp_path_factory.mktemp("run") / "run", data_dir=None)


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """Two readable images and a broken one in a folder, a third image elsewhere."""
    folder, other = tmp_path / "images", tmp_path / "other"
    folder.mkdir()
    other.mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / "a.jpg")
    rgba = rng.integers(0, 256, (33, 47, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "b.png")  # converted to RGB
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    Image.fromarray(rng.integers(0, 256, (50, 35, 3), dtype=np.uint8)).save(other / "c.jpg")
    return {"folder": folder, "other": other}


def _run(capsys, *args):
    code = predict.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_predicts_each_image_and_skips_unreadable_ones(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = _run(
        capsys, inputs["folder"], inputs["other"] / "*.jpg", tmp_path / "missing.png",
        "--checkpoint", model_dir, "--output-dir", out, "--dataset", "shapes",
        "--output-stride", "8", "--flip", "--save-probabilities",
    )  # fmt: skip
    assert code == 1, err  # some inputs were skipped
    assert "broken.jpg: unreadable image" in err and "missing.png: no such file" in err
    assert "3 images predicted, 2 skipped" in stdout and str(out) in stdout

    predictor = Predictor(model_dir, output_stride=8, flip=True)
    palette = SPECS["shapes"].palette()
    for name, source in [("a", "images/a.jpg"), ("b", "images/b.png"), ("c", "other/c.jpg")]:
        image = np.asarray(Image.open(tmp_path / source).convert("RGB"))
        with Image.open(out / f"{name}.png") as mask:
            assert mask.mode == "P"
            np.testing.assert_array_equal(np.array(mask.getpalette()).reshape(-1, 3)[:256], palette)
            labels = np.asarray(mask)
        np.testing.assert_array_equal(labels, predictor.predict_labels(image))
        probabilities = np.load(out / f"{name}_probabilities.npy")
        assert probabilities.shape == (*image.shape[:2], 6)
        np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=sum_to_one_atol(6))
        np.testing.assert_array_equal(probabilities.argmax(-1), labels)
        with Image.open(out / f"{name}_overlay.jpg") as overlay:
            assert overlay.width > image.shape[1] and overlay.height >= image.shape[0]  # legend
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(i["input"]).name for i in summary["images"]] == ["a.jpg", "b.png", "c.jpg"]
    assert len(summary["skipped"]) == 2 and summary["inference"]["output_stride"] == 8
    assert (out / "legend.png").is_file()
    assert not list(tmp_path.glob(".out.tmp-*"))  # the temporary directory was renamed


def test_existing_output_dir_is_not_touched(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_text("mine")
    code, _, err = _run(capsys, inputs["folder"], "--checkpoint", model_dir, "--output-dir", out)
    assert code == 2 and len(err.splitlines()) == 1 and "pass --overwrite" in err, err
    assert [p.name for p in out.iterdir()] == ["a.png"] and (out / "a.png").read_text() == "mine"

    code, _, err = _run(
        capsys, inputs["other"], "--checkpoint", model_dir, "--output-dir", out, "--overwrite"
    )
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "c.png", "c_overlay.jpg", "legend.png", "summary.json",
    ]  # fmt: skip


def test_output_dir_holding_the_inputs_is_refused(model_dir, inputs, capsys):
    folder = inputs["folder"]
    before = sorted(p.name for p in folder.iterdir())
    code, _, err = _run(
        capsys, folder, "--checkpoint", model_dir, "--output-dir", folder, "--overwrite"
    )
    assert code == 2 and "contains input" in err, err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_checkpoint_for_other_classes(model_dir, inputs, tmp_path, capsys):
    args = ["--checkpoint", model_dir, "--output-dir", tmp_path / "out", "--dataset", "cityscapes"]
    code, _, err = _run(capsys, inputs["other"], *args)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "predicts 6 classes but dataset 'cityscapes' has 19" in err
    assert not (tmp_path / "out").exists()


def test_nothing_readable(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(capsys, tmp_path / "nope", "--checkpoint", model_dir, "--output-dir", out)
    assert code == 2 and "no images to predict (" in err and "no such file" in err.splitlines()[-1]
    code, _, err = _run(
        capsys, inputs["folder"] / "broken.jpg", "--checkpoint", model_dir, "--output-dir", out
    )
    assert code == 2 and "none of the 1 images could be read" in err.splitlines()[-1], err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_no_dataset_gives_numbered_classes_and_voc_colours(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--checkpoint", model_dir, "--output-dir", out, "--legend", "file"]
    code, _, err = _run(capsys, inputs["other"], *args)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["class_names"] == [f"class {i}" for i in range(6)]
    with Image.open(out / "c_overlay.jpg") as overlay:
        assert overlay.size == (35, 50)  # no legend beside it with --legend file


@pytest.mark.parametrize("available", [pytest.param(True, marks=needs_bfloat16), False])
def test_precision_flag(model_dir, inputs, tmp_path, capsys, caplog, monkeypatch, available):
    """--precision bfloat16 runs the network in bfloat16 where the CPU computes it;
    elsewhere float32, with one log line saying why (the summary says which ran)."""
    reason = None if available else "this CPU has no bfloat16 instructions"
    monkeypatch.setattr("deeplab_tf.precision.bfloat16_unavailable", lambda: reason)
    out = tmp_path / "out"
    code, _, err = _run(capsys, inputs["other"] / "c.jpg", "--checkpoint", model_dir,
                        "--output-dir", out, "--precision", "bfloat16")  # fmt: skip
    assert code == 0, err
    ran = "bfloat16" if available else "float32"
    assert json.loads((out / "summary.json").read_text())["inference"]["precision"] == ran
    notes = [r.getMessage() for r in caplog.records if r.name == "deeplab_tf.inference"]
    assert notes == ([] if available else [
        f"bfloat16 inference is not available: {reason}; running float32"
    ])  # fmt: skip
    image = np.asarray(Image.open(inputs["other"] / "c.jpg").convert("RGB"))
    with Image.open(out / "c.png") as mask:
        labels = np.asarray(mask)
    expected = Predictor(model_dir, precision="bfloat16").predict_labels(image)
    np.testing.assert_array_equal(labels, expected)

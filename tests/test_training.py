import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import evaluate as evaluate_cli
import train
from deeplab_tf import get_variant
from deeplab_tf.data import pipeline
from deeplab_tf.data.shapes import ensure_shapes_tfrecords
from deeplab_tf.evaluation import evaluate
from deeplab_tf.inference import Predictor
from deeplab_tf.recipes import get_recipe
from deeplab_tf.training import TrainConfig, TrainingError, check_config
from deeplab_tf.training import run as training_run
from deeplab_tf.training import train as run_training
from tests.helpers import ROOT, assert_close_relative, assert_tree_modes, needs_bfloat16, umask

# The quickstart's small ResNet: of the variants, the one that traces and trains
# fastest on a CPU (12 batch norms in the backbone against MobileNetV2's 51).
SMALL_VARIANT = "deeplabv3-resnet10-cpu"
SMALL = get_variant(SMALL_VARIANT)
# Its v3+ sibling (the same encoder and a decoder at stride 4): the runs below that are
# not about the network (resume, MirroredStrategy, mixed precision) take it, so that
# the decoder goes through them too; the others keep the v3 model.
SMALL_DECODER_VARIANT = "deeplabv3plus-resnet10-cpu"
# A hundred steps on whole 48x48 images.
TINY_RECIPE = dataclasses.replace(
    get_recipe("shapes-cpu"),
    crop_size=48,
    batch_size=8,
    output_stride=16,
    steps=100,
    checkpoint_every=50,
    min_scale=1.0,
    max_scale=1.0,
    optimizer="adam",
    learning_rate=0.003,
    bn_momentum=0.9,  # moving statistics must settle within the short run
)
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    return ensure_shapes_tfrecords(root, num_train=24, num_val=8, image_size=48)


def _history(model_dir: Path) -> list[dict[str, float]]:
    lines = (model_dir / "history.csv").read_text().splitlines()
    keys = lines[0].split(",")
    # Keras's CSVLogger writes NA for validation columns of epochs that had none.
    values = [
        [float("nan") if v == "NA" else float(v) for v in line.split(",")] for line in lines[1:]
    ]
    return [dict(zip(keys, row, strict=True)) for row in values]


def test_loss_falls_and_miou_beats_chance(tiny_shapes, tmp_path, monkeypatch):
    """Fits the training images: the loss falls and the mean IoU on them beats
    predicting the majority class everywhere (the chance level of this metric). The
    run itself validates on the held-out split, as every recipe must, and its
    results.json is fit's last validation, not a second pass over the split: the
    scores evaluate.py computes on the final weights."""

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the final validation ran again after fit")

    monkeypatch.setattr(training_run, "evaluate", no_second_pass)
    config = TrainConfig(
        variant=SMALL,
        recipe=TINY_RECIPE,
        model_dir=str(tmp_path / "run"),
        data_dir=str(tiny_shapes),
        verbose=0,
    )
    with umask(0o022):
        results = run_training(config)
    history = _history(tmp_path / "run")
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    frequency = json.loads((tiny_shapes / "manifest.json").read_text())["splits"]["train"]
    frequency = np.array(frequency["class_pixel_frequency"])
    chance = frequency.max() / len(frequency)  # all background: IoU = its frequency, others 0
    on_train = evaluate(Predictor(tmp_path / "run"), tiny_shapes, "train", progress=False)
    assert on_train.results["mean_iou"] > chance + 0.05, (on_train.results["mean_iou"], chance)
    assert results["split"] == "val" and 0 <= results["mean_iou"] <= 1
    assert results["steps"] == TINY_RECIPE.steps
    final = evaluate(Predictor(tmp_path / "run" / "last.keras"), tiny_shapes, "val", progress=False)
    assert results["confusion_matrix"] == final.results["confusion_matrix"]
    assert results["class_names"] == final.results["class_names"]
    for name in ("best.keras", "last.keras", "results.json", "config.json", "history.csv"):
        assert (tmp_path / "run" / name).is_file()
    assert_tree_modes(tmp_path / "run")  # what mkdir and open give under umask 022


def test_images_are_padded_with_what_the_model_normalises_to_zero(
    tiny_shapes, tmp_path, monkeypatch
):
    """The small ResNet scales pixels to [-1, 1]: crops and batches are padded with
    127.5, not the ImageNet mean of the Caffe normalisation (issue 18)."""
    seen = {}

    def record(*args):
        seen["mean_pixel"] = args[-1]
        raise KeyboardInterrupt  # stop before any data work

    monkeypatch.setattr(training_run, "inputs", record)
    config = TrainConfig(SMALL, TINY_RECIPE, str(tmp_path / "run"), str(tiny_shapes), verbose=0)
    with pytest.raises(KeyboardInterrupt):
        run_training(config)
    assert seen["mean_pixel"] == (127.5, 127.5, 127.5)


def test_the_seed_decides_the_initial_weights_whatever_the_checks_draw(
    tiny_shapes, tmp_path, monkeypatch
):
    """The checks before training build models (check_memory's estimate) and so draw
    from Keras's seeded generator: the seed is set after them, so the same seed gives
    the same initial weights whatever they draw (the quickstart's 0.848 had become
    0.831 when the memory check came in before the model)."""
    import keras

    initial, compile_model = [], training_run.compile_model

    def record(*args, **kwargs):
        initial.append(compile_model(*args, **kwargs).get_weights())
        raise KeyboardInterrupt  # the initial weights are all this test needs

    monkeypatch.setattr(training_run, "compile_model", record)
    config = TrainConfig(SMALL, TINY_RECIPE, str(tmp_path / "run"), str(tiny_shapes), verbose=0)
    with pytest.raises(KeyboardInterrupt):
        run_training(config)
    monkeypatch.setattr(training_run, "check_memory", lambda *args: keras.random.normal((8,)))
    with pytest.raises(KeyboardInterrupt):
        run_training(config)
    for first, second in zip(*initial, strict=True):
        np.testing.assert_array_equal(first, second)


def test_a_run_without_validation_moves_and_evaluates_from_anywhere(
    tiny_shapes, tmp_path, monkeypatch, capsys
):
    """A recipe with no held-out split trains without validation (last.keras, no
    scores); config.json keeps the data's absolute path, so the run directory, moved,
    evaluates from another working directory."""
    monkeypatch.chdir(tmp_path)
    recipe = dataclasses.replace(TINY_RECIPE, val_split=None, steps=4, checkpoint_every=4)
    relative = os.path.relpath(tiny_shapes, tmp_path)
    results = run_training(TrainConfig(SMALL, recipe, "run", data_dir=relative, verbose=0))
    assert results["split"] is None and "mean_iou" not in results
    assert {"last.keras", "config.json"} <= set(os.listdir("run"))
    assert not Path("run/best.keras").exists()
    config = json.loads(Path("run/config.json").read_text())
    assert config["data_dir"] == str(tiny_shapes.resolve())
    assert config["recipe_sources"]["val_split"] == f"recipe {TINY_RECIPE.name}"
    (tmp_path / "elsewhere").mkdir()
    os.rename("run", tmp_path / "elsewhere" / "moved")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert evaluate_cli.main(["--model-dir", "moved", "--quiet", "--panels", "0"]) == 0
    scores = json.loads(Path("moved/eval-val/results.json").read_text())
    assert 0 <= scores["mean_iou"] <= 1 and scores["num_images"] == 8


def test_finished_run_is_not_overwritten(tiny_shapes, tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    (model_dir / "results.json").write_text("{}")
    config = TrainConfig(SMALL, TINY_RECIPE, str(model_dir), data_dir=str(tiny_shapes), verbose=0)
    with pytest.raises(TrainingError, match="holds a finished run; pass --overwrite"):
        run_training(config)
    assert (model_dir / "results.json").read_text() == "{}"


@needs_bfloat16
def test_mixed_precision_trains_in_bfloat16_with_float32_weights(tiny_shapes, tmp_path):
    """--mixed-precision on a CPU: the v3+ model computes in bfloat16 (kept in its
    .keras file) with float32 variables and float32 logits, the loss falls, and the
    caller's float32 policy is back once the run returns."""
    import keras

    recipe = dataclasses.replace(TINY_RECIPE, steps=20, checkpoint_every=10, val_split=None)
    config = TrainConfig(
        SMALL_DECODER_VARIANT,
        recipe,
        str(tmp_path / "run"),
        data_dir=str(tiny_shapes),
        mixed_precision=True,
        verbose=0,
    )
    run_training(config)
    assert keras.mixed_precision.global_policy().name == "float32"
    history = _history(tmp_path / "run")
    assert np.isfinite(history[-1]["loss"]) and history[-1]["loss"] < history[0]["loss"]

    model = keras.models.load_model(tmp_path / "run" / "last.keras")
    assert model.get_layer("decoder").dtype_policy.name == "mixed_bfloat16"
    assert {w.dtype for w in model.weights} == {"float32"}
    images = next(iter(pipeline.eval_dataset(tiny_shapes, "val", batch_size=8)))[0]
    logits = model(images, training=False)
    assert logits.dtype == "float32" and np.isfinite(logits).all()


class TestBadInput:
    def _run(self, capsys, *args):
        code = train.main(list(args))
        err = capsys.readouterr().err.strip()
        return code, err

    @pytest.mark.parametrize(
        "args, message",
        [
            (["--variant", "deeplabv9"], "unknown variant 'deeplabv9'"),
            (["--dataset", "mnist"], "unknown dataset 'mnist'"),
            (["--crop-size", "8", "--output-stride", "16"], "--crop-size 8 is smaller than"),
            (["--recipe", "v3-voc-trainaug"], "--data-dir is required for dataset"),
            (
                ["--variant", "deeplabv1-largefov", "--output-stride", "16"],
                "deeplabv1-largefov runs at output stride 8 only",
            ),
        ],
    )
    def test_one_line_and_exit_2(self, capsys, tmp_path, args, message):
        code, err = self._run(capsys, "--model-dir", str(tmp_path / "m"), *args)
        assert code == 2
        assert len(err.splitlines()) == 1 and message in err, err

    def test_mixed_precision_where_bfloat16_cannot_run(self, capsys, tmp_path, monkeypatch):
        """Where oneDNN's cap leaves it no bfloat16 convolution, --mixed-precision is a
        one-line error before anything is written (TensorFlow's own is an internal
        "could not create a primitive descriptor" at the first step)."""
        reason = "ONEDNN_MAX_CPU_ISA=AVX2 leaves oneDNN without bfloat16 convolutions"
        monkeypatch.setattr(training_run, "bfloat16_cannot_run", lambda: reason)
        model_dir = tmp_path / "m"
        code, err = self._run(capsys, "--model-dir", str(model_dir), "--mixed-precision")
        assert code == 2 and err == (
            f"error: --mixed-precision: {reason}; raise or unset that cap, or train without "
            "--mixed-precision"
        ), err
        assert not model_dir.exists()

    def test_data_dir_without_shards(self, capsys, tmp_path):
        empty = tmp_path / "empty"
        empty.mkdir()
        code, err = self._run(capsys, "--data-dir", str(empty), "--model-dir", str(tmp_path / "m"))
        assert code == 2 and len(err.splitlines()) == 1 and str(empty) in err, err

    def test_dataset_that_does_not_match_the_data_dir(self, capsys, tiny_shapes, tmp_path):
        args = ["--data-dir", str(tiny_shapes), "--dataset", "cityscapes"]
        code, err = self._run(capsys, *args, "--model-dir", str(tmp_path / "m"))
        assert code == 2 and "does not match" in err, err

    def test_batch_not_divisible_by_replicas(self):
        config = TrainConfig(SMALL, dataclasses.replace(TINY_RECIPE, batch_size=5), "unused")
        with pytest.raises(
            TrainingError, match="--batch-size 5 is not divisible by the 2 replicas"
        ):
            check_config(config, replicas=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_command(
    data_dir: Path, model_dir: Path, *extra: str, variant: str = SMALL_VARIANT
) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--variant",
        variant,
        "--data-dir",
        str(data_dir),
        "--model-dir",
        str(model_dir),
        "--crop-size",
        "48",
        "--batch-size",
        "4",
        "--log-every",
        "5",
        *extra,
    ]


def test_killed_run_resumes_from_its_backup(tiny_shapes, tmp_path):
    model_dir = tmp_path / "run"
    command = _train_command(
        tiny_shapes,
        model_dir,
        *("--steps", "40", "--checkpoint-every", "10"),
        variant=SMALL_DECODER_VARIANT,
    )
    metadata = model_dir / "backup" / "training_metadata.json"
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            if metadata.is_file() and json.loads(metadata.read_text())["epoch"] >= 2:
                break
            time.sleep(0.05)  # a checkpoint every 10 steps comes about every second
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    recorded = 10 * json.loads(metadata.read_text())["epoch"]
    assert 20 <= recorded < 40

    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"at step {recorded}" in result.stdout
    # The optimizer's step count came back with the backup: 40 in total, not 40 + recorded.
    assert json.loads((model_dir / "results.json").read_text())["steps"] == 40
    assert (model_dir / "last.keras").is_file()
    assert not (model_dir / "backup").exists()  # removed once the run finished


def test_a_backup_interrupted_while_written_leaves_the_one_before(tmp_path):
    """Keras writes its backup in place: killed while writing the first one, a rerun
    found a truncated weights file it could not load (bench/kill.py). Now a backup
    interrupted while written leaves the previous one whole, and no temporary."""
    import keras

    from deeplab_tf.training.callbacks import AtomicBackupAndRestore

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    backup = AtomicBackupAndRestore(str(tmp_path))
    backup.set_model(model)
    backup._current_epoch = 1
    backup._save_model()
    weights = (tmp_path / "latest.weights.h5").read_bytes()

    def torn(filepath, overwrite=True):
        Path(filepath).write_bytes(weights[: len(weights) // 2])
        raise KeyboardInterrupt  # as a kill in the middle of the write

    model.save_weights = torn
    backup._current_epoch = 2
    with pytest.raises(KeyboardInterrupt):
        backup._save_model()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest.weights.h5", "training_metadata.json"
    ]  # fmt: skip
    assert (tmp_path / "latest.weights.h5").read_bytes() == weights
    assert json.loads((tmp_path / "training_metadata.json").read_text())["epoch"] == 1


# Two logical CPU devices for MirroredStrategy, set before anything else uses TensorFlow.
TWO_DEVICES = textwrap.dedent(
    """
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    """
)

SYNC_BN_FORWARD = TWO_DEVICES + textwrap.dedent(
    """
    import dataclasses, sys
    import numpy as np
    from deeplab_tf import get_variant
    from deeplab_tf.backbones import mobilenet_v2
    from deeplab_tf.recipes import get_recipe
    from deeplab_tf.training.strategies import create_strategy
    from deeplab_tf.training import TrainConfig, compile_model

    # One unit per stage (19 batch norms, not 52): the tracing of each synchronised
    # batch norm's all-reduces dominates this test's time on CPU devices.
    mobilenet_v2.MOBILENET_V2_STAGES = tuple(
        stage[:3] + (1,) for stage in mobilenet_v2.MOBILENET_V2_STAGES
    )
    variant = dataclasses.replace(
        get_variant("deeplabv3-mobilenetv2"), name="tiny", alpha=0.35, head_filters=8
    )
    recipe = dataclasses.replace(get_recipe("shapes-cpu"), batch_size=4)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (4, 33, 33, 3)).astype("float32")
    x[2:] *= 0.25  # the second replica's half is darker: its own batch statistics differ
    logits, weights = {}, None
    for name, sync in (("single", False), ("mirrored_sync", True), ("mirrored", False)):
        strategy = create_strategy("mirrored" if name.startswith("mirrored") else "auto")
        config = TrainConfig(variant, recipe, "unused", sync_bn=sync)
        with strategy.scope():
            model = compile_model(config, num_classes=3, replicas=strategy.num_replicas_in_sync)
        weights = model.get_weights() if weights is None else weights
        model.set_weights(weights)
        batch = next(iter(strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensors(x)
        )))
        # What fit's train step computes before its loss: the training-mode forward
        # pass of each replica on its half of the batch.
        step = tf.function(lambda b: strategy.run(lambda t: model(t, training=True), (b,)))
        logits[name] = np.concatenate(
            [t.numpy() for t in strategy.experimental_local_results(step(batch))]
        )
        assert strategy.num_replicas_in_sync == (2 if name.startswith("mirrored") else 1)
    np.savez(sys.argv[1], **logits)
    """
)


def _run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", script, *args], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_mirrored_sync_bn_sees_the_whole_batch(tmp_path):
    """Two logical CPUs with synchronised batch norm normalise with the statistics of
    the whole batch: their training-mode logits (hence fit's first loss) equal one
    device's on that batch; without synchronisation each replica normalises its half."""
    _run_script(SYNC_BN_FORWARD, str(tmp_path / "logits.npz"))
    logits = np.load(tmp_path / "logits.npz")
    # The replicas' partial sums of each statistic are all-reduced, then divided: the
    # same terms as one device's sum in another order. Float32 reassociation of the
    # 2x33x33 (up to 17x17 deeper) terms moves a statistic by a few eps relative, and 19
    # normalisations in series pass that on; 1e-4 of the logits' range bounds it with
    # margin (measured 1e-5) while the unsynchronised difference is of order 1.
    assert_close_relative(logits["mirrored_sync"], logits["single"], rtol=1e-4)
    unsynchronised = np.abs(logits["mirrored"] - logits["single"]).max()
    assert unsynchronised > 0.1 * np.abs(logits["single"]).max()


MIRRORED_TRAIN = TWO_DEVICES + textwrap.dedent(
    """
    import dataclasses, json, sys
    from deeplab_tf import get_variant
    from deeplab_tf.recipes import get_recipe
    from deeplab_tf.training import TrainConfig, train

    recipe = dataclasses.replace(
        get_recipe("shapes-cpu"), batch_size=4, crop_size=48, steps=4, checkpoint_every=2
    )
    config = TrainConfig(get_variant(sys.argv[3]), recipe, sys.argv[2], data_dir=sys.argv[1],
                         strategy="mirrored", verbose=0)
    print(json.dumps(train(config)))
    """
)


def test_mirrored_train_validates_across_epochs(tiny_shapes, tmp_path):
    """train() under MirroredStrategy on two logical CPUs: fit with validation over two
    epochs (a Keras fix covers this), then the run's files. The v3+ model: the
    multi-worker test below runs the v3 one through the same replica code."""
    result = _run_script(
        MIRRORED_TRAIN, str(tiny_shapes), str(tmp_path / "run"), SMALL_DECODER_VARIANT
    )
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 4
    assert (tmp_path / "run" / "best.keras").is_file()


def test_two_multi_worker_processes(tiny_shapes, tmp_path):
    """Two MultiWorkerMirroredStrategy workers on 127.0.0.1 train a few steps."""
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    model_dir = tmp_path / "run"
    scratch = tmp_path / "tmp"  # where the non-chief worker writes, then removes
    scratch.mkdir()
    processes = []
    try:
        for index in range(2):
            env = {
                **ENV,
                "TMPDIR": str(scratch),
                "TF_CONFIG": json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": index}}
                ),
            }
            command = _train_command(
                tiny_shapes,
                model_dir,
                "--steps",
                "4",
                "--checkpoint-every",
                "2",
                "--strategy",
                "multi_worker",
            )
            processes.append(
                subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            )
        outputs = []
        deadline = time.time() + 300
        for process in processes:
            output, _ = process.communicate(timeout=max(1, deadline - time.time()))
            outputs.append(output.decode())
    finally:
        for process in processes:  # a worker whose peer died blocks forever: always kill
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    assert "replicas: 2" in outputs[0]
    results = json.loads((model_dir / "results.json").read_text())
    assert results["steps"] == 4
    assert (model_dir / "last.keras").is_file()
    assert not list(scratch.glob("deeplab_worker_*"))

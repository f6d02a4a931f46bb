"""Export: the SavedModel's signatures against the Keras model (directly, through
saved_model_cli and through TF Serving's request protos), the TFLite files run by
ai-edge-litert, and the .keras file in a fresh process.

One export (every format, every quantization) of a tiny DeepLab v3 briefly trained on
shapes is shared by the tests: TFLite conversion is slow.
"""

import base64
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import predict_pb2

from deeplab_tf import build_model, get_variant
from deeplab_tf.data import pipeline, tfrecord
from deeplab_tf.data.shapes import ensure_shapes_tfrecords
from deeplab_tf.data.specs import SPECS
from deeplab_tf.export import (
    FORMATS,
    KERAS_FILE,
    QUANTIZATIONS,
    TFLitePredictor,
    export,
    load_crf,
    save_serving_model,
    tflite_file,
)
from deeplab_tf.inference import Predictor
from deeplab_tf.losses import SoftmaxCrossEntropy
from tests.helpers import (
    ROOT,
    assert_close_relative,
    calibrate_batch_norm,
    needs_bfloat16,
    trained_in_mixed_bfloat16,
)
from tests.tolerances import (
    EPS32,
    assert_refinements_agree,
    decided,
    model_probability_atol,
    network_rtol,
    probability_atol,
)

SPEC = SPECS["shapes"]
SIZE = 48  # shapes images and the TFLite input size
STEPS = 80  # training steps of the shared model
rng = np.random.default_rng(8)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    return ensure_shapes_tfrecords(root, num_train=32, num_val=12, image_size=SIZE)


@pytest.fixture(scope="module")
def model(shapes) -> keras.Model:
    """The quickstart's small ResNet with the v3+ decoder (encoder at output stride 16)
    after STEPS training steps on shapes: of the variants, the fastest to train here, and
    the decoder goes through every export format and quantisation. A random network would not do:
    with its batch norm calibrated on one batch, its float16 TFLite file changes 2 to 3%
    of its labels (the quickstart model's, 0.02%)."""
    keras.utils.set_random_seed(0)
    model = build_model(
        get_variant("deeplabv3plus-resnet10-cpu"),
        SPEC.num_classes,
        output_stride=16,
        bn_momentum=0.9,
    )
    weights = [0.3] + [1.0] * (SPEC.num_classes - 1)  # background covers most pixels
    model.compile(keras.optimizers.Adam(3e-3), SoftmaxCrossEntropy(class_weights=weights))
    data = pipeline.train_dataset(
        shapes, batch_size=8, crop_size=SIZE, min_scale=1.0, max_scale=1.0, seed=0
    )
    model.fit(data, steps_per_epoch=STEPS, epochs=1, verbose=0)
    return model


@pytest.fixture(scope="module")
def exported(model, shapes, tmp_path_factory):
    return export(
        Predictor(model),
        tmp_path_factory.mktemp("exports"),
        formats=FORMATS,
        name="shapes-net",
        spec=SPEC,
        input_size=(SIZE, SIZE),
        quantize=QUANTIZATIONS,
        data_dir=shapes,
        calibration_images=16,
        evaluate_split="val",
        log=lambda *_: None,
    )


@pytest.fixture(scope="module")
def signatures(exported):
    return tf.saved_model.load(str(exported.path)).signatures


@pytest.fixture(scope="module")
def val_images(shapes) -> np.ndarray:
    return np.stack([image[0].numpy() for image, _ in pipeline.eval_dataset(shapes, "val")])


def keras_probabilities(model: keras.Model, images: np.ndarray) -> np.ndarray:
    logits = model(np.asarray(images, np.float32), training=False)
    return tf.nn.softmax(logits, axis=-1).numpy()


# The exported network in float32 layers in series: resnet10_cpu's stem and eight
# basic-block convolutions, the ASPP's branch and projection and the classifier (the v3
# model's 12), and the decoder's two 3x3 convolutions before that classifier (14; the
# decoder's low-level projection runs beside the ASPP); its longest sum is a 3x3
# convolution over 128 channels (1152 terms).
V3_LAYERS = 12
NETWORK_LAYERS, NETWORK_TERMS = V3_LAYERS + 2, 9 * 128


def float32_atol(model: keras.Model, images: np.ndarray) -> float:
    """The bound on two float32 evaluations of the network's probabilities."""
    return model_probability_atol(model, images, network_rtol(NETWORK_LAYERS, NETWORK_TERMS))


def encode(image: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=image_format, quality=95)
    return buffer.getvalue()


def test_version_directory(exported):
    path = exported.path
    assert path.name == "1" and path.parent.name == "shapes-net"
    names = {p.name for p in path.iterdir()}
    assert {"saved_model.pb", "variables", KERAS_FILE, "export.json"} <= names
    assert {tflite_file(q) for q in QUANTIZATIONS} <= names
    assert [p.name for p in path.parent.iterdir()] == ["1"]  # no temporary directory left
    manifest = json.loads((path / "export.json").read_text())
    assert manifest["class_names"] == list(SPEC.class_names)
    assert manifest["colors"] == SPEC.palette()[: SPEC.num_classes].tolist()
    files = manifest["formats"]["tflite"]["files"]
    sizes = [files[q]["bytes"] for q in ("none", "float16", "int8")]
    assert sizes == sorted(sizes, reverse=True), sizes  # float32 > float16 > int8


class TestSavedModel:
    def test_serving_default_equals_the_keras_model(self, signatures, model):
        for height, width in [(33, 47), (48, 48), (97, 64)]:
            images = rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8)
            outputs = signatures["serving_default"](images=tf.constant(images))
            expected = keras_probabilities(model, images)
            labels = outputs["labels"].numpy()
            assert outputs["labels"].dtype == tf.int32 and labels.shape == (2, height, width)
            atol = float32_atol(model, images)  # the same network in another graph
            np.testing.assert_allclose(outputs["probabilities"], expected, atol=atol)
            np.testing.assert_array_equal(labels, outputs["probabilities"].numpy().argmax(-1))
            sure = decided(expected, atol)
            np.testing.assert_array_equal(labels[sure], expected.argmax(-1)[sure])

    def test_saved_model_cli_shows_the_documented_signatures(self, exported):
        shown = subprocess.run(
            [_saved_model_cli(), "show", "--dir", str(exported.path), "--all"],
            capture_output=True, text=True, check=True, env=_quiet_env(),
        ).stdout  # fmt: skip
        found = {}
        for name, body in re.findall(
            r"signature_def\['(\w+)'\]:\n(.*?)(?=\nsignature_def\[|\nThe MetaGraph|\Z)",
            shown,
            re.DOTALL,
        ):
            tensors = re.findall(r"(inputs|outputs)\['(\w+)'\] tensor_info:\s+dtype: (\w+)\s+"
                                 r"shape: (.+)", body)  # fmt: skip
            found[name] = {(kind, key, dtype, shape) for kind, key, dtype, shape in tensors}
        c = f"{SPEC.num_classes}"
        masks = {
            ("outputs", "labels", "DT_INT32", "(-1, -1, -1)"),
            ("outputs", "probabilities", "DT_FLOAT", f"(-1, -1, -1, {c})"),
        }
        sizes = {("outputs", k, "DT_INT32", "(-1)") for k in ("heights", "widths")}
        assert found["serving_default"] == {
            ("inputs", "images", "DT_UINT8", "(-1, -1, -1, 3)"), *masks,
        }  # fmt: skip
        assert found["predict_encoded"] == {
            ("inputs", "image_bytes", "DT_STRING", "(-1)"), *masks, *sizes,
        }  # fmt: skip
        assert found["predict_example"] == {
            ("inputs", "examples", "DT_STRING", "(-1)"), *masks, *sizes,
            ("outputs", "filenames", "DT_STRING", "(-1)"),
        }  # fmt: skip
        assert found["classes"] == {
            ("inputs", "class_ids", "DT_INT32", "(-1)"),
            ("outputs", "class_names", "DT_STRING", "(-1)"),
            ("outputs", "colors", "DT_UINT8", "(-1, 3)"),
        }
        assert shown.count("Method name is: tensorflow/serving/predict") == 4

    def test_saved_model_cli_runs_serving_default_on_npy(self, exported, model, tmp_path):
        images = rng.integers(0, 256, (2, 37, 52, 3), dtype=np.uint8)
        np.save(tmp_path / "images.npy", images)
        subprocess.run(
            [_saved_model_cli(), "run", "--dir", str(exported.path), "--tag_set", "serve",
             "--signature_def", "serving_default", "--inputs", f"images={tmp_path / 'images.npy'}",
             "--outdir", str(tmp_path / "out")],
            capture_output=True, text=True, check=True, env=_quiet_env(),
        )  # fmt: skip
        probabilities = np.load(tmp_path / "out" / "probabilities.npy")
        labels = np.load(tmp_path / "out" / "labels.npy")
        expected, atol = keras_probabilities(model, images), float32_atol(model, images)
        np.testing.assert_allclose(probabilities, expected, atol=atol)
        assert labels.dtype == np.int32 and labels.shape == (2, 37, 52)
        np.testing.assert_array_equal(labels, probabilities.argmax(-1))

    def test_predict_request_protos_run_through_the_signature(self, signatures, model):
        """What TF Serving does with a gRPC PredictRequest: the TensorProtos become
        arrays (tf.make_ndarray), the named signature runs, the outputs go back as
        TensorProtos in a PredictResponse."""
        images = rng.integers(0, 256, (2, 41, 35, 3), dtype=np.uint8)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "shapes-net"
        request.model_spec.signature_name = "serving_default"
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
        received = predict_pb2.PredictRequest.FromString(request.SerializeToString())

        signature = signatures[received.model_spec.signature_name]
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in received.inputs.items()}
        response = predict_pb2.PredictResponse()
        for key, value in signature(**inputs).items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
        response = predict_pb2.PredictResponse.FromString(response.SerializeToString())

        probabilities = tf.make_ndarray(response.outputs["probabilities"])
        labels = tf.make_ndarray(response.outputs["labels"])
        expected, atol = keras_probabilities(model, images), float32_atol(model, images)
        np.testing.assert_allclose(probabilities, expected, atol=atol)
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(labels, probabilities.argmax(-1))

    def test_encoded_jpeg_and_png_of_different_sizes(self, signatures, model):
        """A JPEG and a PNG of different sizes in one REST request with {"b64": ...}
        (decoded as TF Serving decodes it): outputs at each image's size, padded."""
        jpeg = rng.integers(0, 256, (40, 57, 3), dtype=np.uint8)
        png = rng.integers(0, 256, (61, 35, 3), dtype=np.uint8)
        body = json.dumps({
            "signature_name": "predict_encoded",
            "instances": [
                {"b64": base64.b64encode(encode(jpeg, "JPEG")).decode()},
                {"b64": base64.b64encode(encode(png, "PNG")).decode()},
            ],
        })  # fmt: skip
        request = json.loads(body)
        image_bytes = [base64.b64decode(instance["b64"]) for instance in request["instances"]]
        outputs = signatures[request["signature_name"]](image_bytes=tf.constant(image_bytes))

        np.testing.assert_array_equal(outputs["heights"], [40, 61])
        np.testing.assert_array_equal(outputs["widths"], [57, 35])
        labels, probabilities = outputs["labels"].numpy(), outputs["probabilities"].numpy()
        assert labels.shape == (2, 61, 57) and probabilities.shape == (2, 61, 57, 6)
        for i, data in enumerate(image_bytes):
            decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # PIL, not TF
            h, w = decoded.shape[:2]
            expected = keras_probabilities(model, decoded[None])[0]
            atol = float32_atol(model, decoded[None])
            np.testing.assert_allclose(probabilities[i, :h, :w], expected, atol=atol)
            np.testing.assert_array_equal(labels[i, :h, :w], probabilities[i, :h, :w].argmax(-1))
            assert (labels[i, h:] == 255).all() and (labels[i, :, w:] == 255).all()
            assert not probabilities[i, h:].any() and not probabilities[i, :, w:].any()

    def test_predict_example_reads_our_tfrecord_examples(self, signatures, shapes):
        records = list(tf.data.TFRecordDataset(tfrecord.list_shards(shapes, "val")).take(2))
        outputs = signatures["predict_example"](examples=tf.stack(records))
        parsed = [tfrecord.parse_example(r) for r in records]
        encoded = signatures["predict_encoded"](
            image_bytes=tf.stack([p[tfrecord.IMAGE_ENCODED] for p in parsed])
        )
        for key in ("labels", "probabilities", "heights", "widths"):
            np.testing.assert_array_equal(outputs[key], encoded[key])
        np.testing.assert_array_equal(outputs["heights"], [SIZE, SIZE])
        assert outputs["filenames"].numpy().tolist() == [
            p[tfrecord.IMAGE_FILENAME].numpy() for p in parsed
        ]

    def test_classes_give_names_and_colours(self, signatures):
        ids = [*range(SPEC.num_classes), 255]
        outputs = signatures["classes"](class_ids=tf.constant(ids, tf.int32))
        names = [n.decode() for n in outputs["class_names"].numpy()]
        assert names == [*SPEC.class_names, "ignore"]
        np.testing.assert_array_equal(outputs["colors"], SPEC.palette()[ids])

    @pytest.mark.parametrize(
        "signature, value, message",
        [
            ("serving_default", np.zeros((1, 8, 8, 3), np.float32), "expected to be a uint8"),
            ("serving_default", np.zeros((8, 8, 3), np.uint8),
             r"tensor images \[8,8,3\] is not compatible with expected shape \[\?,\?,\?,3\]"),
            ("serving_default", np.zeros((1, 8, 8, 4), np.uint8),
             r"Shape of tensor images \[1,8,8,4\] is not compatible"),
            ("serving_default", np.zeros((1, 0, 8, 3), np.uint8),
             r"images must be \[N, H, W, 3\] with 1 <= H, W <= 4096; got .* \[1 0 8 3\]"),
            ("serving_default", np.zeros((1, 4097, 1, 3), np.uint8),
             r"images must be \[N, H, W, 3\] with 1 <= H, W <= 4096"),
            ("predict_encoded", np.array([[b"x"]]), r"Shape of tensor image_bytes \[1,1\]"),
            ("predict_encoded", np.array([], object), "at least one JPEG or PNG"),
            ("predict_encoded", np.array([b"not an image"]), "PNG"),
            ("classes", np.array([3, 300], np.int32), r"class_ids must be in 0\.\.255"),
        ],
    )  # fmt: skip
    def test_bad_inputs_are_refused(self, signatures, signature, value, message):
        function = signatures[signature]
        (name,) = function.structured_input_signature[1]
        tensor = tf.constant(value, tf.string) if value.dtype == object else tf.constant(value)
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            function(**{name: tensor})


class TestTFLite:
    def test_labels_agree_with_keras(self, exported, model, val_images):
        """Labels agree wherever the Keras probabilities' top-2 margin exceeds what each
        format's arithmetic can move (pixels closer to a tie may take either label)."""
        expected = keras_probabilities(model, val_images)
        logits = np.asarray(model(val_images.astype(np.float32), training=False))
        logit_range = float(logits.max() - logits.min())
        atol = {
            # float32 kernels of another library: the float32 reordering bound.
            "none": float32_atol(model, val_images),
            # Weights rounded to float16 (relative 2^-11 each) move each layer's output
            # by about 2^-11 of its size, independently: sqrt(12) of that in series, three
            # standard deviations, of the largest logit.
            "float16": probability_atol(
                3 * np.sqrt(NETWORK_LAYERS) * 2.0**-11 * np.abs(logits).max()
            ),
            # int8 activations round to 1/255 of their calibrated range: at most half a
            # step per layer, the 12 layers' errors adding up, taken on the logits' range.
            "int8": probability_atol(NETWORK_LAYERS * logit_range / 510),
        }
        for mode in QUANTIZATIONS:
            predictor = TFLitePredictor(exported.path / tflite_file(mode))
            assert predictor.input_size == (SIZE, SIZE) and predictor.num_classes == 6
            labels = np.stack([predictor.predict_labels(image) for image in val_images])
            sure = decided(expected, atol[mode])
            # Not vacuous: most pixels of a trained network are far from a tie, even at
            # the int8 bound (0.15 in probability for this model: 70% of the pixels).
            assert sure.mean() > 0.5, (mode, atol[mode], sure.mean())
            np.testing.assert_array_equal(labels[sure], expected.argmax(-1)[sure], err_msg=mode)

    def test_float32_probabilities_and_other_image_sizes(self, exported, model):
        predictor = TFLitePredictor(exported.path / tflite_file("none"))
        image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        expected = keras_probabilities(model, image[None])[0]
        atol = float32_atol(model, image[None])  # TFLite's float32 kernels
        np.testing.assert_allclose(predictor.predict(image), expected, atol=atol)
        other = predictor.predict(rng.integers(0, 256, (33, 70, 3), dtype=np.uint8))
        assert other.shape == (33, 70, 6)  # resized to the input size and back
        # A bilinear resize of probabilities (weights summing to 1) keeps their sum at 1
        # up to the rounding of a 4-term and a 6-term float32 sum.
        np.testing.assert_allclose(other.sum(-1), 1.0, atol=10 * EPS32)

    def test_int8_is_full_integer_with_float_input_and_outputs(self, exported):
        predictor = TFLitePredictor(exported.path / tflite_file("int8"))
        runner = predictor.runner
        assert runner.get_input_details()["images"]["dtype"] == np.float32
        outputs = runner.get_output_details()
        assert outputs["probabilities"]["dtype"] == np.float32
        assert outputs["labels"]["dtype"] == np.int32
        ops = predictor.interpreter._get_ops_details()
        tensors = {t["index"]: t for t in predictor.interpreter.get_tensor_details()}
        for op in ops:
            if op["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "RESIZE_BILINEAR", "SOFTMAX"):
                dtypes = {tensors[i]["dtype"] for i in op["inputs"][:1]}
                assert dtypes == {np.int8}, (op["op_name"], dtypes)
        assert {op["op_name"] for op in ops} >= {"QUANTIZE", "DEQUANTIZE", "CONV_2D"}

    def test_int8_mean_iou_drop(self, exported, model, shapes, val_images):
        """The manifest's scores, recomputed from a numpy confusion matrix."""
        labels = np.stack([label[0].numpy() for _, label in pipeline.eval_dataset(shapes, "val")])
        keras_labels = keras_probabilities(model, val_images).argmax(-1)
        predictor = TFLitePredictor(exported.path / tflite_file("int8"))
        int8_labels = np.stack([predictor.predict_labels(image) for image in val_images])
        keras_iou, int8_iou = _mean_iou(labels, keras_labels), _mean_iou(labels, int8_labels)
        entry = exported.manifest["formats"]["tflite"]["files"]["int8"]
        assert exported.manifest["evaluation"]["keras_mean_iou"] == pytest.approx(keras_iou)
        assert entry["mean_iou"] == pytest.approx(int8_iou)
        # What a user of the int8 file loses: at most 2 points of mean IoU (the quickstart
        # model loses 0.1; int8 rounding depends on the CPU that calibrated it, so its
        # label agreement is bounded above only where margins are wide).
        assert keras_iou - int8_iou <= 0.02, (keras_iou, int8_iou)


def _mean_iou(labels: np.ndarray, predictions: np.ndarray, num_classes: int = 6) -> float:
    valid = labels != 255
    confusion = np.bincount(
        labels[valid] * num_classes + predictions[valid], minlength=num_classes**2
    ).reshape(num_classes, num_classes)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    present = union > 0
    return float((np.diag(confusion)[present] / union[present]).mean())


def test_fresh_processes_load_the_savedmodel_and_the_keras_file(exported, model, tmp_path):
    """The SavedModel needs TensorFlow only; the .keras file needs `import deeplab_tf`."""
    images = rng.integers(0, 256, (1, 45, 38, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import tensorflow as tf

        path, images = sys.argv[1], np.load(sys.argv[2])
        serve = tf.saved_model.load(path).signatures["serving_default"]
        np.save(sys.argv[3], serve(images=tf.constant(images))["probabilities"].numpy())
        assert "deeplab_tf" not in sys.modules

        import keras
        try:
            keras.models.load_model(f"{path}/model.keras")
        except Exception:
            print("refused without deeplab_tf")
        import deeplab_tf
        model = keras.models.load_model(f"{path}/model.keras")
        np.save(sys.argv[4], model.predict(images.astype("float32"), verbose=0))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(exported.path), str(tmp_path / "images.npy"),
         str(tmp_path / "saved.npy"), str(tmp_path / "keras.npy")],
        capture_output=True, text=True, env=_quiet_env(), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused without deeplab_tf" in done.stdout
    expected = model(images.astype("float32"), training=False).numpy()
    # The same float32 network in another process: the reordering bound, on logits and
    # (halved) on probabilities.
    logit_atol = network_rtol(NETWORK_LAYERS, NETWORK_TERMS) * np.abs(expected).max()
    np.testing.assert_allclose(np.load(tmp_path / "keras.npy"), expected, atol=logit_atol)
    np.testing.assert_allclose(
        np.load(tmp_path / "saved.npy"),
        tf.nn.softmax(expected).numpy(),
        atol=probability_atol(logit_atol),
    )


def test_crf_in_the_savedmodel(model, tmp_path):
    """The signature's probabilities are the TensorFlow CRF's refinement of the
    network's."""
    from deeplab_tf import crf

    names = list(SPEC.class_names)
    save_serving_model(Predictor(model), tmp_path / "m", names, SPEC.palette(), load_crf())
    serve = tf.saved_model.load(str(tmp_path / "m")).signatures["serving_default"]
    images = rng.integers(0, 256, (2, 33, 41, 3), dtype=np.uint8)
    expected = crf.crf_tensorflow(images, keras_probabilities(model, images), crf.CRFParams())
    expected = expected.numpy()
    refined = serve(images=tf.constant(images))["probabilities"].numpy()
    # The CRF's inputs differ by the network's float32 bound; its ten mean-field
    # iterations amplify that at pixels near a tie (measured: 1e-6 in, up to 1.4e-3 out,
    # by CPU and oneDNN setting). Labels are compared where the refined margin exceeds
    # 100 times the input's bound, the largest amplification seen.
    atol = float32_atol(model, images)
    assert_refinements_agree(refined, expected, atol, label_atol=100 * atol)


def _saved_model_cli() -> str:
    return str(Path(sys.executable).with_name("saved_model_cli"))


def _quiet_env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("trained_in", ["float32", "mixed_bfloat16"])
def test_v3_model_through_tflite_and_keras(tmp_path, trained_in):
    """The v3 model (no decoder; the shared model above has one) exported: TFLite
    float32 labels are the Keras network's wherever decided, and the .keras file
    reloads to the same logits. A model trained with --mixed-precision (its layers keep
    the mixed_bfloat16 policy) exports the same float32 files as the float32 model with
    its weights."""
    keras.utils.set_random_seed(0)
    model = build_model("deeplabv3-resnet10-cpu", 3)
    images = rng.uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")
    calibrate_batch_norm(model, images=images)  # logits that vary, as a trained net's
    trained = model
    if trained_in != "float32":
        trained = trained_in_mixed_bfloat16(model, lambda: build_model("deeplabv3-resnet10-cpu", 3))
    result = export(Predictor(trained), tmp_path, formats=("tflite", "keras"), name="v3",
                    input_size=(SIZE, SIZE), log=lambda line: None, progress=False)  # fmt: skip
    rtol = network_rtol(V3_LAYERS, NETWORK_TERMS)
    expected = keras_probabilities(model, images)
    sure = decided(expected, model_probability_atol(model, images, rtol))
    assert sure.mean() > 0.5
    tflite = TFLitePredictor(result.path / tflite_file("none"))
    labels = np.stack([tflite.predict_labels(image) for image in images])
    np.testing.assert_array_equal(labels[sure], expected.argmax(-1)[sure])
    reloaded = keras.models.load_model(result.path / KERAS_FILE)
    assert {layer.dtype_policy.name for layer in reloaded._flatten_layers()} == {"float32"}
    logits = np.asarray(model(images, training=False))
    assert_close_relative(reloaded(images, training=False), logits, rtol)


@needs_bfloat16
def test_bfloat16_predictor_and_savedmodel_agree_with_float32(
    model, val_images, tmp_path, monkeypatch
):
    """--precision bfloat16 (batch norms folded, convolutions in bfloat16, the logits
    cast to float32 before the resize and softmax): labels equal float32's wherever
    float32's top-2 margin exceeds what bfloat16 can move; the SavedModel computes it.
    Run in bfloat16 on any CPU (emulated where it has no bfloat16 instructions: slower,
    the same arithmetic)."""
    monkeypatch.setattr("deeplab_tf.precision.bfloat16_unavailable", lambda: None)
    expected = keras_probabilities(model, val_images)
    predictor = Predictor(model, precision="bfloat16")
    assert predictor.precision == "bfloat16" and predictor.precision_note is None
    probabilities = np.stack([predictor.predict(image) for image in val_images])
    # bfloat16 keeps 8 significant bits: each layer's inputs and weights are rounded by
    # up to 2^-9 relative, independently, so each of the 14 layers in series moves the
    # logits by about 2 * 2^-9 of their size and the network by sqrt(14) times that;
    # three standard deviations of the largest logit.
    logits = np.asarray(model(val_images.astype(np.float32), training=False))
    atol = probability_atol(3 * np.sqrt(NETWORK_LAYERS) * 2 * 2.0**-9 * np.abs(logits).max())
    sure = decided(expected, atol)
    assert sure.mean() > 0.5, sure.mean()
    np.testing.assert_array_equal(probabilities.argmax(-1)[sure], expected.argmax(-1)[sure])
    assert np.abs(probabilities - expected).max() > 1e-3  # it did compute in bfloat16
    # What export converts to TFLite: the same network and settings in float32.
    float32 = predictor.in_precision("float32")
    assert float32.precision == "float32" and float32.model is predictor.model
    np.testing.assert_array_equal(
        float32.predict(val_images[0]), Predictor(model).predict(val_images[0])
    )

    result = export(predictor, tmp_path, name="bf16", log=lambda line: None, progress=False)
    assert result.manifest["inference"]["precision"] == "bfloat16"
    served = tf.saved_model.load(str(result.path)).signatures["serving_default"]
    outputs = served(images=tf.constant(val_images[:2].astype(np.uint8)))
    assert outputs["probabilities"].dtype == tf.float32
    np.testing.assert_allclose(outputs["probabilities"].numpy(), probabilities[:2], atol=1e-5)

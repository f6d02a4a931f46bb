"""Inference: per-pixel class probabilities of a model at the original image size.

One :class:`Predictor` serves evaluation, prediction and export. It takes a model (or
a ``.keras`` checkpoint / model directory), optionally rebuilds it at another output
stride with the same weights (v3 paper, section 4.2: train at OS16, evaluate at OS8),
and turns an RGB image of any size into probabilities:

* **scales and flips** (v3 paper, section 4.2, Tables 4 and 6): the model runs on the
  image resized by each scale (size (d - 1) s + 1, as the DeepLab code) and on its
  left-right mirror; the logits are bilinearly resized (corners aligned) to the
  image size and the mirrored ones flipped back. ``fusion="mean"`` averages the
  softmax probabilities (v3); ``fusion="max"`` takes the per-pixel maximum of the
  logits before the softmax (v2 MSC, section 3.2).
* **sliding windows** (v2 paper, section 4.4: Cityscapes "split into overlapping
  regions"): an image larger than ``tile_size`` in either dimension is cut into
  overlapping tiles (``tile_overlap`` of the tile), each tile gets the scales and
  flips above, and the probabilities of overlapping tiles are averaged. Tiles come
  first, scales second, so at a scale below 1 a tile is seen at a lower resolution
  with the same content (not with more context). ``tiling="whole"`` runs the whole
  image at once.

**speed**: the network runs as a copy with its batch norms folded into the convolutions
before them (``folding.inference_copy``; equal up to float32 rounding), in float32 or,
with ``precision="bfloat16"`` on a CPU that computes it, in bfloat16 (``precision``),
the ASPP's atrous branches computed tap by tap in bfloat16 and on TensorFlow's own CPU
kernels (``folding.aspp_implementation_for_inference``); the logits are cast to float32
before the resize and the softmax.

Memory: tiles are processed one row of tiles at a time and only one band of
``tile_size`` rows of probabilities is held, so :meth:`Predictor.predict_labels` on a
4000x6000 photo needs the image, the label map and one band (plus the model's
activations on one tile), whatever the image size. :meth:`Predictor.predict` returns
the full [H, W, C] array, or fills an array the caller gives (e.g. a memory-mapped
``.npy`` file).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from deeplab_tf.backbones import transfer_weights
from deeplab_tf.folding import inference_copy
from deeplab_tf.layers import ResizeBilinear, resize_bilinear_aligned
from deeplab_tf.losses import resize_logits_bilinear
from deeplab_tf.model import build_model
from deeplab_tf.multiscale import scaled_size, single_scale_model
from deeplab_tf.precision import resolve_precision
from deeplab_tf.variants import VARIANTS, Variant, get_variant

logger = logging.getLogger("deeplab_tf.inference")

FUSIONS = ("mean", "max")
TILINGS = ("sliding", "whole")
# Images up to this size (each side) are processed whole, larger ones by tiles of it:
# whole for VOC (<= 500 px); a 4000x6000 photo becomes 8 x 11 tiles.
DEFAULT_TILE_SIZE = 1025
DEFAULT_TILE_OVERLAP = 1 / 3  # mmsegmentation's slide inference: stride 2/3 of the tile
V3_EVAL_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # v3 paper, section 4.2


class InferenceError(ValueError):
    """A bad checkpoint, setting or input, reported as one line by the CLIs."""


# === Checkpoints ===


def resolve_checkpoint(path: str | os.PathLike, flag: str = "--checkpoint") -> Path:
    """A ``.keras``/weights file, or the best (else last) model of a model directory.

    ``flag`` names the argument in the one-line error.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("best.keras", "last.keras"):
            if (path / name).is_file():
                return path / name
        raise InferenceError(f"{flag} {path}: no best.keras or last.keras in it")
    if not path.is_file():
        raise InferenceError(f"{flag} {path}: no such file or directory")
    return path


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What the model directory says about a checkpoint (its ``config.json``, if any).

    Attributes:
        path: the ``.keras`` file.
        variant: the trained variant, or None when no config.json names it.
        output_stride: the training output stride, or None.
        data_dir: the TFRecords it was trained on, or None.
        crop_size: the training crop size, or None.
    """

    path: Path
    variant: Variant | None = None
    output_stride: int | None = None
    data_dir: str | None = None
    crop_size: int | None = None


def _tuples(value: Any) -> Any:
    # config.json stores tuples as lists; Variant fields are tuples.
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def variant_from_config(value: str | dict[str, Any] | Variant) -> Variant:
    """A variant from a ``config.json`` entry: a registered name or a dataclass as a dict."""
    if isinstance(value, Variant):
        return value
    if isinstance(value, str):
        return get_variant(value)
    return Variant(**{k: _tuples(v) for k, v in value.items()})


def read_checkpoint_info(path: str | os.PathLike, flag: str = "--checkpoint") -> CheckpointInfo:
    """Resolves ``path`` and reads the ``config.json`` beside it, written by training."""
    checkpoint = resolve_checkpoint(path, flag)
    config_file = checkpoint.parent / "config.json"
    if not config_file.is_file():
        return CheckpointInfo(checkpoint)
    try:
        config = json.loads(config_file.read_text())
        variant = variant_from_config(config["variant"]) if "variant" in config else None
    except (ValueError, TypeError) as error:
        raise InferenceError(f"{config_file}: cannot read the variant ({error})") from error
    recipe = config.get("recipe") or {}
    return CheckpointInfo(
        checkpoint,
        variant,
        recipe.get("output_stride"),
        config.get("data_dir"),
        recipe.get("crop_size"),
    )


def data_dir_of(checkpoint: CheckpointInfo, data_dir: str | os.PathLike | None) -> str:
    """``data_dir`` (``--data-dir``), else the TFRecords the checkpoint was trained on."""
    data_dir = data_dir or checkpoint.data_dir
    if data_dir is None:
        raise InferenceError(f"--data-dir is required: {checkpoint.path} names no data")
    return str(data_dir)


def load_checkpoint(path: str | os.PathLike, flag: str = "--checkpoint") -> keras.Model:
    """The model saved in a ``.keras`` file (or a model directory's best/last one)."""
    checkpoint = resolve_checkpoint(path, flag)
    if checkpoint.suffix != ".keras":
        raise InferenceError(
            f"{flag} {checkpoint}: expected a .keras model or a model directory "
            "(a weights-only file has no architecture)"
        )
    import deeplab_tf  # noqa: F401  (registers the custom layers for deserialisation)

    if not zipfile.is_zipfile(checkpoint):  # Keras would say "File not found"
        raise InferenceError(
            f"{flag} {checkpoint}: not a complete .keras file (truncated or corrupt); "
            "use the run's other checkpoint (last.keras / best.keras) or train again"
        )
    try:
        return keras.models.load_model(checkpoint, compile=False)
    except Exception as error:  # Keras raises many types for a corrupt or foreign file
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InferenceError(f"{flag} {checkpoint}: cannot load the model ({message})") from error


def num_classes_of(model: keras.Model) -> int:
    """The number of logit channels of a segmentation model (a multi-scale one's network's)."""
    return int(single_scale_model(model).outputs[0].shape[-1])


def logits_model(model: keras.Model) -> keras.Model:
    """``model`` without its final bilinear upsampling (a ``ResizeBilinear`` named
    ``upsample``), ending at the logits it resizes.

    The Predictor resizes logits itself (once, straight to the image size), so at a
    scale s the model never builds logits at the scaled size. Models whose last layer
    is anything else (the Yu-Koltun front end's upsample-and-crop, a multi-scale
    wrapper, logits already at the image size) are used as they are.
    """
    try:
        upsample = model.get_layer("upsample")
    except (ValueError, AttributeError):  # no such layer, or not a functional model
        return model
    if not isinstance(upsample, ResizeBilinear) or upsample.output is not model.outputs[0]:
        return model
    return keras.Model(model.inputs, upsample.input[0], name=model.name)


def model_at_output_stride(
    model: keras.Model,
    output_stride: int,
    variant: str | Variant | None = None,
    upsample_logits: bool = False,
) -> keras.Model:
    """The same weights in the variant's model built at ``output_stride``.

    Atrous rates have no variables, so every layer has the same weight shapes at any
    stride and the weights move by layer name (``transfer_weights``).

    Args:
        model: a model from ``build_model`` (or loaded from its ``.keras`` file).
        output_stride: 8, 16 or 32.
        variant: its variant; default: the registered variant named like the model.
        upsample_logits: end with the model's upsampling to the input size (as
            ``build_model``) instead of at the ``logits`` layer (as the Predictor wants).
    """
    if variant is None:
        if model.name not in VARIANTS:
            raise InferenceError(
                f"model {model.name!r} is not a registered variant: pass its variant to "
                "change the output stride"
            )
        variant = model.name
    variant = get_variant(variant) if isinstance(variant, str) else variant
    # The Yu-Koltun front end's logit j covers pixels 8j..8j+7: only its own
    # upsample-and-crop puts it there (a resize with corners aligned shifts it 3.5 px).
    frontend = variant.backbone == "vgg16_frontend"
    target = build_model(
        variant,
        num_classes_of(model),
        output_stride=output_stride,
        upsample_logits=upsample_logits or frontend,
    )
    try:
        report = transfer_weights(model, target)
    except ValueError as error:
        raise InferenceError(f"the model does not match variant {target.name!r}: {error}") from None
    if report.missing or report.unused:
        raise InferenceError(
            f"the model does not match variant {target.name!r}: layers without weights "
            f"{report.missing}, unused layers {report.unused}"
        )
    return target


# === Tiles ===


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length``, neighbours overlapping
    by at least ``overlap`` of a tile; the first at 0, the last ending at ``length``."""
    if length <= tile:
        return [0]
    stride = max(1, tile - round(overlap * tile))
    count = math.ceil((length - tile) / stride) + 1
    return [min(i * stride, length - tile) for i in range(count)]


# === Predictor ===


class Predictor:
    """Per-pixel class probabilities of a segmentation model, at the image's own size.

    Args:
        model: a ``keras.Model`` from RGB pixels [N, H, W, 3] in [0, 255] to logits
            (at any size: they are resized), or the path of a ``.keras`` checkpoint or
            a model directory (its best, else last, model).
        variant: the model's variant, needed only to change the output stride of a
            model whose name is not a registered variant and whose directory has no
            config.json.
        output_stride: rebuild the model at this stride with the same weights; None
            keeps the model as it is.
        scales: image scales; (1.0,) for single-scale, ``V3_EVAL_SCALES`` for v3's
            multi-scale evaluation.
        flip: add left-right flipped inputs.
        fusion: ``"mean"`` of probabilities (v3) or ``"max"`` of logits (v2 MSC).
        tiling: ``"sliding"`` windows for images larger than ``tile_size``, or
            ``"whole"`` images always.
        tile_size: window size (int or (h, w)); images up to it are processed whole.
        tile_overlap: overlap of neighbouring windows, a fraction of the window in [0, 1).
        jit_compile: XLA-compile the model (one compilation per input shape).
        precision: ``"float32"`` or ``"bfloat16"`` (``precision.PRECISIONS``); where
            bfloat16 is not available, float32, and the log says why in one line.

    Attributes:
        model: the network as given (at ``output_stride``, ending at its logits).
        precision: the precision it runs in.
        precision_note: None, or the one line saying why it is not the one asked for.

    Example:
        >>> predictor = Predictor("runs/v3", output_stride=8, scales=V3_EVAL_SCALES, flip=True)
        >>> probabilities = predictor.predict(image)  # [H, W, C], sums to 1 per pixel
        >>> labels = predictor.predict_labels(image)  # [H, W] uint8 class ids
    """

    def __init__(
        self,
        model: keras.Model | str | os.PathLike,
        *,
        variant: str | Variant | None = None,
        output_stride: int | None = None,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        fusion: str = "mean",
        tiling: str = "sliding",
        tile_size: int | tuple[int, int] = DEFAULT_TILE_SIZE,
        tile_overlap: float = DEFAULT_TILE_OVERLAP,
        jit_compile: bool = False,
        precision: str = "float32",
    ):
        scales = tuple(float(s) for s in scales)
        if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
            raise InferenceError(f"scales must be positive numbers, got {list(scales)}")
        if fusion not in FUSIONS:
            raise InferenceError(f"fusion must be one of {list(FUSIONS)}, got {fusion!r}")
        if tiling not in TILINGS:
            raise InferenceError(f"tiling must be one of {list(TILINGS)}, got {tiling!r}")
        tile = (tile_size, tile_size) if isinstance(tile_size, int) else tuple(tile_size)
        if len(tile) != 2 or min(tile) < 1:
            raise InferenceError(f"tile_size must be a positive size, got {tile_size!r}")
        if not 0.0 <= tile_overlap < 1.0:
            raise InferenceError(f"tile_overlap must be in [0, 1), got {tile_overlap}")
        self._set_precision(precision)

        self.checkpoint: CheckpointInfo | None = None
        if not isinstance(model, keras.Model):
            self.checkpoint = read_checkpoint_info(model)
            model = load_checkpoint(self.checkpoint.path)
            variant = variant or self.checkpoint.variant
        if output_stride is not None:
            model = model_at_output_stride(model, output_stride, variant)
        elif self.checkpoint is not None:
            output_stride = self.checkpoint.output_stride
        self.model = logits_model(model)
        self.num_classes = num_classes_of(model)
        self.output_stride = output_stride
        self.scales = scales
        self.flip = bool(flip)
        self.fusion = fusion
        self.tiling = tiling
        self.tile_size: tuple[int, int] = (int(tile[0]), int(tile[1]))
        self.tile_overlap = float(tile_overlap)
        self.jit_compile = bool(jit_compile)
        self._compile()

    def _set_precision(self, precision: str) -> None:
        try:
            self.precision, self.precision_note = resolve_precision(precision)
        except ValueError as error:
            raise InferenceError(str(error)) from None
        if self.precision_note:
            logger.warning(self.precision_note)

    def _compile(self) -> None:
        """The functions that run ``model`` in ``precision``."""
        try:
            network = inference_copy(self.model, self.precision)
        except ValueError as error:
            raise InferenceError(str(error)) from None
        # Only the model is XLA-compiled: XLA's CPU bilinear resize with aligned corners
        # is wrong for some size ratios (3 units off for 4 -> 61 pixels; TensorFlow
        # issue 118344), so the resizes around the model stay plain TensorFlow ops.
        self._network = (
            tf.function(lambda x: network(x, training=False), jit_compile=True)
            if self.jit_compile
            else (lambda x: network(x, training=False))
        )
        # One trace for every tile size (XLA, if asked, still compiles per shape).
        self._tile_fn = tf.function(
            self.tile_probabilities,
            input_signature=[tf.TensorSpec([1, None, None, 3], tf.float32)],
        )

    def settings(self) -> dict[str, Any]:
        """The inference settings, for results files."""
        return {
            "output_stride": self.output_stride,
            "scales": list(self.scales),
            "flip": self.flip,
            "fusion": self.fusion,
            "tiling": self.tiling,
            "tile_size": list(self.tile_size),
            "tile_overlap": self.tile_overlap,
            "precision": self.precision,
        }

    def in_precision(self, precision: str) -> Predictor:
        """The same network and settings computing in ``precision`` (``self`` when it
        already does)."""
        if precision == self.precision:
            return self
        other = copy.copy(self)
        other._set_precision(precision)
        other._compile()
        return other

    def identity(self) -> dict[str, Any] | None:
        """What this predictor's outputs depend on, JSON-ready: the checkpoint file
        (absolute path, size, modification time) and the inference settings; None for
        a model without a file (a resumed job or a cache can never be sure of it)."""
        if self.checkpoint is None:
            return None
        stat = self.checkpoint.path.stat()
        return {
            "checkpoint": str(self.checkpoint.path.resolve()),
            "checkpoint_bytes": stat.st_size,
            "checkpoint_mtime_ns": stat.st_mtime_ns,
            "inference": self.settings(),
        }

    def job_identity(self) -> dict[str, Any] | str:
        """``identity()`` for a resumable job's settings; a model without a file gets a
        token of this process and object, so its partial work is never resumed."""
        return self.identity() or f"in memory, {os.getpid()}-{id(self)}"

    def batch_probabilities(self, images: tf.Tensor) -> tf.Tensor:
        """Probabilities float32 [N, h, w, C] of images float32 [N, h, w, 3] (pixels in
        [0, 255]), each fused over the scales and flips: a TensorFlow function, traced
        into the exported SavedModel's signatures as well."""
        size = tf.shape(images)[1:3]
        count = tf.shape(images)[0]
        fused = None
        for scale in self.scales:
            x = (
                images
                if scale == 1.0
                else resize_bilinear_aligned(images, scaled_size(size, scale))
            )
            if self.flip:  # one batch of 2N: the images, then their mirrors
                x = tf.concat([x, tf.reverse(x, axis=[2])], axis=0)
            logits = resize_logits_bilinear(tf.cast(self._network(x), tf.float32), size)
            views = (
                [logits[:count], tf.reverse(logits[count:], axis=[2])] if self.flip else [logits]
            )
            if self.fusion == "mean":
                part = tf.add_n([tf.nn.softmax(view, axis=-1) for view in views])
                fused = part if fused is None else fused + part
            else:
                part = views[0] if len(views) == 1 else tf.maximum(views[0], views[1])
                fused = part if fused is None else tf.maximum(fused, part)
        if self.fusion == "mean":
            return fused / float(len(self.scales) * (2 if self.flip else 1))
        return tf.nn.softmax(fused, axis=-1)

    def tile_probabilities(self, tile: tf.Tensor) -> tf.Tensor:
        """Probabilities float32 [h, w, C] of one tile float32 [1, h, w, 3]."""
        return self.batch_probabilities(tile)[0]

    def _tile(self, image: np.ndarray) -> np.ndarray:
        tile = tf.convert_to_tensor(np.asarray(image, np.float32)[None])
        return self._tile_fn(tile).numpy()

    def bands(self, image: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (first row, probabilities float32 [rows, W, C]) for consecutive row
        bands that together cover the image, top to bottom.

        Whole images come as one band. Tiled images come one band per row of tiles,
        each final (no later tile overlaps it), so a caller can reduce or write a band
        and drop it: only ``tile_size`` rows of probabilities are held at a time.
        """
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise InferenceError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
        height, width = image.shape[:2]
        tile_h, tile_w = min(self.tile_size[0], height), min(self.tile_size[1], width)
        if self.tiling == "whole" or (tile_h == height and tile_w == width):
            yield 0, self._tile(image)
            return
        rows = tile_starts(height, tile_h, self.tile_overlap)
        cols = tile_starts(width, tile_w, self.tile_overlap)
        # Sums and counts of the rows of the current row of tiles; total[0] is image row
        # ``row``. Rows above the next row of tiles receive nothing more: they are
        # emitted, and the overlap moves up to the top of the buffers.
        total = np.zeros((tile_h, width, self.num_classes), np.float32)
        count = np.zeros((tile_h, width), np.float32)
        for i, row in enumerate(rows):
            for col in cols:
                probabilities = self._tile(image[row : row + tile_h, col : col + tile_w])
                total[:, col : col + tile_w] += probabilities
                count[:, col : col + tile_w] += 1.0
            done = rows[i + 1] - row if i + 1 < len(rows) else tile_h
            yield row, total[:done] / count[:done, :, None]
            keep = tile_h - done
            total[:keep], count[:keep] = total[done:], count[done:]
            total[keep:], count[keep:] = 0.0, 0.0

    def predict(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Probabilities float32 [H, W, C] of an RGB image [H, W, 3] (uint8 or float in
        [0, 255]); written into ``out`` when given (any [H, W, C] array, e.g. a
        ``numpy.lib.format.open_memmap``)."""
        image = np.asarray(image)
        if out is None:
            out = np.empty((*image.shape[:2], self.num_classes), np.float32)
        for start, band in self.bands(image):
            out[start : start + band.shape[0]] = band
        return out

    def predict_labels(
        self, image: np.ndarray, probabilities_out: np.ndarray | None = None
    ) -> np.ndarray:
        """Class ids uint8 [H, W] (argmax of the probabilities), holding one band of
        probabilities at a time; also writes them into ``probabilities_out`` if given."""
        image = np.asarray(image)
        labels = np.empty(image.shape[:2], np.uint8)
        for start, band in self.bands(image):
            rows = slice(start, start + band.shape[0])
            labels[rows] = band.argmax(axis=-1)
            if probabilities_out is not None:
                probabilities_out[rows] = band
        return labels

"""Pictures of segmentations: palettes, coloured masks, overlays, legends, panels and plots.

Everything works on numpy arrays and returns uint8 RGB arrays (or a palette PIL image
for masks), drawn with PIL alone, so TensorBoard, ``evaluate.py`` and ``predict.py``
show the same pictures without a plotting library.

Palettes are the dataset declarations' (``deeplab_tf.data.specs``): the PASCAL VOC
bit-shift colour map, the Cityscapes colours, and for custom datasets without colours
the VOC map generated for their number of classes. Index 255 (ignore) has the
dataset's ignore colour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deeplab_tf.data.specs import IGNORE_LABEL, DatasetSpec, voc_colormap

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GREY = (128, 128, 128)
# Line colours of plots: distinct on white (the Tableau 10 set).
PLOT_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))


# === Palettes and masks ===


def palette(source: DatasetSpec | int | None = None) -> np.ndarray:
    """uint8 [256, 3] colours by class id.

    Args:
        source: a dataset spec (its class colours, its ignore colour at 255), or a
            number of classes / None when no dataset is known (the VOC bit-shift map,
            which gives every id up to 255 its own colour).
    """
    if isinstance(source, DatasetSpec):
        return source.palette()
    return voc_colormap(256)


def colorize(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Class ids [H, W] -> uint8 RGB [H, W, 3] through a [256, 3] palette."""
    return np.asarray(colours, np.uint8)[np.asarray(labels).astype(np.intp)]


def indexed_png(labels: np.ndarray, colours: np.ndarray) -> Image.Image:
    """A palette ("P" mode) PIL image: pixel values are the class ids, shown in colour."""
    image = Image.fromarray(np.ascontiguousarray(labels, np.uint8), mode="P")
    image.putpalette(np.asarray(colours, np.uint8).ravel().tolist())
    return image


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    colours: np.ndarray,
    alpha: float = 0.5,
    ignore_label: int = IGNORE_LABEL,
) -> np.ndarray:
    """The image with class colours blended in at opacity ``alpha`` (ignore pixels left clear).

    Blended by PIL in uint8, so a 4000x6000 photo needs about three copies of the image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = Image.fromarray(np.asarray(image, np.uint8))
    blended = np.asarray(Image.blend(base, Image.fromarray(colorize(labels, colours)), alpha))
    ignored = np.asarray(labels) == ignore_label
    if ignored.any():
        blended = np.where(ignored[..., None], np.asarray(image, np.uint8), blended)
    return blended


# === Text, legends and panels ===


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _text_size(text: str, font) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def legend(
    class_names: Sequence[str],
    colours: np.ndarray,
    classes: Sequence[int] | None = None,
    font_size: int = 12,
) -> np.ndarray:
    """A white uint8 image listing a colour swatch and name per class.

    Args:
        class_names: names by class id.
        colours: [256, 3] palette.
        classes: the ids to list (default: all), e.g. those present in one image.
    """
    ids = list(range(len(class_names))) if classes is None else [int(c) for c in classes]
    font = _font(font_size)
    line = font_size + 6
    widths = [_text_size(class_names[i], font)[0] for i in ids] or [0]
    canvas = Image.new("RGB", (line + 12 + max(widths) + 6, max(1, len(ids)) * line + 6), WHITE)
    draw = ImageDraw.Draw(canvas)
    for row, class_id in enumerate(ids):
        y = 3 + row * line
        colour = tuple(int(v) for v in colours[class_id])
        draw.rectangle([4, y + 1, 4 + line - 4, y + line - 3], fill=colour, outline=GREY)
        draw.text((line + 8, y + 1), class_names[class_id], fill=BLACK, font=font)
    return np.asarray(canvas)


def side_by_side(images: Sequence[np.ndarray], gap: int = 2, fill=WHITE) -> np.ndarray:
    """Images of any heights placed left to right, top-aligned, ``gap`` pixels apart."""
    images = [np.asarray(im, np.uint8) for im in images]
    height = max(im.shape[0] for im in images)
    width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = fill
    x = 0
    for im in images:
        canvas[: im.shape[0], x : x + im.shape[1]] = im if im.ndim == 3 else im[..., None]
        x += im.shape[1] + gap
    return canvas


def panels(
    image: np.ndarray,
    label_maps: Sequence[np.ndarray],
    colours: np.ndarray,
    gap: int = 2,
) -> np.ndarray:
    """image | coloured label map | ... side by side (e.g. image | ground truth | prediction)."""
    return side_by_side(
        [np.asarray(image, np.uint8), *(colorize(m, colours) for m in label_maps)], gap=gap
    )


# === Plots ===


def confusion_matrix_image(
    confusion: np.ndarray, class_names: Sequence[str], max_size: int = 900
) -> np.ndarray:
    """A heat map of the row-normalised confusion matrix (rows: label, columns: prediction).

    Cell (t, p) is the fraction of pixels of class t predicted as p, from white (0) to
    dark blue (1); with cells large enough, the percentage is written in them.
    """
    m = np.asarray(confusion, np.float64)
    n = m.shape[0]
    totals = m.sum(1, keepdims=True)
    rows = np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)
    cell = int(np.clip(max_size // max(n, 1), 4, 48))
    font = _font(max(8, min(12, cell // 3)) if cell >= 16 else 10)
    margin = max(_text_size(name, font)[0] for name in class_names) + 8
    title_h = 22
    grid = n * cell
    canvas = Image.new("RGB", (margin + grid + 4, title_h + margin + grid + 4), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), "label (rows) vs prediction (columns), % of label pixels", BLACK, font)
    x0, y0 = margin, title_h + margin
    for t in range(n):
        for p in range(n):
            v = rows[t, p]
            colour = tuple(int(255 - v * (255 - c)) for c in (8, 48, 107))
            box = [x0 + p * cell, y0 + t * cell, x0 + (p + 1) * cell - 1, y0 + (t + 1) * cell - 1]
            draw.rectangle(box, fill=colour)
            if cell >= 28 and v > 0:
                text = f"{100 * v:.0f}"
                w, h = _text_size(text, font)
                fill = WHITE if v > 0.5 else BLACK
                draw.text((box[0] + (cell - w) // 2, box[1] + (cell - h) // 2), text, fill, font)
    if cell >= 8:
        for i, name in enumerate(class_names):
            w, h = _text_size(name, font)
            draw.text((x0 - w - 4, y0 + i * cell + (cell - h) // 2), name, BLACK, font)
            label = Image.new("RGB", (w + 2, h + 4), WHITE)
            ImageDraw.Draw(label).text((0, 0), name, BLACK, font)
            rotated = label.rotate(90, expand=True)
            x = x0 + i * cell + (cell - rotated.width) // 2
            canvas.paste(rotated, (x, y0 - rotated.height - 4))
    draw.rectangle([x0 - 1, y0 - 1, x0 + grid, y0 + grid], outline=GREY)
    return np.asarray(canvas)


def line_plot(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    title: str,
    x_label: str,
    y_label: str,
    size: tuple[int, int] = (640, 420),
) -> np.ndarray:
    """A line chart of ``series`` (name -> y values at ``x``) with axes, ticks and a key.

    The y axis runs from 0 to the next multiple of 10 above the largest value (for
    percentages: 0..100 at most).
    """
    width, height = size
    font = _font(12)
    left, right, top, bottom = 56, 16, 30, 44
    canvas = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(canvas)
    values = [float(v) for ys in series.values() for v in ys if v is not None and np.isfinite(v)]
    y_max = max(10.0, 10.0 * np.ceil(max(values, default=1.0) / 10.0))
    x_min, x_max = float(min(x)), float(max(x))
    span = x_max - x_min or 1.0

    def to_px(xv: float, yv: float) -> tuple[float, float]:
        px = left + (xv - x_min) / span * (width - left - right)
        py = height - bottom - yv / y_max * (height - top - bottom)
        return px, py

    draw.text((left, 8), title, BLACK, font)
    draw.line([to_px(x_min, 0), to_px(x_max, 0)], fill=BLACK)
    draw.line([to_px(x_min, 0), to_px(x_min, y_max)], fill=BLACK)
    for k in range(6):
        yv = y_max * k / 5
        px, py = to_px(x_min, yv)
        draw.line([(px - 4, py), (px, py)], fill=BLACK)
        text = f"{yv:g}"
        draw.text((px - 8 - _text_size(text, font)[0], py - 7), text, BLACK, font)
    for xv in x:
        px, py = to_px(float(xv), 0)
        draw.line([(px, py), (px, py + 4)], fill=BLACK)
        text = f"{xv:g}"
        draw.text((px - _text_size(text, font)[0] / 2, py + 6), text, BLACK, font)
    w, _ = _text_size(x_label, font)
    draw.text(((left + width - right - w) / 2, height - 18), x_label, BLACK, font)
    y_text = Image.new("RGB", (_text_size(y_label, font)[0] + 2, 16), WHITE)
    ImageDraw.Draw(y_text).text((0, 0), y_label, BLACK, font)
    y_text = y_text.rotate(90, expand=True)
    canvas.paste(y_text, (4, top + (height - top - bottom - y_text.height) // 2))
    for i, (name, ys) in enumerate(series.items()):
        colour = PLOT_COLOURS[i % len(PLOT_COLOURS)]
        points = [to_px(float(xv), float(yv)) for xv, yv in zip(x, ys, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        key_y = top + 4 + 16 * i
        draw.line([(width - right - 150, key_y + 7), (width - right - 130, key_y + 7)], colour, 2)
        draw.text((width - right - 124, key_y), name, BLACK, font)
    return np.asarray(canvas)


def save_png(array: np.ndarray, path) -> None:
    """Writes a uint8 RGB array as PNG."""
    Image.fromarray(np.asarray(array, np.uint8)).save(path)

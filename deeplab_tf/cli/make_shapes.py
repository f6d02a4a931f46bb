"""Generate the built-in shapes dataset (VOC layout) and optionally its TFRecords.

Usage:
    python datasets/make_shapes.py --output-dir data/shapes/raw \
        --tfrecord-dir data/shapes/tfrecord

Writes JPEGImages/, palette SegmentationClass/ PNGs and ImageSets/Segmentation/
{train,val}.txt, deterministically from ``--seed``, in about half a minute (see
deeplab_tf/data/shapes.py for what the images contain). Exit code 2 on bad input.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from deeplab_tf.cli import common
from deeplab_tf.data import shapes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common.tool_parser(__doc__)
    parser.add_argument("--output-dir", required=True, type=Path, help="VOC-layout tree")
    parser.add_argument("--tfrecord-dir", type=Path, help="also build TFRecords here")
    parser.add_argument("--num-train", type=int, default=shapes.DEFAULTS["num_train"])
    parser.add_argument("--num-val", type=int, default=shapes.DEFAULTS["num_val"])
    parser.add_argument("--image-size", type=int, default=shapes.DEFAULTS["image_size"])
    parser.add_argument("--seed", type=int, default=shapes.DEFAULTS["seed"])
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--quiet", action="store_true", help="no progress")
    return common.parse(parser, argv)


@common.handles_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shapes.make_shapes(
        args.output_dir, args.tfrecord_dir, overwrite=args.overwrite, progress=not args.quiet,
        num_train=args.num_train, num_val=args.num_val, image_size=args.image_size,
        seed=args.seed,
    )  # fmt: skip
    return 0


cli = common.entry_point(main)

if __name__ == "__main__":
    cli()

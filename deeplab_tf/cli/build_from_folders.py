"""Build TFRecords from an images folder and a masks folder (custom data, no code).

Usage:
    python datasets/build_from_folders.py --dataset my_dataset.yaml \
        --images images/ --masks masks/ --split train=lists/train.txt \
        --split val=lists/val.txt --output-dir data/my_dataset

``--dataset`` is a registered name (e.g. pascal_voc_2012) or a JSON/YAML declaration
(see deeplab_tf/data/specs.py). Images and masks are paired by file stem. Masks may be
index PNGs, palette PNGs (their indices are used) or RGB colour masks, mapped back to
class ids through the declaration's colours (``--mask-format rgb`` forces this,
``index`` refuses colour masks). ``--split NAME=LIST`` takes the stems in LIST (one
per line); ``--split NAME`` alone takes every image. Exit code 2 on bad input.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from deeplab_tf.cli import common
from deeplab_tf.data import sources
from deeplab_tf.data.build import MASK_FORMATS
from deeplab_tf.data.specs import get_spec


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common.tool_parser(__doc__)
    parser.add_argument("--dataset", required=True, help="registered name or .json/.yaml file")
    parser.add_argument("--images", required=True, type=Path, help="images directory")
    parser.add_argument("--masks", required=True, type=Path, help="masks directory")
    parser.add_argument(
        "--split", action="append", default=None, metavar="NAME[=LIST]",
        help="split name, optionally with a list file of stems (repeatable; default: train)",
    )  # fmt: skip
    parser.add_argument("--mask-format", choices=MASK_FORMATS, default="auto")
    common.add_build_arguments(parser)
    return common.parse(parser, argv)


@common.handles_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sources.build_from_folders(
        args.images, args.masks, get_spec(args.dataset), args.output_dir,
        args.split or ["train"], mask_format=args.mask_format, **common.build_options(args),
    )  # fmt: skip
    return 0


cli = common.entry_point(main)

if __name__ == "__main__":
    cli()

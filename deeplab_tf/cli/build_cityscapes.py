"""Build TFRecords of Cityscapes with train ids (19 classes, 255 = ignore).

Usage:
    python datasets/build_cityscapes.py --cityscapes-root cityscapes \
        --splits train val --output-dir data/cityscapes
    python datasets/build_cityscapes.py --cityscapes-root cityscapes --coarse \
        --splits train_extra --output-dir data/cityscapes

``--cityscapes-root`` holds leftImg8bit/ and gtFine/ (and gtCoarse/ for ``--coarse``).
``*_gtFine_labelIds.png`` are mapped to train ids with the cityscapesScripts table;
coarse splits are written as ``coarse_{split}``. Counts of the complete dataset are
asserted; ``--no-count-check`` builds a partial download. Exit code 2 on bad input.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from deeplab_tf.cli import common
from deeplab_tf.data import sources


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common.tool_parser(__doc__)
    parser.add_argument("--cityscapes-root", required=True, type=Path)
    parser.add_argument(
        "--splits", nargs="+", default=["train", "val"], choices=sources.CITYSCAPES_SPLITS
    )
    parser.add_argument("--coarse", action="store_true", help="use gtCoarse annotations")
    parser.add_argument("--no-count-check", action="store_true", help="allow partial data")
    common.add_build_arguments(parser)
    return common.parse(parser, argv)


@common.handles_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sources.build_cityscapes(
        args.cityscapes_root, args.output_dir, args.splits, coarse=args.coarse,
        check_counts=not args.no_count_check, **common.build_options(args),
    )  # fmt: skip
    return 0


cli = common.entry_point(main)

if __name__ == "__main__":
    cli()

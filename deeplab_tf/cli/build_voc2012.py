"""Build TFRecords of PASCAL VOC 2012 (train / val / trainval, and train_aug with SBD).

Usage:
    python datasets/build_voc2012.py --voc-root VOCdevkit/VOC2012 \
        --sbd-root benchmark_RELEASE/dataset --splits train_aug val --output-dir data/voc2012

``--voc-root`` holds JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/;
``--sbd-root`` (only for train_aug) holds cls/*.mat, train.txt and val.txt. train_aug
is VOC train + SBD train/val - VOC val: 10,582 images. Counts of the complete dataset
are asserted; ``--no-count-check`` builds a partial download. Exit code 2 on bad input.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from deeplab_tf.cli import common
from deeplab_tf.data import sources


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = common.tool_parser(__doc__)
    parser.add_argument("--voc-root", required=True, type=Path, help="VOCdevkit/VOC2012")
    parser.add_argument("--sbd-root", type=Path, help="SBD benchmark_RELEASE/dataset")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=sources.VOC_SPLITS)
    parser.add_argument("--no-count-check", action="store_true", help="allow partial data")
    common.add_build_arguments(parser)
    return common.parse(parser, argv)


@common.handles_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sources.build_voc2012(
        args.voc_root, args.output_dir, args.splits, sbd_root=args.sbd_root,
        check_counts=not args.no_count_check, **common.build_options(args),
    )  # fmt: skip
    return 0


cli = common.entry_point(main)

if __name__ == "__main__":
    cli()

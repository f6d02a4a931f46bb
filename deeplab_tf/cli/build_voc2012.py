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

from deeplab_tf import console
from deeplab_tf.data.build import add_common_args, build_split
from deeplab_tf.data.sources import VOC_EXPECTED_COUNTS, VOC_SPLITS, voc2012_pairs
from deeplab_tf.data.specs import SPECS


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = console.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=console.VERBOSE_HELP
    )
    parser.add_argument("--voc-root", required=True, type=Path, help="VOCdevkit/VOC2012")
    parser.add_argument("--sbd-root", type=Path, help="SBD benchmark_RELEASE/dataset")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=VOC_SPLITS)
    parser.add_argument("--no-count-check", action="store_true", help="allow partial data")
    add_common_args(parser)
    console.add_verbose_argument(parser)
    return parser.parse_args(argv)


@console.handles_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def build() -> None:
        for split in args.splits:
            pairs = voc2012_pairs(args.voc_root, split, args.sbd_root)
            build_split(
                pairs, SPECS["pascal_voc_2012"], args.output_dir, split,
                num_shards=args.num_shards, skip_bad=args.skip_bad, overwrite=args.overwrite,
                expected_count=None if args.no_count_check else VOC_EXPECTED_COUNTS[split],
                progress=not args.quiet,
            )  # fmt: skip

    build()
    return 0


cli = console.entry_point(main)

if __name__ == "__main__":
    cli()

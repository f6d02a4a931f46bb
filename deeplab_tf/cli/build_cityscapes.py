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

from deeplab_tf import console
from deeplab_tf.data.build import add_common_args, build_split
from deeplab_tf.data.sources import CITYSCAPES_EXPECTED_COUNTS, CITYSCAPES_SPLITS, cityscapes_pairs
from deeplab_tf.data.specs import SPECS


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = console.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=console.VERBOSE_HELP
    )
    parser.add_argument("--cityscapes-root", required=True, type=Path)
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=CITYSCAPES_SPLITS)
    parser.add_argument("--coarse", action="store_true", help="use gtCoarse annotations")
    parser.add_argument("--no-count-check", action="store_true", help="allow partial data")
    add_common_args(parser)
    console.add_verbose_argument(parser)
    return parser.parse_args(argv)


@console.handles_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    annotations = "gtCoarse" if args.coarse else "gtFine"

    def build() -> None:
        for split in args.splits:
            pairs = cityscapes_pairs(args.cityscapes_root, split, annotations)
            expected = CITYSCAPES_EXPECTED_COUNTS.get((annotations, split))
            build_split(
                pairs, SPECS["cityscapes"], args.output_dir,
                f"coarse_{split}" if args.coarse else split,
                num_shards=args.num_shards, skip_bad=args.skip_bad, overwrite=args.overwrite,
                expected_count=None if args.no_count_check else expected,
                progress=not args.quiet,
            )  # fmt: skip

    build()
    return 0


cli = console.entry_point(main)

if __name__ == "__main__":
    cli()

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

from deeplab_tf import console
from deeplab_tf.data import shapes
from deeplab_tf.data.build import BadInputError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = console.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=console.VERBOSE_HELP
    )
    parser.add_argument("--output-dir", required=True, type=Path, help="VOC-layout tree")
    parser.add_argument("--tfrecord-dir", type=Path, help="also build TFRecords here")
    parser.add_argument("--num-train", type=int, default=shapes.DEFAULTS["num_train"])
    parser.add_argument("--num-val", type=int, default=shapes.DEFAULTS["num_val"])
    parser.add_argument("--image-size", type=int, default=shapes.DEFAULTS["image_size"])
    parser.add_argument("--seed", type=int, default=shapes.DEFAULTS["seed"])
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--quiet", action="store_true", help="no progress")
    console.add_verbose_argument(parser)
    return parser.parse_args(argv)


@console.handles_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def make() -> None:
        params = {"num_train": args.num_train, "num_val": args.num_val,
                  "image_size": args.image_size, "seed": args.seed}  # fmt: skip
        if not args.overwrite and shapes.generated_with(args.output_dir, **params):
            # The same command again (say after a kill while the TFRecords were built).
            print(f"{args.output_dir}: already generated with these settings, kept")
        else:
            try:
                shapes.generate_shapes(
                    args.output_dir, overwrite=args.overwrite, progress=not args.quiet, **params
                )
            except FileExistsError as e:
                raise BadInputError(str(e)) from None
        if args.tfrecord_dir is not None:
            shapes.build_shapes_tfrecords(
                args.output_dir, args.tfrecord_dir, args.overwrite, progress=not args.quiet
            )

    make()
    return 0


cli = console.entry_point(main)

if __name__ == "__main__":
    cli()

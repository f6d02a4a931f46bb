"""Describe a DeepLab variant: settings, paper, layers, parameters, output size.

python describe.py --list
python describe.py deeplabv3 --num-classes 21 [--output-stride 8] [--input-size 513]
(installed: deeplab-describe deeplabv3)
"""

from __future__ import annotations

import argparse
import sys

from deeplab_tf.cli import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.tool_parser(__doc__)
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    parser.add_argument("name", nargs="?", metavar="VARIANT", help="a name from --list")
    parser.add_argument("--variant", help="the same as VARIANT (default: deeplabv3)")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--output-stride", type=int, choices=(8, 16, 32), default=None)
    parser.add_argument(
        "--input-size", type=int, nargs="+", default=[513], help="H [W] of the test image"
    )
    args = common.parse(parser, argv)
    if args.name and args.variant and args.name != args.variant:
        parser.error(f"two variants given: {args.name} and --variant {args.variant}")
    args.variant = args.name or args.variant or "deeplabv3"
    return args


@common.handles_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from deeplab_tf import VARIANTS
    from deeplab_tf.model import describe_model

    if args.list:
        for name, variant in VARIANTS.items():
            print(f"{name:24s} {variant.paper}")
        return 0
    if len(args.input_size) > 2:
        print("error: --input-size takes H or H W", file=sys.stderr)
        return 2
    size = (args.input_size[0], args.input_size[-1])
    print(describe_model(args.variant, args.num_classes, args.output_stride, size))
    return 0


cli = common.entry_point(main)

if __name__ == "__main__":
    cli()

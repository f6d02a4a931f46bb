"""Export a DeepLab checkpoint for TF Serving, TFLite and Python apps.

    python export.py --model-dir runs/quickstart --format all --input-size 96
    python export.py --checkpoint runs/v3/best.keras --variant deeplabv3 --output-stride 8 \\
        --format savedmodel --export-dir /models --name deeplabv3 --version 3
    python export.py --model-dir runs/quickstart --format tflite --quantize none float16 int8 \\
        --representative-split train --evaluate-split val

Writes EXPORT_DIR/NAME/VERSION/ (TF Serving's layout; default version: one more than
the highest) with the SavedModel (signatures serving_default, predict_encoded,
predict_example, classes), model_{float32,float16,int8}.tflite at --input-size (default:
the training crop size), model.keras and export.json, into a temporary directory
renamed when complete. An existing version is replaced only with --overwrite.
--precision bfloat16 makes the SavedModel compute in bfloat16 (TFLite files and
model.keras stay float32; --quantize has float16 and int8).
"""

from __future__ import annotations

import argparse

from deeplab_tf.cli import common
from deeplab_tf.export import DEFAULT_MAX_IMAGE_SIZE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.tool_parser(__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", help="a training model directory (its best.keras)")
    source.add_argument("--checkpoint", help="a .keras file (or a model directory)")
    p.add_argument("--variant", help="the checkpoint's variant (default: its config.json)")
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32), help="export at this stride")
    p.add_argument(
        "--format", nargs="+", default=["savedmodel"], help="savedmodel, tflite, keras or all"
    )
    p.add_argument("--export-dir", default="exports", help="holds NAME/VERSION/")
    p.add_argument("--name", help="the model's name (default: its variant)")
    p.add_argument("--version", type=int, help="default: one more than the highest existing")
    p.add_argument("--input-size", help="H or H,W of the TFLite models (default: the crop size)")
    p.add_argument("--quantize", nargs="+", default=["none"], help="none, float16 and/or int8")
    p.add_argument("--data-dir", help="TFRecords for int8 calibration (default: the training data)")
    p.add_argument("--representative-split", default="train", help="int8 calibration images")
    p.add_argument("--calibration-images", type=int, default=100)
    p.add_argument("--evaluate-split", help="score the network and each TFLite file on it")
    p.add_argument("--dataset", help="class names and colours (default: the checkpoint's data)")
    p.add_argument(
        "--crf",
        nargs="?",
        const="",
        metavar="PARAMS_JSON",
        help="add the dense CRF (TensorFlow backend) to the SavedModel, with these parameters",
    )
    common.add_precision_argument(parser=p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing version")
    p.add_argument("--quiet", action="store_true", help="no progress (only the summary)")
    p.add_argument(
        "--max-image-size",
        type=int,
        default=DEFAULT_MAX_IMAGE_SIZE,
        help="the largest image side the SavedModel accepts (it runs whole images)",
    )
    return common.parse(p, argv)


@common.handles_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from deeplab_tf import export

    result = export.export_checkpoint(
        args.model_dir or args.checkpoint,
        args.export_dir,
        flag="--model-dir" if args.model_dir else "--checkpoint",
        variant=args.variant,
        output_stride=args.output_stride,
        name=args.name,
        version=args.version,
        dataset=args.dataset,
        data_dir=args.data_dir,
        formats=export.parse_formats(args.format),
        input_size=export.parse_input_size(args.input_size),
        quantize=export.parse_quantize(args.quantize),
        representative_split=args.representative_split,
        calibration_images=args.calibration_images,
        evaluate_split=args.evaluate_split,
        crf=export.load_crf(args.crf or None) if args.crf is not None else None,
        max_image_size=args.max_image_size,
        precision=args.precision,
        overwrite=args.overwrite,
        log=(lambda line: None) if args.quiet else print,
        progress=not args.quiet,
    )
    print(export.format_summary(result))
    return 0


cli = common.entry_point(main)

if __name__ == "__main__":
    cli()

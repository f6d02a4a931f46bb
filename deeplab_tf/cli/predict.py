"""Predict segmentation masks for images with a DeepLab checkpoint.

    python predict.py --checkpoint runs/quickstart photos/ 'more/*.jpg' one.png \\
        --output-dir predictions [--overwrite] [--output-stride 8 --scales v3 --flip] \\
        [--crf --crf-params runs/quickstart/crf-val/crf_params.json]

Inputs are image files, folders (their images) and glob patterns. For each image,
--output-dir gets NAME.png (indexed mask in the dataset's palette), NAME_overlay.jpg
(colours over the image, legend beside it) and, with --save-probabilities,
NAME_probabilities.npy (float32 H x W x classes); plus legend.png and summary.json.
With --crf (or --crf-params FILE, e.g. tune_crf.py's output) the masks are the dense
CRF's refinement of the network's probabilities. Unreadable images are reported and
skipped (exit code 1 if any was skipped).
"""

from __future__ import annotations

import argparse

from deeplab_tf.cli import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.tool_parser(__doc__)
    p.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    common.add_predictor_arguments(p)
    common.add_output_arguments(p, "default: predictions", default="predictions")
    p.add_argument("--dataset", help="class names and colours (default: the checkpoint's data)")
    p.add_argument("--save-probabilities", action="store_true", help="NAME_probabilities.npy")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the overlay colours")
    p.add_argument(
        "--legend",
        choices=("overlay", "file", "none"),
        default="overlay",
        help="beside each overlay (and legend.png), legend.png only, or none",
    )
    common.add_crf_arguments(p, workers=False)
    return common.parse(p, argv)


@common.handles_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from deeplab_tf import prediction

    crf_params = common.crf_params_from_args(args)
    # Fail before loading the model.
    prediction.check_job(args.inputs, args.output_dir, args.overwrite, args.alpha, args.legend)
    predictor = common.predictor_from_args(args)
    spec = prediction.resolve_spec(predictor, args.dataset)
    summary = prediction.predict_files(
        predictor,
        args.inputs,
        args.output_dir,
        spec,
        overwrite=args.overwrite,
        save_probabilities=args.save_probabilities,
        alpha=args.alpha,
        legend=args.legend,
        crf_params=crf_params,
        crf_backend=args.crf_backend,
        progress=not args.quiet,
    )
    print(
        f"{len(summary['images'])} images predicted, {len(summary['skipped'])} skipped; "
        f"masks and overlays (*_overlay.jpg) in {args.output_dir}"
    )
    return 1 if summary["skipped"] else 0


cli = common.entry_point(main)

if __name__ == "__main__":
    cli()

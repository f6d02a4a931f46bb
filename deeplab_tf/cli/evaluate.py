"""Evaluate a DeepLab checkpoint on a dataset split.

    python evaluate.py --checkpoint runs/quickstart                      # its val split
    python evaluate.py --checkpoint runs/v3-os8 --data-dir data/voc2012 --output-stride 8 \\
        --scales v3 --flip --trimap 1,2,5,10,20,40                       # v3 Table 6 protocol
    python evaluate.py --checkpoint runs/quickstart --trimap 1,2,5,10 \\
        --crf --crf-params runs/quickstart/crf-val/crf_params.json       # before and after CRF

Scores (mean IoU, per-class IoU, pixel accuracy, mean class accuracy, frequency-weighted
IoU) at the labels' full resolution, optionally within bands around label boundaries
(--trimap). Writes results.json, results.md, confusion_matrix.png, trimap.png and
panels/ (image | ground truth | prediction) into --output-dir (default: eval-SPLIT in
the checkpoint's directory) and prints the table. With --crf the network's probabilities
of each image are also refined by the dense CRF (parameters from --crf-params, e.g.
tune_crf.py's output, else the defaults) and every score is reported before and after it.
"""

from __future__ import annotations

import argparse

from deeplab_tf.cli import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.tool_parser(__doc__)
    common.add_predictor_arguments(p)
    p.add_argument("--data-dir", help="TFRecords (default: the checkpoint's training data)")
    p.add_argument("--split", default="val")
    p.add_argument("--trimap", help="band widths in pixels, e.g. 1,2,5,10,20,40")
    p.add_argument(
        "--trimap-from",
        choices=("auto", "ignore", "edges"),
        default="auto",
        help="boundaries: the ignore band (auto where the dataset has one) or label edges",
    )
    p.add_argument("--max-images", type=int, help="only the first N images (a quick look)")
    p.add_argument("--panels", type=int, default=8, help="image|label|prediction pictures")
    common.add_output_arguments(p, "default: CHECKPOINT_DIR/eval-SPLIT")
    common.add_crf_arguments(p)
    return common.parse(p, argv)


@common.handles_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from deeplab_tf import evaluation
    from deeplab_tf.inference import data_dir_of, read_checkpoint_info

    widths = common.parse_int_list(args.trimap, "--trimap")
    common.positive(args.max_images, "--max-images")
    crf_params = common.crf_params_from_args(args)
    checkpoint = read_checkpoint_info(args.checkpoint)
    output_dir = args.output_dir or checkpoint.path.parent / f"eval-{args.split}"
    evaluation.check_output_dir(output_dir, args.overwrite)  # fail before the work
    predictor = common.predictor_from_args(args)  # a broken checkpoint first, then its data
    data_dir = data_dir_of(checkpoint, args.data_dir)
    print(f"evaluating {predictor.checkpoint.path} on {data_dir} {args.split}")
    result = evaluation.evaluate_into(
        predictor,
        data_dir,
        args.split,
        output_dir,
        overwrite=args.overwrite,
        trimap_widths=widths,
        trimap_source=args.trimap_from,
        max_images=args.max_images,
        num_panels=args.panels,
        progress=not args.quiet,
        crf_params=crf_params,
        crf_backend=args.crf_backend,
        crf_workers=args.crf_workers,
    )
    print(evaluation.format_results(result.results))
    print(f"results, tables and pictures in {output_dir}")
    return 0


cli = common.entry_point(main)

if __name__ == "__main__":
    cli()

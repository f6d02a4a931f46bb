"""Cross-validate the dense CRF's parameters on a checkpoint's validation images.

    python tune_crf.py --checkpoint runs/quickstart                 # v2 paper grid, 100 val images
    python tune_crf.py --checkpoint runs/quickstart --num-images 20 --sa 5:5:40 --sb 3,5,10,20
    python evaluate.py --checkpoint runs/quickstart --trimap 1,2,5,10 \\
        --crf-params runs/quickstart/crf-val/crf_params.json     # use the result

The v2 paper's coarse-to-fine search (section 4.1): w2 = 3, sg = 3 and 10 iterations
fixed; every combination of --w1, --sa, --sb (default w1 3:6, sa 30:10:100, sb 3:6, in
the paper's START:STEP:STOP notation) scored by mean IoU on the first --num-images images,
then --rounds - 1 rounds with the steps halved around the best. The network runs once:
its probabilities are cached in --output-dir (default CHECKPOINT_DIR/crf-SPLIT) as
probabilities.npz and reused by a rerun. Writes crf_params.json (best parameters and all
rows; what --crf-params reads) and search.md, and prints the best rows.
"""

from __future__ import annotations

import argparse

from deeplab_tf.cli import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from deeplab_tf.crf_tuning import DEFAULT_NUM_IMAGES

    p = common.tool_parser(__doc__)
    common.add_predictor_arguments(p)
    p.add_argument("--data-dir", help="TFRecords (default: the checkpoint's training data)")
    p.add_argument("--split", default="val")
    p.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES, help="the first N")
    p.add_argument("--w1", default="3:6", help="bilateral weights (paper: 3:6)")
    p.add_argument("--sa", default="30:10:100", help="bilateral position sigmas, pixels")
    p.add_argument("--sb", default="3:6", help="bilateral colour sigmas, RGB levels")
    p.add_argument("--w2", type=float, default=3.0, help="Gaussian kernel weight (fixed)")
    p.add_argument("--sg", type=float, default=3.0, help="Gaussian kernel sigma (fixed)")
    p.add_argument("--iterations", type=int, default=10, help="mean-field iterations")
    p.add_argument("--rounds", type=int, default=2, help="1 = the coarse grid only")
    common.add_crf_arguments(p, switch=False)
    p.add_argument("--top", type=int, default=10, help="rows of the printed table")
    common.add_output_arguments(p, "default: CHECKPOINT_DIR/crf-SPLIT", "replace earlier results")
    return common.parse(p, argv)


@common.handles_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from deeplab_tf import crf, crf_tuning
    from deeplab_tf.inference import data_dir_of, read_checkpoint_info

    grid = crf.SearchGrid(
        w1=crf_tuning.parse_values(args.w1, "--w1"),
        sa=crf_tuning.parse_values(args.sa, "--sa"),
        sb=crf_tuning.parse_values(args.sb, "--sb"),
    )
    base = crf.CRFParams(w2=args.w2, sg=args.sg, iterations=args.iterations)
    common.positive(args.rounds, "--rounds")
    common.positive(args.crf_workers, "--crf-workers")
    checkpoint = read_checkpoint_info(args.checkpoint)
    output_dir = args.output_dir or checkpoint.path.parent / f"crf-{args.split}"
    # Fail before loading the model.
    crf_tuning.check_job(output_dir, args.overwrite, args.num_images, args.top)
    data_dir = data_dir_of(checkpoint, args.data_dir)
    predictor = common.predictor_from_args(args)
    crf_tuning.tune_crf(
        predictor,
        data_dir,
        output_dir,
        args.split,
        num_images=args.num_images,
        grid=grid,
        base=base,
        rounds=args.rounds,
        backend=args.crf_backend,
        workers=args.crf_workers,
        overwrite=args.overwrite,
        top=args.top,
        progress=not args.quiet,
    )
    print(f"best parameters in {output_dir}/{crf_tuning.PARAMS_FILE} (use it with --crf-params)")
    return 0


cli = common.entry_point(main)

if __name__ == "__main__":
    cli()

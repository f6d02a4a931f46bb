"""Train a DeepLab model.

    python train.py                                   # built-in shapes dataset, CPU recipe
    python train.py --variant deeplabv3 --data-dir data/voc2012 --model-dir runs/v3
    python train.py --variant deeplabv3 --recipe v3-voc-trainval-os8 --data-dir data/voc2012 \\
        --init-checkpoint runs/v3 --model-dir runs/v3-os8
    python train.py --variant dilation-frontend --data-dir data/voc2012 --model-dir runs/front
    python train.py --variant dilation-context-large --data-dir data/voc2012 \\
        --init-checkpoint runs/front --model-dir runs/context    # front end frozen

Without --recipe, the recipe follows the variant and the dataset in --data-dir (its
manifest): the paper protocol for VOC and Cityscapes, the CPU recipe for the built-in
shapes, a fine-tuning protocol derived from the paper's for other data
(deeplab_tf/recipes.py). It is printed at start with where each value came from;
every flag below overrides one of them. A killed run restarted
with the same command resumes from its last backup. Multi-worker training reads
TF_CONFIG (see the README).
"""

from __future__ import annotations

import argparse

from deeplab_tf.cli import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from deeplab_tf.layers.atrous import ATROUS_IMPLEMENTATIONS

    p = common.tool_parser(__doc__)
    p.add_argument("--variant", default="deeplabv3", help="a name from describe.py --list")
    p.add_argument("--recipe", help="training protocol (default: from the variant and the data)")
    p.add_argument("--dataset", help="a dataset spec name or a custom spec file")
    p.add_argument("--data-dir", help="TFRecords from datasets/ (default: built-in shapes)")
    p.add_argument("--model-dir", default="runs/deeplab", help="checkpoints, logs, results")
    p.add_argument("--train-split")
    p.add_argument("--val-split")
    p.add_argument("--crop-size", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int)
    steps.add_argument("--epochs", type=int, help="passes over the training split")
    p.add_argument("--output-stride", type=int, choices=(8, 16, 32))
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--lr-policy", choices=("poly", "step"))
    p.add_argument("--weight-decay", type=float, help="L2 on convolution kernels")
    p.add_argument("--momentum", type=float)
    p.add_argument("--classifier-lr-multiplier", type=float)
    p.add_argument("--bn-momentum", type=float, help="batch norm decay (v3: 0.9997)")
    p.add_argument("--freeze-bn", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--train-only-new-layers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train only what the variant adds to --init-checkpoint (MSc, context module)",
    )
    p.add_argument("--sync-bn", action="store_true", help="synchronised batch norm")
    p.add_argument("--checkpoint-every", type=int, help="steps between backups and validations")
    p.add_argument("--backbone-weights", help="'imagenet' or a weights file")
    p.add_argument("--init-checkpoint", help="a .keras/.weights.h5 file or a model dir")
    p.add_argument("--class-weights", help="comma-separated weights, or inverse_sqrt etc.")
    p.add_argument("--top-k-percent-pixels", type=float, default=1.0)
    p.add_argument("--hard-example-mining-step", type=int, default=0)
    p.add_argument("--oversample-classes", help="comma-separated class ids to duplicate")
    p.add_argument(
        "--atrous-implementation",
        choices=ATROUS_IMPLEMENTATIONS,
        help="how atrous convolutions run (same weights; see README benchmarks)",
    )
    p.add_argument("--mixed-precision", action="store_true")
    p.add_argument("--jit-compile", action="store_true")
    p.add_argument("--strategy", default="auto", help="auto|mirrored|multi_worker|one_device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a finished run")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--quiet", action="store_true")
    return common.parse(p, argv)


@common.handles_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from deeplab_tf import training

    recipe, sources = training.recipe_for_data(
        args.variant,
        args.data_dir,
        recipe=args.recipe,
        dataset=args.dataset,
        overrides={
            "train_split": args.train_split,
            "val_split": args.val_split,
            "crop_size": args.crop_size,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "output_stride": args.output_stride,
            "learning_rate": args.learning_rate,
            "lr_policy": args.lr_policy,
            "weight_decay": args.weight_decay,
            "momentum": args.momentum,
            "classifier_lr_multiplier": args.classifier_lr_multiplier,
            "bn_momentum": args.bn_momentum,
            "freeze_bn": args.freeze_bn,
            "train_only_new_layers": args.train_only_new_layers,
            "checkpoint_every": args.checkpoint_every,
        },
    )
    config = training.TrainConfig(
        variant=args.variant,
        recipe=recipe,
        recipe_sources=sources,
        model_dir=args.model_dir,
        data_dir=args.data_dir,
        dataset=args.dataset,
        backbone_weights=args.backbone_weights,
        init_checkpoint=args.init_checkpoint,
        strategy=args.strategy,
        sync_bn=args.sync_bn,
        mixed_precision=args.mixed_precision,
        jit_compile=args.jit_compile,
        class_weights=common.parse_class_weights(args.class_weights),
        top_k_percent_pixels=args.top_k_percent_pixels,
        hard_example_mining_step=args.hard_example_mining_step,
        oversample_classes=common.parse_int_list(args.oversample_classes, "--oversample-classes"),
        seed=args.seed,
        **(
            {"atrous_implementation": args.atrous_implementation}
            if args.atrous_implementation
            else {}
        ),
        epochs=args.epochs,
        overwrite=args.overwrite,
        verbose=0 if args.quiet else 1,
        log_every=args.log_every,
    )
    training.train(config)
    return 0


cli = common.entry_point(main)

if __name__ == "__main__":
    cli()

"""``deeplab-tune-crf`` in a checkout: see deeplab_tf/cli/tune_crf.py (``--help``)."""

from deeplab_tf.cli.tune_crf import cli, main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    cli()

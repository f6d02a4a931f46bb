"""``deeplab-train`` in a checkout: see deeplab_tf/cli/train.py (``--help``)."""

from deeplab_tf.cli.train import cli, main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    cli()

"""``deeplab-evaluate`` in a checkout: see deeplab_tf/cli/evaluate.py (``--help``)."""

from deeplab_tf.cli.evaluate import cli, main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    cli()

"""``deeplab-describe`` in a checkout: see deeplab_tf/cli/describe.py (``--help``)."""

from deeplab_tf.cli.describe import cli, main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    cli()

"""``deeplab-export`` in a checkout: see deeplab_tf/cli/export.py (``--help``)."""

from deeplab_tf.cli.export import cli, main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    cli()

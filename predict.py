"""``deeplab-predict`` in a checkout: see deeplab_tf/cli/predict.py (``--help``)."""

from deeplab_tf.cli.predict import cli, main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    cli()

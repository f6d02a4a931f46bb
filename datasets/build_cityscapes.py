"""``deeplab-build-cityscapes`` in a checkout (``--help``).

The tool is deeplab_tf/cli/build_cityscapes.py.
"""

import os
import sys

# Run as a script from anywhere: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deeplab_tf.cli.build_cityscapes import cli, main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    cli()

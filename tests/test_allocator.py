"""``import deeplab_tf`` gives TensorFlow's CPU tensors the BFC allocator unless the user
chose (deeplab_tf/allocator.py), in a fresh process as a user's program starts."""

import os
import subprocess
import sys

import pytest

from deeplab_tf.allocator import BFC_ALLOCATOR_ENV
from tests.helpers import ROOT

# TensorFlow keeps statistics for its BFC allocator and refuses them ("Allocator stats
# not available") for the malloc-backed default: which one serves CPU:0 is visible.
WHICH_ALLOCATOR = """
import deeplab_tf
import tensorflow as tf
tf.ones([256, 256]) * 2.0
try:
    tf.config.experimental.get_memory_info("CPU:0")
    print("bfc")
except ValueError:
    print("malloc")
"""


@pytest.mark.parametrize(("user_value", "expected"), [(None, "bfc"), ("0", "malloc")])
def test_bfc_allocator_by_default_and_the_users_choice_kept(user_value, expected):
    env = {k: v for k, v in os.environ.items() if k != BFC_ALLOCATOR_ENV}
    if user_value is not None:
        env[BFC_ALLOCATOR_ENV] = user_value
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run(
        [sys.executable, "-c", WHICH_ALLOCATOR],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [expected]

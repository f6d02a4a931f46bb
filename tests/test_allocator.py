"""``import deeplab_tf`` gives TensorFlow's CPU tensors the BFC allocator where oneDNN is
off and the user did not choose (deeplab_tf/allocator.py), in a fresh process as a
user's program starts. Where oneDNN is on, TensorFlow's oneDNN allocator stays (it
pools large blocks itself); ``make test``'s numerics pass runs this both ways."""

import json
import os
import subprocess
import sys

import pytest

from deeplab_tf.allocator import BFC_ALLOCATOR_ENV
from tests.helpers import ROOT

# TensorFlow keeps statistics for its pooling allocators (BFC, oneDNN's) and refuses them
# ("Allocator stats not available") for malloc: whether CPU:0 pools is visible.
WHICH_ALLOCATOR = f"""
import json, os
import deeplab_tf
import tensorflow as tf
from deeplab_tf.precision import onednn_enabled
tf.ones([256, 256]) * 2.0
try:
    tf.config.experimental.get_memory_info("CPU:0")
    pools = True
except ValueError:
    pools = False
print(json.dumps([onednn_enabled(), os.environ.get("{BFC_ALLOCATOR_ENV}"), pools]))
"""


@pytest.mark.parametrize("user_value", [None, "0"])
def test_bfc_allocator_where_onednn_is_off_and_the_users_choice_kept(user_value):
    env = {k: v for k, v in os.environ.items() if k != BFC_ALLOCATOR_ENV}
    if user_value is not None:
        env[BFC_ALLOCATOR_ENV] = user_value
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run(
        [sys.executable, "-c", WHICH_ALLOCATOR],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    onednn, value, pools = json.loads(run.stdout.splitlines()[-1])
    if user_value is not None:
        assert value == user_value  # the user's choice is kept
        assert pools == bool(onednn)  # malloc unless oneDNN's allocator serves
    elif onednn:
        assert (value, pools) == (None, True)  # oneDNN's allocator, left as it is
    else:
        assert (value, pools) == ("1", True)  # BFC instead of malloc

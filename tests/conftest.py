"""Suite-wide settings, kept in one place.

* ``NUMERICS``: the tests whose results depend on the CPU's float32 kernels (oneDNN's
  with or without AVX-512/AMX, TensorFlow's own Eigen kernels, TFLite's). They get the
  ``numerics`` marker, and ``make test`` runs them a second time with
  ``TF_ENABLE_ONEDNN_OPTS=0``: TensorFlow's own kernels, as other CPUs get them, so a
  tolerance that holds on one CPU only fails here before it lands. Comparisons of one
  computation with itself (a reloaded model, another trace, integer counts) run on the
  same kernels whatever the CPU and are not listed.
"""

from __future__ import annotations

import pytest

NUMERICS = (
    "tests/test_backbones.py",
    "tests/test_crf.py",
    "tests/test_dilation.py",
    "tests/test_export.py",
    "tests/test_inference.py::TestOutputStride",
    "tests/test_inference.py::test_logits_after_the_classifier_are_kept",
    "tests/test_inference.py::TestScalesAndFlips",
    "tests/test_inference.py::TestSlidingWindows",
    "tests/test_layers.py",
    "tests/test_losses.py",
    "tests/test_msc.py",
    "tests/test_schedules.py",
    "tests/test_training.py::test_mirrored_sync_bn_sees_the_whole_batch",
    "tests/test_vgg.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(NUMERICS):
            item.add_marker(pytest.mark.numerics)

"""deeplab_tf: DeepLab semantic segmentation in Keras 3 / TensorFlow 2.

Importing the package registers its layers, loss, metric, optimizer and
schedules, so ``keras.models.load_model`` can read the ``.keras`` files it writes.
"""

from deeplab_tf import allocator, console

with console.quiet_stderr():  # TensorFlow's import-time log lines (console.py)
    import tensorflow  # noqa: F401

    allocator.use_bfc_allocator_by_default()  # before TensorFlow's first allocation

from deeplab_tf import layers, losses, metrics, schedules
from deeplab_tf.model import DEFAULT_ATROUS_IMPLEMENTATION, build_model
from deeplab_tf.variants import VARIANTS, Variant, get_variant

__all__ = [
    "DEFAULT_ATROUS_IMPLEMENTATION",
    "VARIANTS",
    "Variant",
    "build_model",
    "get_variant",
    "layers",
    "losses",
    "metrics",
    "schedules",
]

"""Data: dataset declarations, the TFRecord schema, builders and tf.data pipelines.

One path for data: raw files -> ``datasets/*.py`` (``build``, ``sources``) -> TFRecord
shards + manifest (``tfrecord``) -> ``pipeline.train_dataset`` / ``eval_dataset``.

* ``specs``: ``get_spec(name_or_file)``, ``SPECS``, ``DatasetSpec``.
* ``tfrecord``: the one tf.Example schema, ``ShardedWriter``, ``read_manifest``.
* ``augment``: joint (image, label) ops.
* ``pipeline``: ``train_dataset``, ``eval_dataset``, ``num_examples``, ``dataset_spec``.
* ``shapes``: the built-in dataset, ``ensure_shapes_tfrecords(root)``.

Submodules are imported explicitly (``from deeplab_tf.data import pipeline``); this
package imports nothing so that ``specs`` stays usable without TensorFlow.
"""

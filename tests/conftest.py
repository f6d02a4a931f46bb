"""Suite-wide settings, kept in one place.

* ``NUMERICS``: the tests whose results depend on the CPU's float32 kernels (oneDNN's
  with or without AVX-512/AMX, TensorFlow's own Eigen kernels, TFLite's). They get the
  ``numerics`` marker, and ``make test`` runs them a second time on the kernels this
  CPU does not run by default (``TF_ENABLE_ONEDNN_OPTS=0``, TensorFlow's own, where
  oneDNN is on by default; ``=1`` where it is off), as other CPUs get them, so a
  tolerance that holds on one CPU only fails here before it lands. Comparisons of one
  computation with itself (a reloaded model, another trace, integer counts), weight
  copies, shapes, layer settings and error messages do not depend on the kernels and
  are not listed.
* ``LARGE``: the tests that run our programs end to end in other processes (a kill
  and the rerun, several processes, an installed wheel, a fresh process's console or
  memory, the user's datasets from the builder to the export). They get the ``large``
  marker: ``make test`` leaves them out, to stay within minutes, and ``make
  test-large`` runs them; ``.ci/run`` runs both, so nothing lands without them. A plain
  ``pytest`` runs everything.
* ``SLOWEST_FIRST``: the modules in order of their time on a 2-core machine (about 90
  s down to 7 s each, the large tests' among them). pytest-xdist hands whole modules to
  the two workers (``--dist loadfile``) in this order (``--no-loadscope-reorder``; by
  default it orders them by their number of tests), so that the long ones start first
  and the many short ones even out the end, instead of one worker running a long module
  alone at the end.
* ``seeded``: every test starts from the same random state, so its random networks and
  data do not depend on which tests ran before it on its worker (``-k``, ``-n``, the
  modules' order): a failure reproduces, and a check that holds for most draws but
  not all cannot pass one run and fail the next. Module- and class-scoped fixtures are
  made before it; those that draw seed themselves (``tests.helpers.tiny_model`` does).
"""

from __future__ import annotations

import pytest

NUMERICS = (
    "tests/test_allocator.py",
    "tests/test_backbones.py::TestOutputStrideConsistency",
    "tests/test_backbones.py::TestResNet::test_os32_reproduces_keras_applications_resnet101",
    "tests/test_backbones.py::TestWeights::test_mobilenet_v2_fills_every_layer_but_the_last_conv",
    "tests/test_crf.py",
    "tests/test_decoder.py::test_decoder_matches_numpy",
    "tests/test_decoder.py::test_v3plus_changes_output_stride_and_flips_in_the_predictor",
    # The dilation front end and the context module compute; the two stages' training
    # (weights frozen or moved), round trips and padding (data moved) do not depend on
    # the kernels.
    "tests/test_dilation.py::TestContextModule::test_basic_at_initialisation_is_max_x_0",
    "tests/test_dilation.py::TestContextModule::test_large_at_initialisation_is_close_to_max_x_0",
    "tests/test_dilation.py::TestContextModule::test_large_identity_kernels_follow_equation_5",
    "tests/test_dilation.py::TestContextModule::test_receptive_field_is_67x67",
    "tests/test_dilation.py::TestFrontEnd",
    "tests/test_folding.py::test_folded_copy_equals_the_model",
    "tests/test_folding.py::test_the_copy_draws_no_initial_values",
    "tests/test_folding.py::test_multi_scale_model_gets_a_folded_network",
    "tests/test_folding.py::test_model_trained_in_bfloat16_runs_float32",
    "tests/test_folding.py::test_fold_against_numpy_and_what_stays",
    "tests/test_folding.py::test_inference_copy_runs_the_aspp_tap_by_tap_in_bfloat16_and_on_tensorflows_kernels",
    "tests/test_export.py::TestSavedModel::test_serving_default_equals_the_keras_model",
    "tests/test_export.py::TestSavedModel::test_saved_model_cli_runs_serving_default_on_npy",
    "tests/test_export.py::TestSavedModel::test_predict_request_protos_run_through_the_signature",
    "tests/test_export.py::TestSavedModel::test_encoded_jpeg_and_png_of_different_sizes",
    "tests/test_export.py::TestSavedModel::test_predict_example_reads_our_tfrecord_examples",
    "tests/test_export.py::TestTFLite::test_labels_agree_with_keras",
    "tests/test_export.py::TestTFLite::test_float32_probabilities_and_other_image_sizes",
    "tests/test_export.py::TestTFLite::test_int8_mean_iou_drop",
    "tests/test_export.py::test_crf_in_the_savedmodel",
    "tests/test_export.py::test_v3_model_through_tflite_and_keras",
    "tests/test_inference.py::test_logits_after_the_classifier_are_kept",
    "tests/test_inference.py::TestScalesAndFlips",
    "tests/test_inference.py::TestSlidingWindows",
    # The layers against numpy and Keras; not their settings, errors and round trips,
    # the padding pixel's normalisation (elementwise), nor the check that sets its own
    # TF_ENABLE_ONEDNN_OPTS.
    "tests/test_layers.py::TestAtrousConv2DCorrectness::test_forward_matches_numpy",
    "tests/test_layers.py::TestAtrousConv2DCorrectness::test_valid_padding_matches_numpy",
    "tests/test_layers.py::TestAtrousConv2DCorrectness::test_implementations_agree_with_bias",
    "tests/test_layers.py::TestAtrousConv2DCorrectness::test_gradients_match_numpy",
    "tests/test_layers.py::TestAtrousConv2DCorrectness::test_direct_fallback_gradient_matches_numpy",
    "tests/test_layers.py::TestAtrousConv2DCorrectness::test_the_build_answers_as_running_the_op_does",
    "tests/test_layers.py::TestAtrousConv2DInterface::test_weights_match_keras_conv2d",
    "tests/test_layers.py::TestFusedBatchNormInTraining",
    "tests/test_layers.py::TestPixelNormalization::test_caffe_matches_keras_resnet_preprocessing",
    "tests/test_layers.py::TestPixelNormalization::test_tf_matches_keras_mobilenet_v2_preprocessing",
    "tests/test_layers.py::TestPixelNormalization::test_mean_pixel_maps_to_zero",
    "tests/test_layers.py::TestImagePooling",
    "tests/test_layers.py::TestASPP",
    "tests/test_layers.py::TestResizeBilinear",
    "tests/test_losses.py",
    # MSc's fusion and losses against numpy; not its round trips, weight copies and
    # stride switches (the same network through the same kernels; likewise
    # test_inference.py's TestOutputStride).
    "tests/test_msc.py::test_fused_logits_are_the_max_of_the_resized_scales",
    "tests/test_msc.py::test_training_loss_is_the_sum_of_the_scale_and_fused_losses",
    "tests/test_schedules.py",
    "tests/test_separable.py",
    "tests/test_training.py::test_mirrored_sync_bn_sees_the_whole_batch",
    "tests/test_vgg.py::TestImageNetConvolutions",
    "tests/test_xception.py::test_finer_stride_subsampled_equals_coarser",
    "tests/test_vgg.py::TestFcConversion::test_7x7_conversion_computes_the_dense_layer",
    "tests/test_vgg.py::TestV2AsppOnVgg",
    "tests/test_vgg.py::TestMultiscaleFeatures",
    "tests/test_vgg.py::test_even_4x4_fc6_kernel_is_centred",
)


LARGE = (
    "tests/test_console.py::test_a_cli_prints_only_its_own_output",
    "tests/test_console.py::test_predict_on_a_tiny_model_prints_nothing_on_stderr",
    "tests/test_console.py::test_an_error_is_our_one_line",
    "tests/test_console.py::test_the_verbose_switch_brings_tensorflow_lines_back",
    "tests/test_export_cli.py::test_killed_export_leaves_no_version_directory",
    "tests/test_inference.py::test_sliding_window_memory_is_bounded",
    "tests/test_kill_rerun.py",
    "tests/test_packaging.py::test_the_wheel_runs_outside_the_repository",
    "tests/test_schedules.py::test_fit_mirrored_two_cpus_matches_numpy",
    "tests/test_training.py::test_killed_run_resumes_from_its_backup",
    "tests/test_training.py::test_mirrored_sync_bn_sees_the_whole_batch",
    "tests/test_training.py::test_mirrored_train_validates_across_epochs",
    "tests/test_training.py::test_two_multi_worker_processes",
    "tests/test_user_path.py",
)


SLOWEST_FIRST = tuple(
    f"tests/test_{name}.py"
    for name in (
        "paper_variants",
        "model",
        "kill_rerun",
        "backbones",
        "export",
        "user_path",
        "inference",
        "training",
        "xception",
        "export_cli",
        "predict_cli",
        "crf_cli",
        "folding",
        "decoder",
        "evaluate",
        "faults",
        "layers",
        "dilation",
        "console",
        "packaging",
        "files",
    )
)


def _rank(item: pytest.Item) -> int:
    module = item.nodeid.split("::")[0]
    return SLOWEST_FIRST.index(module) if module in SLOWEST_FIRST else len(SLOWEST_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(NUMERICS):
            item.add_marker(pytest.mark.numerics)
        if item.nodeid.startswith(LARGE):
            item.add_marker(pytest.mark.large)
    items.sort(key=_rank)  # stable: within a module, and among the rest, the file order


@pytest.fixture(autouse=True)
def seeded() -> None:
    import keras  # here, not above: pytest-xdist's controller runs no test and needs no TensorFlow

    keras.utils.set_random_seed(0)

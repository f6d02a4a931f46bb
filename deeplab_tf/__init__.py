"""deeplab_tf: DeepLab semantic segmentation in Keras 3 / TensorFlow 2."""

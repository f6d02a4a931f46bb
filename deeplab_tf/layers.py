"""Layers of the DeepLab family (work in progress)."""

# ImageNet mean pixel in RGB order (the Caffe/keras.applications ResNet and VGG
# normalisation). Images are padded with it so padding is zero after normalisation.
IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)

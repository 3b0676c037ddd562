"""Constants shared by the data pipeline, the model and the C++/CUDA op."""

# ImageNet channel statistics (RGB): the encoder normalizes [0, 1] images with them
# (STELLAR.md section 1), and the multi-crop op / its reference can apply them too.
# csrc/multicrop.h holds the same numbers for the compiled op (the op-vs-apply_crops tests with
# normalize=True check that they agree).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

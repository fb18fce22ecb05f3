"""Constants shared by the loaders, the engine and ``imagenet-ffcv-predict`` (as timm's ``data/constants.py``),
importable without the writer or ffcv."""
import numpy as np

# ImageNet channel statistics in 0-255 pixel units (RGB order), as torchvision's 0-1 values x 255.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255
# Validation centre crop: the crop is 224/256 of the shorter side, then resized to the resolution.
DEFAULT_CROP_RATIO = 224 / 256

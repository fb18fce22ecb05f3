"""Constants and choice lists shared by the config, the loaders, the engine and predict (as timm's
``data/constants.py``), importable without the writer or ffcv: each is typed here only."""
import numpy as np

# ImageNet channel statistics in 0-255 pixel units (RGB order), as torchvision's 0-1 values x 255.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255
# Validation centre crop: the crop is 224/256 of the shorter side, then resized to the resolution.
DEFAULT_CROP_RATIO = 224 / 256
# The image decoders (data.decoder): ours (region decode + bilinear), ours antialiased for every
# shrink, ffcv 1.0.2's stock decoders (loaders.py).
DECODERS = ('fused', 'fused_aa', 'ffcv')
# The file extensions of the images the converter reads (lower case; the check ignores case):
# torchvision ImageFolder's, and JPEG's other names (.jfif: browsers' "Save image as").
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.jpe', '.jfif', '.png', '.ppm', '.bmp', '.pgm', '.tif',
                    '.tiff', '.webp')
# The mixed precisions (training.amp) precision.resolve_precision understands.
PRECISIONS = ('auto', 'bf16', 'fp16', 'off')
# Where shared memory lives on Linux (shm_open, multiprocessing's SharedMemory, NCCL's buffers): a
# tmpfs, 64 MiB in a Docker container unless --shm-size says otherwise.
SHARED_MEMORY = '/dev/shm'
# The room NVIDIA's NCCL guide has a container give it (--shm-size=1g), bytes.
NCCL_SHARED_MEMORY = 2 ** 30

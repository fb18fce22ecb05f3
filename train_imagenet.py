"""``imagenet-ffcv-train`` from a checkout: train (or evaluate) a classifier on .beton files
(imagenet_ffcv/train.py; ``python train_imagenet.py --help``)."""
import sys

from imagenet_ffcv.train import cli

if __name__ == '__main__':
    sys.exit(cli())

"""``imagenet-ffcv-predict`` from a checkout: the top classes of image files with trained weights
(imagenet_ffcv/predict.py; ``python predict.py --help``)."""
import sys

from imagenet_ffcv.predict import cli

if __name__ == '__main__':
    sys.exit(cli())

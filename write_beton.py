"""``imagenet-ffcv-write`` from a checkout: convert class folders to .beton files
(imagenet_ffcv/write.py; ``python write_beton.py --help``)."""
import sys

from imagenet_ffcv.write import cli

if __name__ == '__main__':
    sys.exit(cli())

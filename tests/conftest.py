"""Shared fixtures: the embedded demo sample and small .beton files written from it once."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / 'demo' / 'imagenette_sample'
SHARED_DATA = REPO.parent / 'shared' / 'data'
PYTHON = sys.executable

sys.path.insert(0, str(REPO))


@pytest.fixture(scope='session')
def sample_betons(tmp_path_factory):
    """train.beton (340 images) and val.beton (100 images) of the demo sample, shorter side 64."""
    from imagenet_ffcv import data
    out = tmp_path_factory.mktemp('betons')
    classes = data.find_classes(SAMPLE / 'train')
    paths = {}
    for split in ('train', 'val'):
        paths[split] = out / f'{split}.beton'
        data.write_beton(data.list_samples(SAMPLE / split, classes), paths[split], max_res=64,
                         num_workers=2)
        data.write_class_list(data.class_list_path(paths[split]), classes)
    return paths


def run_env():
    """Environment for subprocesses: the repo on PYTHONPATH, no tqdm noise."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED='1')
    return env

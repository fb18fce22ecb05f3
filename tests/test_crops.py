"""Crops and flips as pure functions of (seed, epoch, sample index) (imagenet_ffcv/crops.py): the
same key gives the same crop, other keys other crops, and the distribution is torchvision's
random-resized crop (the one ffcv's get_random_crop draws with numpy)."""
import numpy as np
import pytest
from ffcv.fields.rgb_image import get_random_crop

from imagenet_ffcv import crops

SCALE, RATIO = np.array([0.08, 1.0]), np.array([3 / 4, 4 / 3])


def key(seed, epoch, index):
    """As the decoders' compiled code holds it: a uint64 (Python would make it an int)."""
    return np.uint64(crops.sample_key(seed, epoch, index))


def draw(n, height, width, seed=0, epoch=0):
    rects = np.array([crops.random_resized_crop(height, width, SCALE, RATIO, key(seed, epoch, i))
                      for i in range(n)])
    flips = np.array([crops.flipped(key(seed, epoch, i), 0.5) for i in range(n)])
    return rects, flips


def test_the_same_key_gives_the_same_crop_and_other_keys_other_crops():
    a, flips_a = draw(500, 256, 341)
    b, flips_b = draw(500, 256, 341)
    assert np.array_equal(a, b) and np.array_equal(flips_a, flips_b)
    for other in (draw(500, 256, 341, epoch=1)[0], draw(500, 256, 341, seed=1)[0]):
        assert (other != a).any(axis=1).mean() > 0.99
    assert len({tuple(r) for r in a}) > 490  # the samples of one epoch differ from each other


def test_uniform_draws_are_uniform_and_independent_of_the_draw_number():
    u = np.array([crops.uniform(key(3, 7, 11), d, 0.0, 1.0) for d in range(20000)])
    assert 0 <= u.min() and u.max() < 1
    assert np.histogram(u, bins=10, range=(0, 1))[0] == pytest.approx(np.full(10, 2000), abs=200)
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.03
    first = np.array([crops.uniform(key(0, 0, i), 0, 0.0, 1.0) for i in range(20000)])
    assert abs(first.mean() - 0.5) < 0.01


@pytest.mark.parametrize('height, width', [(256, 341), (256, 256), (256, 1000)])
def test_crops_lie_inside_the_image_with_torchvisions_distribution(height, width):
    n = 20000
    rects, flips = draw(n, height, width)
    top, left, h, w = rects.T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    assert abs(flips.mean() - 0.5) < 0.02
    np.random.seed(0)
    ref = np.array([get_random_crop(height, width, SCALE, RATIO) for _ in range(n)])
    for mine, theirs in ((h * w / (height * width), ref[:, 2] * ref[:, 3] / (height * width)),
                         (np.log(w / h), np.log(ref[:, 3] / ref[:, 2])),
                         ((top + h / 2) / height, (ref[:, 0] + ref[:, 2] / 2) / height)):
        assert mine.mean() == pytest.approx(theirs.mean(), abs=0.01)
        assert mine.std() == pytest.approx(theirs.std(), abs=0.01)


def test_centre_crop_is_ffcvs():
    assert crops.center_crop(256, 341, SCALE, 224 / 256, np.uint64(5)) == (16, 58, 224, 224)


def test_the_centre_crop_of_an_image_with_a_1_pixel_side_is_its_central_pixel_not_empty():
    """ffcv's arithmetic gives side int(0.875 * 1) = 0 there: an empty crop, whose one sampled
    point fills the whole output."""
    assert crops.center_crop(1, 6, SCALE, 224 / 256, np.uint64(0)) == (0, 2, 1, 1)
    assert crops.center_crop(7, 1, SCALE, 224 / 256, np.uint64(0)) == (3, 0, 1, 1)

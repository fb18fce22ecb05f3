"""Crop rectangles and flips of the training and validation images, drawn as pure functions of
``(seed, epoch, sample index)``: the same seed gives the same crops in every run, on every rank and
after a resume, whatever the threads and the batch order (ffcv's own decoders draw from numba's
global generator, which no seed controls: ffcv issues #392, #164, #140).

The random numbers come from a counter-based generator: SplitMix64's finaliser (Steele, Lea and
Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014) applied to a key made of the
seed, the epoch and the sample index, and to the number of the draw. All functions are compiled
with numba and called from the decoders' compiled code.
"""
import numba
import numpy as np

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment: 2^64 / golden ratio
FLIP_DRAW = 40  # draw number of the flip, after the crop's at most 4 x 10 draws


@numba.njit(nogil=True, inline='always')
def mix64(z):
    """SplitMix64's finaliser: a bijection of uint64 whose output bits look independent."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(nogil=True)
def sample_key(seed, epoch, index):
    """The uint64 key of sample ``index`` (its position in the .beton) at ``epoch`` for ``seed``
    (non-negative integers)."""
    key = mix64(np.uint64(seed) + GOLDEN_GAMMA)
    key = mix64(key + np.uint64(epoch) * GOLDEN_GAMMA)
    return mix64(key + np.uint64(index) * GOLDEN_GAMMA)


@numba.njit(nogil=True)
def uniform(key, draw, low, high):
    """Draw number ``draw`` (0, 1, 2, ...) of ``key``: a float64 uniform in [low, high), with 53
    random bits."""
    z = mix64(key + np.uint64(draw + 1) * GOLDEN_GAMMA)
    return low + (high - low) * (np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0))


@numba.njit(nogil=True)
def random_resized_crop(height, width, scale, ratio, key):
    """The random-resized crop (Szegedy et al. 2015, "Going deeper with convolutions"; as
    torchvision's ``RandomResizedCrop.get_params`` and ffcv's ``get_random_crop``) of a
    ``height`` x ``width`` image: area fraction uniform in ``scale``, aspect ratio log-uniform in
    ``ratio`` (both float64 arrays of 2), up to 10 tries, then the whole image clamped to the
    ratio range. Returns ``(top, left, h, w)`` in pixels, drawn from ``key``."""
    area = height * width
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    for attempt in range(10):
        target_area = area * uniform(key, 4 * attempt, scale[0], scale[1])
        aspect = np.exp(uniform(key, 4 * attempt + 1, log_lo, log_hi))
        w = int(round(np.sqrt(target_area * aspect)))
        h = int(round(np.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(uniform(key, 4 * attempt + 2, 0.0, height - h + 1.0))
            left = int(uniform(key, 4 * attempt + 3, 0.0, width - w + 1.0))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@numba.njit(nogil=True)
def center_crop(height, width, scale, ratio, key):
    """The central square of side ``int(ratio * shorter side)``, at least 1 (ffcv's
    ``get_center_crop``, whose side 0 for a 1-pixel side would spread one point over the whole
    output; ``ratio`` a float, e.g. 224/256; ``scale`` and ``key`` unused). Returns ``(top, left,
    h, w)``."""
    side = max(1, int(ratio * min(height, width)))
    return (height - side) // 2, (width - side) // 2, side, side


@numba.njit(nogil=True)
def flipped(key, flip_prob):
    """Whether the sample of ``key`` is flipped left-right (probability ``flip_prob``)."""
    return flip_prob > 0 and uniform(key, FLIP_DRAW, 0.0, 1.0) < flip_prob

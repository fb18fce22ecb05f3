"""Per-image augmentation (imagenet_ffcv/augment.py): RandAugment, TrivialAugmentWide and Random
Erasing from torchvision v2, on the loader's normalised batches, each image with its own draws, the
labels untouched, refused with a clear error when misconfigured."""
import math

import pytest
import torch
from torchvision.transforms import v2

from conftest import small_config
from imagenet_ffcv import config, engine
from imagenet_ffcv.augment import batch_augmenter
from imagenet_ffcv.config import ConfigError
from imagenet_ffcv.constants import IMAGENET_MEAN, IMAGENET_STD

MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1) / 255
STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1) / 255


def images(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    """``n`` normalised float32 (n, 3, size, size) images: before normalisation, in [0.1, 0.9]
    a different gradient each plus noise, with a highlight (0.99) and a shadow (0.01) pixel as
    photographs have, so that every op of the auto-augment lists but Identity changes them (Solarize
    at threshold t inverts only pixels >= t)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    base = (torch.rand(n, 3, 1, 1, generator=g) * ramp.view(1, 1, 1, size)
            + torch.rand(n, 3, 1, 1, generator=g) * ramp.view(1, 1, size, 1)) / 2
    x01 = 0.1 + 0.8 * (0.8 * base + 0.2 * torch.rand(n, 3, size, size, generator=g))
    x01[:, :, 0, 0], x01[:, :, -1, -1] = 0.99, 0.01
    return (x01 - MEAN) / STD


def changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image: does ``b`` differ from ``a`` beyond float rounding? bool (B,)."""
    return ((a - b).abs().flatten(1) > 1e-4).any(1)


def binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> tuple:
    half = sigmas * math.sqrt(n * p * (1 - p))
    return n * p - half, n * p + half


@pytest.mark.parametrize('auto_augment,transform', [
    ('ra', lambda: v2.RandAugment(magnitude=9)), ('ta_wide', v2.TrivialAugmentWide)])
def test_auto_augment_is_torchvisions_op_on_each_image_with_its_own_draw(auto_augment, transform):
    """The batch comes back as torchvision's transform of each image alone, in [0, 1] (mean and
    std undone), drawn in turn from torch's generator: each image gets its own op."""
    x = images(32)
    torch.manual_seed(5)
    got = batch_augmenter(auto_augment=auto_augment)(x)
    torch.manual_seed(5)
    op = transform()
    expected = torch.stack([(op((image * STD + MEAN).clamp(0, 1)) - MEAN) / STD for image in x])
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # Different images, different ops: the changes are not one op applied to the whole batch.
    deltas = (got - x).flatten(1)
    assert len({tuple(d[:8].round(decimals=3).tolist()) for d in deltas}) > 16


@pytest.mark.parametrize('auto_augment,unchanged_at_most', [
    # RandAugment: 2 ops of 14, Identity among them: both Identity with probability 1/196
    ('ra', 1 / 14 ** 2),
    # TrivialAugmentWide: 1 op of 14 (Identity: 1/14); a magnitude of bin 0 of 31 leaves the
    # geometric and colour ops and Solarize (threshold 1.0) as they are (< 1/31 more)
    ('ta_wide', 1 / 14 + 1 / 31)])
def test_auto_augment_changes_images_with_the_documented_probability(auto_augment,
                                                                     unchanged_at_most):
    torch.manual_seed(0)
    n = 600
    x = images(n, size=16, seed=1)
    unchanged = int((~changed(x, batch_augmenter(auto_augment=auto_augment)(x))).sum())
    assert unchanged <= binomial_bounds(n, unchanged_at_most)[1], unchanged
    assert unchanged < n * 0.2  # not off


@pytest.mark.parametrize('p', [0.25, 0.5, 1.0])
def test_random_erasing_erases_each_image_with_probability_p_to_the_mean(p):
    """Erased pixels are 0 in the normalised batch (the mean colour), a rectangle per image; the
    count of erased images is within 5 sigma of p x n."""
    torch.manual_seed(0)
    n = 800
    x = images(n, size=16, seed=2)
    out = batch_augmenter(random_erase=p)(x)
    erased = changed(x, out)
    low, high = binomial_bounds(n, p)
    assert low <= int(erased.sum()) <= high, int(erased.sum())
    diff = (out != x)
    assert torch.all(out[diff] == 0)
    assert torch.equal(out[~erased], x[~erased])  # the others untouched
    # a rectangle spanning the 3 channels: the same pixels in each
    assert torch.equal(diff[erased][:, 0], diff[erased][:, 1])


def test_the_augmented_batch_reaches_the_model_and_the_labels_are_untouched():
    """train_one_epoch with ``StepOptions.augment``: the model sees the augmented images (in
    the loader's dtype and memory format), the loss gets the loader's labels as they were."""
    x = images(8).contiguous(memory_format=torch.channels_last)
    y = torch.arange(8) % 3
    seen = {}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 24 * 24, 3)

        def forward(self, images):
            seen['x'] = images.clone()
            seen['channels_last'] = images.is_contiguous(memory_format=torch.channels_last)
            return self.fc(images.flatten(1))

    def loss_fn(logits, labels):
        seen['y'] = labels.clone()
        return torch.nn.functional.cross_entropy(logits, labels)

    model = Model()
    augment = batch_augmenter(auto_augment='ta_wide', random_erase=0.5)
    torch.manual_seed(3)
    engine.train_one_epoch(model=model, loader=[(x, y)], optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1), loss_fn=loss_fn, lr_at=lambda t: 0.1, epoch=0,
        options=engine.StepOptions(augment=augment))
    torch.manual_seed(3)
    assert torch.equal(seen['x'], augment(x)) and changed(x, seen['x']).any()
    assert seen['channels_last']
    assert torch.equal(seen['y'], torch.arange(8) % 3)


def test_off_by_default_and_bad_values_are_refused_naming_the_key(sample_betons, tmp_path):
    assert batch_augmenter() is None
    assert config.step_option_kwargs(small_config(sample_betons, tmp_path))['augment'] is None
    cfg = small_config(sample_betons, tmp_path, '--training.auto_augment=ta_wide')
    assert callable(config.step_option_kwargs(cfg)['augment'])
    for bad, key in (('--training.auto_augment=autoaugment', 'training.auto_augment'),
                     ('--training.random_erase=1.5', 'training.random_erase'),
                     ('--training.ra_magnitude=31', 'training.ra_magnitude')):
        with pytest.raises(ConfigError, match=key):
            small_config(sample_betons, tmp_path, bad)

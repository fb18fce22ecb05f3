"""RandAugment, TrivialAugmentWide and RandomErasing on training batches, per image, with
``torchvision.transforms.v2``, as torchvision's classification references offer them
(``--auto-augment ra|ta_wide``, ``--ra-magnitude``, ``--random-erase``).

RandAugment: Cubuk et al., "RandAugment: Practical automated data augmentation with a reduced search
space", 2020 (2 ops per image, each picked uniformly from 14, Identity among them, at one
magnitude). TrivialAugmentWide: Müller and Hutter, "TrivialAugment: Tuning-free State-of-the-Art
Data Augmentation", 2021 (1 op per image and a magnitude drawn uniformly from 31 bins). Random
Erasing: Zhong et al., "Random Erasing Data Augmentation", 2020 (with probability p per image, a
rectangle of 2-33 % of the area, aspect ratio 0.3-3.3, set to 0: the mean colour, since it is
applied after normalisation, as in torchvision's references and timm).

The loader's batches come normalised (``loaders``); the auto-augment op works on the image in [0, 1]
(mean and std undone, then redone), on the batch's device. Each image gets its own draws, from
torch's global CPU generator (seeded by ``training.seed`` + the rank, saved in checkpoints for each
rank, like MixUp's), so a resumed run draws what the uninterrupted one drew.
"""
import torch
from torchvision.transforms import v2

from .constants import IMAGENET_MEAN, IMAGENET_STD
from .errors import InputError

AUTO_AUGMENTS = {'ra': 'RandAugment', 'ta_wide': 'TrivialAugmentWide'}
NUM_MAGNITUDE_BINS = 31  # torchvision's default for both


def batch_augmenter(*, auto_augment: str = '', ra_magnitude: int = 9, random_erase: float = 0.0):
    """A callable ``x -> x_augmented`` on a training batch ``x``: float (B, 3, H, W), normalised
    with the ImageNet mean and std, on any device; returns the same shape, dtype and device, each
    image augmented on its own. ``auto_augment``: '' (off), 'ra' (``v2.RandAugment`` at magnitude
    ``ra_magnitude``, 0-30) or 'ta_wide' (``v2.TrivialAugmentWide``); ``random_erase``: the
    probability of ``v2.RandomErasing`` per image (0: off), applied after the auto-augment op.
    Returns None when all are off. Raises ValueError naming the bad argument."""
    if auto_augment not in ('', *AUTO_AUGMENTS):
        raise InputError(f"auto_augment={auto_augment!r}: use '', 'ra' (RandAugment) or 'ta_wide' "
                         '(TrivialAugmentWide)')
    if not 0 <= ra_magnitude < NUM_MAGNITUDE_BINS:
        raise InputError(f'ra_magnitude={ra_magnitude}: must be in [0, {NUM_MAGNITUDE_BINS - 1}]')
    if not 0.0 <= random_erase <= 1.0:
        raise InputError(f'random_erase={random_erase}: a probability, in [0, 1]')
    if auto_augment == 'ra':
        auto = v2.RandAugment(magnitude=ra_magnitude, num_magnitude_bins=NUM_MAGNITUDE_BINS)
    elif auto_augment == 'ta_wide':
        auto = v2.TrivialAugmentWide(num_magnitude_bins=NUM_MAGNITUDE_BINS)
    else:
        auto = None
    erase = v2.RandomErasing(p=random_erase, value=0) if random_erase > 0 else None
    if auto is None and erase is None:
        return None
    mean_std = {torch.device('cpu'): tuple(torch.tensor(v / 255, dtype=torch.float32).view(3, 1, 1)
                                           for v in (IMAGENET_MEAN, IMAGENET_STD))}

    def augment(x: torch.Tensor) -> torch.Tensor:
        out = x.float()
        if auto is not None:
            if x.device not in mean_std:  # copied to each device once, not per batch
                mean_std[x.device] = tuple(t.to(x.device) for t in mean_std[torch.device('cpu')])
            mean, std = mean_std[x.device]
            images = (out * std + mean).clamp_(0, 1)
            out = (torch.stack([auto(image) for image in images]) - mean) / std
        if erase is not None:
            out = torch.stack([erase(image) for image in out])
        return out.to(x.dtype).contiguous(memory_format=_memory_format(x))

    return augment


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The loader's layout of ``x``: channels_last (NHWC) when it is stored so, else NCHW."""
    nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if nhwc and not x.is_contiguous() else torch.contiguous_format

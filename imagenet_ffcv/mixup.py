"""MixUp and CutMix on training batches, with ``torchvision.transforms.v2``.

MixUp (Zhang et al., "mixup: Beyond Empirical Risk Minimization", 2018) blends each image with
another of the batch; CutMix (Yun et al., "CutMix", 2019) pastes a rectangle of it. Both mix the
one-hot labels in the same proportion, drawn from Beta(alpha, alpha) once per batch; with both on,
one of the two is picked per batch, as timm and torchvision's reference do. The random draws come
from torch's global CPU generator (seeded by ``training.seed`` + the rank, so that each rank
draws its own, saved in checkpoints).
"""
from torchvision.transforms import v2

from .errors import InputError


def batch_mixer(*, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
    """A callable ``(x, y) -> (x_mixed, targets)``: ``x`` float (B, 3, H, W) on any device (the
    loader's batch), ``y`` int64 (B,) class indices; ``targets`` float32 (B, num_classes) soft
    labels summing to 1, for ``torch.nn.CrossEntropyLoss`` (which applies label smoothing on top).
    ``alpha`` 0 turns a method off; returns None when both are off. Raises ValueError for a
    negative alpha."""
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise InputError(f'mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}: must be >= 0')
    methods = []
    if mixup_alpha > 0:
        methods.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        methods.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not methods:
        return None
    return methods[0] if len(methods) == 1 else v2.RandomChoice(methods)

"""The optimizers ``training.optimizer`` names, over the weight-decay groups of
``models.param_groups`` (each group carries its own ``weight_decay``)."""
import torch

from .errors import InputError
from .optional import require

OPTIMIZERS = ('sgd', 'adamw', 'lamb')
TAKE_MOMENTUM, TAKE_BETAS = ('sgd',), ('adamw', 'lamb')  # which read training.momentum, .betas


def make_optimizer(name: str, groups: list, *, lr: float, momentum: float = 0.9,
                   betas: tuple = (0.9, 0.999)) -> torch.optim.Optimizer:
    """``'sgd'``: ``torch.optim.SGD`` with ``momentum`` (heavy ball, PyTorch's form; no Nesterov);
    ``'adamw'``: ``torch.optim.AdamW`` (Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", 2019) with ``betas``; ``'lamb'``: timm's ``timm.optim.Lamb`` (You et al.,
    "Large Batch Optimization for Deep Learning", 2020) with ``betas``, from the optional timm
    package. ``lr`` is the initial LR (the schedule sets it every iteration).
    Raises ValueError for another name, MissingPackageError for lamb without timm."""
    if name == 'sgd':
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == 'adamw':
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    if name == 'lamb':
        timm_optim = require('timm.optim', 'the LAMB optimizer', package='timm')
        return timm_optim.Lamb(groups, lr=lr, betas=betas)
    raise InputError(f'optimizer={name!r}: expected one of {", ".join(OPTIMIZERS)}')


def parse_betas(text: str) -> tuple:
    """``'0.9,0.999'`` -> ``(0.9, 0.999)``, each in [0, 1). Raises ValueError saying what is
    expected."""
    try:
        betas = tuple(float(part) for part in text.split(','))
    except ValueError:
        raise InputError("expected two numbers 'beta1,beta2', e.g. '0.9,0.999'") from None
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise InputError("expected two numbers in [0, 1) 'beta1,beta2', e.g. '0.9,0.999'")
    return betas

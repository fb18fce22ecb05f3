"""An exponential moving average (EMA) of a model's weights, with ``torch.optim.swa_utils``.

Polyak & Juditsky (1992) averaging in its exponential form, as timm's ``ModelEmaV3`` and
torchvision's reference ``ExponentialMovingAverage``: after each update,
``ema = decay * ema + (1 - decay) * weights``, for the parameters and the buffers (BatchNorm's
running statistics are averaged too, so the EMA model evaluates without re-estimating them).
"""
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of ``model`` (a deep copy on the model's device; pass the plain model, not the
    DDP or compiled wrapper) that ``ema.update_parameters(model)`` moves towards the model's
    parameters and buffers with weight ``1 - decay`` (the first update copies them). Evaluate
    ``ema.module``; ``ema.state_dict()`` (``module.``-prefixed keys and ``n_averaged``) goes into
    the checkpoint, ``models.unwrapped_state_dict(ema)`` is the plain model's state dict.
    Raises ValueError unless ``0 < decay < 1``."""
    if not 0 < decay < 1:
        raise ValueError(f'decay={decay} must lie in (0, 1)')
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

"""An exponential moving average (EMA) of a model's weights, with ``torch.optim.swa_utils``.

Polyak & Juditsky (1992) averaging in its exponential form, as timm's ``ModelEmaV3`` and
torchvision's reference ``ExponentialMovingAverage``: after each update,
``ema = decay * ema + (1 - decay) * weights``, for the parameters and the buffers (BatchNorm's
running statistics are averaged too, so the EMA model evaluates without re-estimating them).
"""
from collections import defaultdict

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .errors import InputError


class EMA(AveragedModel):
    """torch's ``AveragedModel`` (its state dict, its first update, its averaging function) whose
    later updates never wait for the GPU: torch's copies the count ``n_averaged`` (a CPU tensor)
    to the device at each update, a copy that waits for every kernel queued before it, so the GPU
    idled while the host queued the next step. The count goes to the averaging function as None
    (``get_ema_multi_avg_fn``'s update does not read it). ``n_averaged`` must stay on the CPU (no
    ``device`` argument): on the GPU its test would wait too. Without ``use_buffers`` or an
    averaging function every update is torch's."""

    def update_parameters(self, model: torch.nn.Module) -> None:
        """Move the averages towards ``model``'s parameters and buffers (the first update copies
        them), as ``AveragedModel.update_parameters`` with ``use_buffers=True``."""
        if self.n_averaged == 0 or self.multi_avg_fn is None or not self.use_buffers:
            return super().update_parameters(model)
        groups = defaultdict(lambda: ([], []))  # (device, dtype) -> (averages, model's tensors)
        for averaged, current in zip([*self.module.parameters(), *self.module.buffers()],
                                     [*model.parameters(), *model.buffers()], strict=True):
            group = groups[averaged.device, averaged.dtype]
            group[0].append(averaged.detach())
            group[1].append(current.detach().to(averaged.device))
        for averages, currents in groups.values():
            self.multi_avg_fn(averages, currents, None)
        self.n_averaged += 1


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of ``model`` (a deep copy on the model's device; pass the plain model, not the
    DDP or compiled wrapper) that ``ema.update_parameters(model)`` moves towards the model's
    parameters and buffers with weight ``1 - decay`` (the first update copies them). Evaluate
    ``ema.module``; ``ema.state_dict()`` (``module.``-prefixed keys and ``n_averaged``) goes into
    the checkpoint, ``models.unwrapped_state_dict(ema)`` is the plain model's state dict.
    Raises ValueError unless ``0 < decay < 1``."""
    if not 0 < decay < 1:
        raise InputError(f'decay={decay} must lie in (0, 1)')
    return EMA(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

"""The mixed precision of a run (``training.amp``): which one a device gets, and what it means
for the loader and the training step (``engine``)."""
from dataclasses import dataclass

import torch

from .constants import PRECISIONS
from .errors import InputError


@dataclass(frozen=True)
class Precision:
    """The mixed precision of a run: ``name`` 'bf16', 'fp16' or 'fp32'; ``amp_dtype`` the
    autocast dtype (None: full precision); ``loss_scaling`` whether a ``torch.amp.GradScaler``
    scales the loss (fp16 only); ``input_dtype`` the dtype the loader delivers images in on CUDA
    (the autocast dtype, float32 without autocast; CPU batches are always float32)."""
    name: str
    amp_dtype: torch.dtype = None
    loss_scaling: bool = False

    @property
    def input_dtype(self) -> torch.dtype:
        return self.amp_dtype or torch.float32


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """The precision ``training.amp`` asks for on ``device``: 'auto' is bf16 on a GPU that has it
    (:func:`native_bf16`: Ampere and later), fp16 with loss scaling on older ones (V100, T4), and
    fp32 on CPU; 'bf16', 'fp16' and 'off' (fp32) are taken as given, on any device.
    Mixed-precision training as Micikevicius et al., "Mixed Precision Training" (2018), through
    ``torch.autocast`` and ``torch.amp.GradScaler``. Raises ValueError for another name."""
    if amp not in PRECISIONS:
        raise InputError(f'amp={amp!r}: expected one of {", ".join(PRECISIONS)}')
    if amp == 'auto':
        if device.type != 'cuda':
            amp = 'off'
        else:
            amp = 'bf16' if native_bf16(device) else 'fp16'
    if amp == 'bf16':
        return Precision('bf16', torch.bfloat16)
    if amp == 'fp16':
        return Precision('fp16', torch.float16, loss_scaling=True)
    return Precision('fp32')


def native_bf16(device: torch.device) -> bool:
    """Whether the CUDA GPU ``device`` computes in bfloat16 itself: compute capability 8.0
    (Ampere) or later, or ROCm; not a V100 or T4, where ``torch.cuda.is_bf16_supported()`` is
    true too (its default ``including_emulation``), but cuDNN has no bfloat16 convolutions."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8

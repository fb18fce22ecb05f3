"""Models from torchvision (or timm) by name, BlurPool, torch.compile, and the weight-decay
parameter groups."""
import hashlib
import warnings

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .errors import ImagenetFfcvError
from .optional import require


class BlurPoolConv2d(nn.Conv2d):
    """A strided conv preceded by a 3x3 binomial blur ([1, 2, 1] x [1, 2, 1] / 16, stride 1, per
    channel): Zhang, "Making Convolutional Networks Shift-Invariant Again" (ICML 2019), applied as
    ffcv-imagenet does, before every conv with stride > 1 and at least 16 input channels.

    A subclass of ``nn.Conv2d`` with the same parameters and a non-persistent filter, so state dicts
    keep torchvision's keys: they load into the plain model (call :func:`apply_blurpool` on it to
    evaluate as trained). Input and output: float (N, C, H, W) as the wrapped conv's.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                         bias=conv.bias is not None, padding_mode=conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.weight = conv.weight
        self.bias = conv.bias
        kernel = torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]]) / 16.0
        self.register_buffer('blur_filter', kernel.expand(conv.in_channels, 1, 3, 3).clone(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = F.conv2d(x, self.blur_filter.to(x.dtype), padding=1, groups=self.in_channels)
        return super().forward(blurred)


def takes_blurpool(module: nn.Module) -> bool:
    """Whether :func:`apply_blurpool` makes ``module`` a :class:`BlurPoolConv2d`, or made it one:
    a plain ``nn.Conv2d`` (not a subclass such as timm's ``Conv2dSame``) with stride > 1 and at
    least 16 input channels."""
    return (type(module) in (nn.Conv2d, BlurPoolConv2d) and max(module.stride) > 1
            and module.in_channels >= 16)


def apply_blurpool(model: nn.Module) -> nn.Module:
    """Replace, in place, each ``nn.Conv2d`` that :func:`takes_blurpool` by a
    :class:`BlurPoolConv2d` sharing its parameters. Returns ``model``."""
    for name, child in model.named_children():
        if type(child) is nn.Conv2d and takes_blurpool(child):
            setattr(model, name, BlurPoolConv2d(child))
        else:
            apply_blurpool(child)
    return model


TIMM_PREFIX = 'timm:'  # timm is optional (requirements-extras.txt), imported only for such an arch


class UnknownArchError(ImagenetFfcvError, ValueError):
    """``model.arch`` names no model of torchvision or of timm."""


def build_model(*, arch: str, num_classes: int, use_blurpool: bool, channels_last: bool) -> nn.Module:
    """A randomly initialised classification model, in train mode, on the CPU, float32.

    arch: a name from ``torchvision.models.list_models(module=torchvision.models)``, e.g.
    ``'resnet50'``, ``'resnet18'``; or ``'timm:<name>'`` with a name from ``timm.list_models()``,
    e.g. ``'timm:resnet50d'``, ``'timm:convnext_atto'``, built by
    ``timm.create_model(name, pretrained=False, num_classes=num_classes)`` (timm is optional:
    ``requirements-extras.txt``). ``use_blurpool``: :func:`apply_blurpool` (strided plain
    ``nn.Conv2d`` with >= 16 input channels; timm's own conv subclasses, e.g. ``Conv2dSame``, are
    left alone). ``channels_last``: parameters and buffers in NHWC memory format.
    The model takes float (N, 3, H, W) images and returns float (N, num_classes) logits.

    Raises UnknownArchError (a ValueError) naming the arch for an unknown torchvision name
    (listing the valid ones) or an unknown timm name (pointing at ``timm.list_models()``), and
    ``optional.MissingPackageError`` (an ImportError) saying how to install timm when a ``timm:``
    arch is asked for without it.
    """
    if arch.startswith(TIMM_PREFIX):
        model = _timm_model(arch[len(TIMM_PREFIX):], num_classes=num_classes)
    else:
        valid = torchvision.models.list_models(module=torchvision.models)
        if arch not in valid:
            raise UnknownArchError(f'arch={arch!r} is not a torchvision classification model '
                                   f'nor {TIMM_PREFIX}<name> (a timm model, e.g. timm:resnet50d); '
                                   f'valid torchvision names: {", ".join(valid)}')
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if use_blurpool:
        apply_blurpool(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class ClassSubset(nn.Module):
    """``model`` with the logits of some of its classes only: ``(N, len(indices))``, its outputs
    ``indices`` in that order. A model of ILSVRC-2012's 1,000 classes evaluated on a data set of
    some of them (Imagenette, ImageWoof), as ImageNet-A and ImageNet-R are evaluated (Hendrycks et
    al. 2021: a 1,000-class model's logits of the 200 classes)."""

    def __init__(self, model: nn.Module, indices: list):
        super().__init__()
        self.model = model
        self.register_buffer('indices', torch.tensor(indices), persistent=False)

    def forward(self, x):
        return self.model(x).index_select(1, self.indices)


def meta_model(**build_kwargs) -> nn.Module:
    """:func:`build_model` on the meta device: parameters with shapes and no memory, forward
    passes that compute shapes alone (checks before a run, advice on weights that do not fit).
    Raises what building raises (a RegNet cannot be built so: its widths come from tensors)."""
    with torch.device('meta'), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # GoogLeNet's and Inception's about their initialisation
        return build_model(**build_kwargs)


def _timm_model(name: str, *, num_classes: int) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=num_classes)``; the errors of
    :func:`build_model`. Only names in timm's registry (a pretrained tag such as
    ``resnet50.a1_in1k`` is accepted); ``hf-hub:`` and other sources, which download, are not."""
    timm = require('timm', f'the timm model {name!r}')
    if not name or ':' in name or not timm.is_model(name):
        raise UnknownArchError(f'arch={TIMM_PREFIX + name!r}: {name!r} is not a timm model '
                               f'(timm {timm.__version__}); see timm.list_models(), e.g. '
                               "timm.list_models('resnet*')")
    return timm.create_model(name, pretrained=False, num_classes=num_classes)


# torch._dynamo keeps this many compiled versions of a function before it runs it eagerly from
# then on, with only a warning (``torch._dynamo.config.recompile_limit``, 8 by default in torch
# 2.14). With static shapes a training run needs one per
# (resolution, train/eval mode, batch size): 16 ramp resolutions, validation and its smaller last
# batch already pass 8.
RECOMPILE_LIMIT = 64


def compile_model(model: nn.Module, *, recompile_limit: int = RECOMPILE_LIMIT) -> nn.Module:
    """``torch.compile(model, dynamic=False)``: an ``OptimizedModule`` wrapping ``model`` (same
    parameters, same inputs and outputs), compiled at its first call with static shapes, so
    progressive resizing recompiles once per new input shape (resolution or batch size) and per
    train/eval mode. Compiling is lazy: the first call at each shape takes seconds to minutes.

    Sets torch._dynamo's ``recompile_limit`` (a process-wide setting) to at least
    ``recompile_limit``, so that a run with many resolutions is not silently left in eager mode.

    The wrapper's state dict keys carry the prefix ``_orig_mod.``: save and load the state of the
    uncompiled ``model`` (or :func:`unwrapped_state_dict`, which strips the prefix), never that of
    the wrapper.
    """
    config = torch._dynamo.config  # imported by this attribute access (torch imports it lazily)
    config.recompile_limit = max(config.recompile_limit, recompile_limit)
    return torch.compile(model, dynamic=False)


NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def param_groups(model: nn.Module, *, weight_decay: float, bn_wd: bool) -> list:
    """Parameter groups for the optimizer: ``[{'params': decayed, 'weight_decay': weight_decay},
    {'params': not_decayed, 'weight_decay': 0.0}]``.

    With ``bn_wd`` false, the parameters of normalisation layers (found by module type:
    BatchNorm, GroupNorm, LayerNorm) and every other 1-d parameter (biases, found by tensor rank
    as in nanoGPT) get no weight decay; with ``bn_wd`` true every parameter is decayed.
    Names are never used: ffcv-imagenet's ``'bn' in name`` misses ResNet's ``downsample.1``.
    """
    decayed, not_decayed = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad:
                continue
            no_decay = isinstance(module, NORM_TYPES) or p.ndim <= 1
            (not_decayed if no_decay and not bn_wd else decayed).append(p)
    return [{'params': decayed, 'weight_decay': weight_decay},
            {'params': not_decayed, 'weight_decay': 0.0}]


def classifier_keys(model: nn.Module) -> set:
    """The state-dict keys of ``model``'s classifier: its last ``nn.Linear`` (torchvision's
    ResNet ``fc``, VGG's and EfficientNet's ``classifier.N``, timm's ``head.fc`` or ``fc``), or
    an empty set when it has none."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        return set()
    return {f'{names[-1]}.{k}' for k in ('weight', 'bias')} & set(model.state_dict())


def unwrapped_state_dict(model: nn.Module) -> dict:
    """The state dict of ``model`` without DDP's ``module.`` prefix (or ``torch.compile``'s
    ``_orig_mod.``), loadable into the plain torchvision model of the same arch."""
    while hasattr(model, 'module') or hasattr(model, '_orig_mod'):
        model = getattr(model, 'module', None) or getattr(model, '_orig_mod')
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of every tensor of the model's state dict (names, dtypes and bytes, in order):
    equal hashes mean bit-identical weights and buffers, e.g. across the ranks of a DDP run."""
    digest = hashlib.sha256()
    for name, tensor in unwrapped_state_dict(model).items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

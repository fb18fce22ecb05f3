"""State dicts of other tools made torchvision's (DistributedDataParallel's and torch.compile's
key prefixes, ffcv-imagenet's BlurPool layout, an EMA's count), and what keeps one from loading
into a model: the key rules ``weights`` applies to every file it reads."""
import collections
import functools

import torchvision

from .errors import first_few
from .models import classifier_keys, meta_model

WRAPPER_PREFIXES = ('module.', '_orig_mod.')  # DistributedDataParallel's, torch.compile's


def unwrapped(state: dict) -> dict:
    """``state`` (a state dict) with torchvision's keys: the prefix that DistributedDataParallel
    (``module.``) or ``torch.compile`` (``_orig_mod.``) puts before every key removed, also when
    one wraps the other (ffcv-imagenet's final weights carry ``module.``), then ffcv-imagenet's
    BlurPool layout undone (:func:`_unblurred`). Keys are kept as they are when any key lacks the
    prefix; an EMA's (``torch.optim.swa_utils.AveragedModel``) count ``n_averaged`` is dropped."""
    if 'n_averaged' in state:  # an AveragedModel's (EMA's) state dict: module. and the count
        state = {k: v for k, v in state.items() if k != 'n_averaged'}
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return unwrapped({k[len(prefix):]: v for k, v in state.items()})
    return _unblurred(state)


BLUR_FILTER = '.blur_filter'


def _unblurred(state: dict) -> dict:
    """``state`` with ffcv-imagenet's BlurPool keys made torchvision's: its ``BlurPoolConv2d``
    keeps the wrapped conv as ``.conv`` beside a saved ``.blur_filter`` (``layer2.0.conv2.conv.
    weight``, ``layer2.0.conv2.blur_filter``), ours is the conv itself with an unsaved filter
    (``models.BlurPoolConv2d``: ``layer2.0.conv2.weight``). The filters are dropped."""
    blurred = {k[:-len(BLUR_FILTER)] for k in state if k.endswith(BLUR_FILTER)}

    def key(k):
        module, _, name = k.rpartition('.')
        wrapper = module[:-len('.conv')]
        return f'{wrapper}.{name}' if module.endswith('.conv') and wrapper in blurred else k
    return {key(k): v for k, v in state.items() if not k.endswith(BLUR_FILTER)}


def mismatch(state: dict, own: dict, ignore=frozenset()) -> str:
    """What keeps the state dict ``state`` from loading into a model whose state dict is ``own``,
    the keys in ``ignore`` aside: ``'missing [...], unexpected [...], other shapes [...]'`` (the
    first 5 keys of each, :func:`_keys`), or '' when every key is there with its shape."""
    missing = sorted(k for k in own.keys() - state.keys() - ignore  # older files lack BN's count:
                     if not k.endswith('.num_batches_tracked'))  # load_state_dict sets it to 0
    extra = sorted(state.keys() - own.keys() - ignore)
    wrong_shape = sorted(k for k in (state.keys() & own.keys()) - ignore
                         if state[k].shape != own[k].shape)
    if not (missing or extra or wrong_shape):
        return ''
    return (f'missing {_keys(missing)}, unexpected {_keys(extra)}, other shapes '
            f'{_keys(wrong_shape)}')


def _keys(keys: list) -> str:
    """``keys`` as a message lists them: ``['a', 'b']``, the first 5 then ' ...' and how many
    (``errors.first_few``); 'none' for none."""
    more = f' ({len(keys)} in all)' if len(keys) > 5 else ''
    return f'[{first_few(map(repr, keys))}]{more}' if keys else 'none'


def without_prefix(state: dict, own: dict, ignore=frozenset()) -> tuple:
    """``(state, prefix, left_out)``: when ``state`` does not fit ``own`` (:func:`mismatch` with
    ``ignore``, e.g. the classifier's keys), the keys under the one dotted prefix whose keys fit,
    with it removed: one every key shares (``model.`` of a PyTorch Lightning checkpoint, whose
    LightningModule holds the network as ``self.model``; ``net.``, ``backbone.``), or one of some
    keys (a LightningModule's loss or metric buffers beside its network, ``criterion.weight``:
    refused before), the others ``left_out`` (sorted; two such prefixes, ``model.`` and
    ``ema_model.``, are not chosen between). Else ``(state, '', [])``, so a file that does not
    fit is told by its own keys. :func:`prefix_note` says what was done."""
    if mismatch(state, own, ignore):  # every dotted prefix of a key ('model.encoder.' too long)
        under = collections.Counter(key[:i + 1] for key in state
                                    for i, c in enumerate(key) if c == '.')
        least = len([k for k in own.keys() - ignore if not k.endswith('.num_batches_tracked')])
        fitting = [prefix for prefix, keys in under.items()  # (of too few keys: no fit)
                   if keys >= least and not mismatch(_stripped(state, prefix), own, ignore)]
        if len(fitting) == 1:
            [prefix] = fitting
            return (_stripped(state, prefix), prefix,
                    sorted(key for key in state if not key.startswith(prefix)))
    return state, '', []


def prefix_note(prefix: str, left_out: list, path=None) -> str:
    """What :func:`without_prefix` did to the keys (of the file ``path``, when given), for a
    note: '' when it did nothing."""
    where = f' in {path}' if path else ''
    if not prefix:
        return ''
    if not left_out:  # (a PyTorch Lightning checkpoint's 'model.', say)
        return f'{prefix!r} removed from the start of every key{where}'
    return (f'the keys under {prefix!r}{where} taken, that prefix removed; {len(left_out)} other '
            f'key(s) left out: {first_few(left_out)}')


def _prefixes(state: dict) -> list:
    """The dotted prefixes that begin every key of ``state``, longest first, each leaving every
    key a name of its own (``['model.']`` for ``model.conv1.weight``, ``model.fc.bias``, ...)."""
    parts = [key.split('.') for key in state]
    shared = []
    for names in zip(*parts):
        if len(set(names)) > 1 or len(shared) + 1 >= min(map(len, parts)):
            break
        shared.append(names[0])
    return ['.'.join(shared[:n]) + '.' for n in range(len(shared), 0, -1)]


def _stripped(state: dict, prefix: str) -> dict:
    """The keys of ``state`` that begin with ``prefix``, with it removed."""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def fitting_archs(state: dict) -> list:
    """The torchvision classification models (``torchvision.models.list_models``) whose state
    dict ``state`` fits, its classifier's output count aside (:func:`mismatch` ignoring
    ``models.classifier_keys``): advice for weights that do not fit the arch assumed for them."""
    return [arch for arch, (own, head) in _torchvision_state_dicts().items()
            if not mismatch(state, own, ignore=head)]


def fit_advice(state: dict, assumed: str) -> str:
    """'; their keys fit ARCH, ...' (:func:`fitting_archs`; else, with a prefix that every key
    shares removed, as :func:`without_prefix` removes it for such an arch), or '' when none does
    or the arch ``assumed`` does (the class count or a missing classifier is what differs)."""
    fit = fitting_archs(state)
    for prefix in _prefixes(state):
        if fit:
            break
        fit = fitting_archs(_stripped(state, prefix))
    return f'; their keys fit {", ".join(fit)}' if fit and assumed not in fit else ''


@functools.cache
def _torchvision_state_dicts() -> dict:
    """``{arch: (state dict, classifier keys)}`` of torchvision's classification models, built on
    the meta device, with no memory (65 of them took 6 s on a 2-core VM, once per process);
    those that cannot be built so (the RegNets) are left out."""
    found = {}
    for arch in torchvision.models.list_models(module=torchvision.models):
        try:
            model = meta_model(arch=arch, num_classes=1000, use_blurpool=False,
                               channels_last=False)
        except Exception:  # noqa: BLE001 (a RegNet: its widths are computed from tensors)
            continue
        found[arch] = model.state_dict(), classifier_keys(model)
    return found

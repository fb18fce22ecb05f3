"""What final weights files say of themselves: the run's config and class list, written by
``weights.save_final_weights`` as metadata (the .safetensors header's, the .pt state dict's
``_metadata``), and the checks that they are what this tool saves (a damaged or foreign file is an
error naming it, not a model rebuilt wrongly)."""
import json

from .config import EVAL_KEYS, MODEL_KEYS, saved_eval_kwargs, saved_model_kwargs
from .config_schema import declared
from .errors import CheckpointError

SAFETENSORS_FORMAT = 'imagenet_ffcv final weights'  # the metadata's 'format': config and classes
METADATA_KEY = 'imagenet_ffcv'  # final_weights.pt: its metadata in the state dict's _metadata['']
# The keys of a saved config that rebuild and evaluate the model (config.saved_model_kwargs and
# saved_eval_kwargs), whose values checked_config checks
RESOLUTION_KEY = EVAL_KEYS['res']
SAVED_KEYS = (*MODEL_KEYS, *EVAL_KEYS.values())


def described(metadata, path) -> tuple:
    """``(config, classes)`` of the metadata ``weights.save_final_weights`` wrote in ``path``;
    ``(None, None)`` for other metadata or none (a file not written by it)."""
    if not isinstance(metadata, dict) or metadata.get('format') != SAFETENSORS_FORMAT:
        return None, None
    config = parsed_json(metadata.get('config') or 'null', f"{path}'s metadata 'config'")
    classes = parsed_json(metadata.get('classes') or 'null', f"{path}'s metadata 'classes'")
    return checked_config(config, path), checked_classes(classes, path)


DAMAGED = ("use the run's final_weights.pt with its params.json and classes.tsv, or a file without "
           'the damaged part and the model options (predict: --arch, --blurpool, --classes)')


def parsed_json(text: str, source: str):
    """The value of the JSON ``text`` read from ``source`` (named in the error); CheckpointError
    when it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f'{source} is not valid JSON ({e}); {DAMAGED}') from None


def checked_config(config, source):
    """``config`` (None, or a run's resolved config, ``{'section': {'key': value}}``, read from
    ``source``) when it holds what rebuilds and evaluates the model
    (``config.saved_model_kwargs``, ``config.saved_eval_kwargs``). Raises CheckpointError naming
    ``source`` otherwise: a key missing, or a value of those keys (:data:`SAVED_KEYS`) that
    its key's checker (``config_schema``) refuses, or a resolution that is not a whole number of
    pixels > 0 (a string there failed, with a traceback, deep in the loader)."""
    if config is None:
        return None
    try:
        saved_model_kwargs(config)
        saved_eval_kwargs(config)
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f'{source}: the saved config is not a resolved config of this tool '
            f'({type(e).__name__}: {e}); {DAMAGED}') from None
    params = declared().entries
    for key in SAVED_KEYS:
        section, name = key.split('.')
        if name not in config.get(section, {}):  # data.decoder: 'fused' before the key
            continue
        value = config[section][name]
        try:
            params[(section, name)].checker.check(value)
            good = key != RESOLUTION_KEY or (type(value) is int and value > 0)
        except (TypeError, ValueError):
            good = False
        if not good:
            raise CheckpointError(f'{source}: the saved config\'s {key} is {value!r}, not a '
                                  f'value of that key; {DAMAGED}')
    return config


def checked_classes(classes, source):
    """``classes`` (None, or ``[[wnid, name], ...]`` read from ``source``) as ``[(wnid, name),
    ...]``. Raises CheckpointError naming ``source`` when an entry is not a pair of strings."""
    if classes is None:
        return None
    pairs = isinstance(classes, list) and all(
        isinstance(c, (list, tuple)) and len(c) == 2 and all(isinstance(v, str) for v in c)
        for c in classes)
    if not pairs:
        raise CheckpointError(f'{source}: the saved class list is not [[wnid, name], ...]; '
                              f'{DAMAGED}')
    return [tuple(c) for c in classes]

"""``--config`` files: which file a name means (a path, else a shipped recipe by its name), read
as YAML with each section and key given once, into the schema's ``section.key`` values."""
from pathlib import Path

import yaml

from .config_schema import ConfigError, file_values
from .errors import MissingFileError

CONFIGS_DIR = Path(__file__).with_name('configs')  # the shipped recipes (rn50_configs/, ...)


def config_file(name) -> Path:
    """The file ``--config NAME`` reads: NAME when it is a file; else, for a bare name or one in a
    shipped recipe folder (``rn50_configs/rn50_16_epochs.yaml``, ``rn50_16_epochs.yaml`` or
    ``rn50_16_epochs``), the shipped config of that name in imagenet_ffcv/configs, so the recipes
    load from any directory and from an installed package. Raises MissingFileError listing the
    shipped configs for anything else, a mistyped path to one's own copy of a recipe included
    (``myconfs/rn50_16_epochs.yaml``: the shipped recipe ran instead, without a word)."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name if path.suffix in ('.yaml', '.yml', '.json') else path.name + '.yaml'
    folders = [p.name for p in CONFIGS_DIR.iterdir() if p.is_dir()]
    found = [c for c in [CONFIGS_DIR / path, *sorted(CONFIGS_DIR.glob(f'*/{stem}'))]
             if c.is_file()]
    if found and (len(path.parts) == 1 or len(path.parts) == 2 and path.parts[0] in folders):
        return found[0]
    shipped = ', '.join(f'{p.parent.name}/{p.name}' for p in sorted(CONFIGS_DIR.glob('*/*.yaml')))
    raise MissingFileError(f'--config {name}: no such file' + (
        f' (a shipped config has its name: {found[0].parent.name}/{found[0].name}; give that to '
        f'use it)' if found else f', nor a shipped config of that name (shipped: {shipped})'))


class _OnceEach(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping: YAML keeps the last,
    so a second ``training:`` section replaced the first whole, its keys back at their
    defaults, without a word."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            if key_node.tag == 'tag:yaml.org,2002:merge':  # '<<: *other' merges, as YAML does
                continue
            key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
            if key in lines:
                raise yaml.constructor.ConstructorError(
                    None, None, f'{key!r} given twice (lines {lines[key]} and {line}): the later '
                    f'would replace the earlier whole; give it once', key_node.start_mark)
            lines[key] = line
        return super().construct_mapping(node, deep)


# What a run adds to its config in params.json (train.build): not keys, left out when a run's
# params.json is given back as --config (it was refused for them).
RUN_RECORD = ('derived', 'code', 'launch')


def read(path, params: dict) -> dict:
    """The ``{'section.key': value}`` of the config file ``path``, checked against ``params``
    (``config_schema.file_values``). Its bytes are YAML's to decode (UTF-8, or UTF-16 with its
    BOM, as PowerShell saves). Raises ConfigError naming the file for content that is not
    YAML text (a .beton given), YAML that does not parse, a section or key given twice, and
    what ``file_values`` refuses. The sections a run adds to its params.json (:data:`RUN_RECORD`)
    are left out: a run's params.json gives its config back."""
    try:
        content = yaml.load(Path(path).read_bytes(), Loader=_OnceEach) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f'{path}: not valid YAML: {" ".join(str(e).split())}') from None
    if isinstance(content, dict):
        content = {name: keys for name, keys in content.items() if name not in RUN_RECORD}
    return file_values(content, params, path)

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
    load from any directory and from an installed package. Raises MissingFileError for anything
    else, naming the shipped config of its name or else listing them all: a mistyped path to
    one's own copy of a recipe (``myconfs/rn50_16_epochs.yaml``, ``./rn50_16_epochs.yaml``) ran
    the shipped recipe, without a word."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name if path.suffix in ('.yaml', '.yml', '.json') else path.name + '.yaml'
    alike = sorted(CONFIGS_DIR.glob(f'*/{stem}'))  # the shipped configs of its name
    parts = str(name).split('/')  # as typed: Path drops a leading './'
    for found in alike:
        if len(parts) == 1 or len(parts) == 2 and parts[0] == found.parent.name:
            return found
    shipped = ', '.join(f'{p.parent.name}/{p.name}' for p in sorted(CONFIGS_DIR.glob('*/*.yaml')))
    raise MissingFileError(f'--config {name}: no such file' + (
        f' (a shipped config has its name: {alike[0].parent.name}/{alike[0].name}; give that to '
        f'use it)' if alike else f', nor a shipped config of that name (shipped: {shipped})'))


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
            try:
                twice = key in lines
            except TypeError:  # a list as a key: YAML's own error follows
                continue
            if twice:
                raise yaml.constructor.ConstructorError(
                    None, None, f'{key!r} given twice (lines {lines[key]} and {line}): YAML keeps '
                    f'the later alone (of a section, none of the earlier\'s keys); give it once',
                    key_node.start_mark)
            lines[key] = line
        return super().construct_mapping(node, deep)


# What a run adds to its config in params.json (train.build): not keys, left out when a run's
# params.json is given back as --config (it was refused for them).
RUN_RECORD = ('derived', 'code', 'launch')


def read(path, params: dict) -> dict:
    """The ``{'section.key': value}`` of the config file ``path``, checked against ``params``
    (``config_schema.file_values``). Its bytes are YAML's to decode (UTF-8, or UTF-16 with its
    BOM, as PowerShell saves), as far as it reads. Raises ConfigError naming the file for
    content that is not YAML text (a .beton given), YAML that does not parse, a section or key
    given twice, a file with no sections (empty, comments only, ``null`` or ``{}``: a copy cut
    short would run on the defaults), and what ``file_values`` refuses. The sections a run adds
    to its params.json (:data:`RUN_RECORD`) are left out: a run's params.json gives its config
    back."""
    try:
        with open(path, 'rb') as f:  # read as YAML needs it (a .beton given: its first bytes)
            content = yaml.load(f, Loader=_OnceEach)
    except yaml.YAMLError as e:
        raise ConfigError(f'{path}: not valid YAML: {" ".join(str(e).split())}') from None
    if content is None or content == {}:  # a copy cut short, say: it ran on the defaults
        raise ConfigError(f'{path}: no sections (it is empty, or holds only comments, null or '
                          f'{{}}): give the file with its sections, or leave this --config out '
                          f'for the defaults')
    if isinstance(content, dict):
        content = {name: keys for name, keys in content.items() if name not in RUN_RECORD}
    return file_values(content, params, path)

"""The docs stay true: docs/configuration.md is the schema's, every relative link and repository
path named in README.md and docs/*.md exists (a ``tests/x.py::test_name`` names a test that
exists), and every option they name is a real one: a ``--section.key`` or ``section.key`` of the
trainer's schema, and on a command line of the converter, the trainer or predict, an option of
that command."""
import importlib
import re
from pathlib import Path

import pytest

from conftest import REPO
from imagenet_ffcv import config, predict, write

DOCS = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
SECTIONS = ('data', 'model', 'resolution', 'lr', 'logging', 'validation', 'training',
            'checkpoint', 'dist')
# Top-level entries of the repository: a backticked path starting with one of them is checked.
TOP = {p.name for p in REPO.iterdir() if not p.name.startswith('.')} | {'.ci'}
GENERATED = ('bench-results/', 'betons/', 'runs/', 'demo_out/', '.carry/', 'build/')


def options(parser) -> set:
    return {s for action in parser._actions for s in action.option_strings}


TRAINER = options(config.build_parser())
COMMANDS = {'imagenet-ffcv-write': options(write.build_parser()),
            'write_beton.py': options(write.build_parser()),
            'imagenet_ffcv.write': options(write.build_parser()),
            'imagenet-ffcv-train': TRAINER, 'train_imagenet.py': TRAINER,
            'imagenet_ffcv.train': TRAINER,
            'imagenet-ffcv-predict': options(predict.build_parser()),
            'predict.py': options(predict.build_parser()),
            'imagenet_ffcv.predict': options(predict.build_parser())}
KEYS = {o[2:] for o in TRAINER if o.startswith('--') and '.' in o}


def text(path: Path) -> str:
    return path.read_text()


def test_configuration_md_is_generated_from_the_schema():
    path = REPO / 'docs' / 'configuration.md'
    assert path.read_text() == config.markdown(), (
        'docs/configuration.md differs from the schema: run '
        'python -m imagenet_ffcv.config --markdown > docs/configuration.md')


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: p.name)
def test_relative_links_exist(doc):
    missing = []
    for target in re.findall(r'\]\(([^)\s]+)\)', text(doc)):
        if re.match(r'[a-z]+:', target) or target.startswith('#'):
            continue  # a web address or an anchor of the same page
        if not (doc.parent / target.split('#')[0]).exists():
            missing.append(target)
    assert missing == []


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: p.name)
def test_repository_paths_exist(doc):
    missing = []
    for token in re.findall(r'`([^`\s]+)`', text(doc)):
        path, _, test_name = token.partition('::')
        if (path.split('/')[0] not in TOP or path.startswith(GENERATED)
                or re.search(r'[<>{}*$]|\.\.\.', path)):
            continue
        if not (REPO / path).exists():
            missing.append(token)
        elif test_name and not re.search(rf'^def {re.escape(test_name.split("[")[0])}\(',
                                         (REPO / path).read_text(), re.M):
            missing.append(token)
    assert missing == []


def is_key_or_known_name(name: str) -> bool:
    """A schema key, a file name (``checkpoint.pt``), or a function of the package module of that
    name (``weights.load_model``)."""
    section, attribute = name.split('.', 1)
    if name in KEYS or attribute in ('pt', 'safetensors', 'json', 'jsonl', 'tsv', 'yaml', 'py', 'md'):
        return True
    try:
        return hasattr(importlib.import_module(f'imagenet_ffcv.{section}'), attribute)
    except ImportError:
        return False


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: p.name)
def test_package_names_exist_where_the_docs_say(doc):
    """Each ``imagenet_ffcv.<module>.<name>`` of the doc is a name of that module."""
    named = set(re.findall(r'\bimagenet_ffcv\.(\w+)\.(\w+)', text(doc)))
    assert sorted(f'{m}.{a}' for m, a in named
                  if not hasattr(importlib.import_module(f'imagenet_ffcv.{m}'), a)) == []


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: p.name)
def test_config_keys_are_keys_of_the_schema(doc):
    named = re.findall(rf"(?<![\w./-])-*((?:{'|'.join(SECTIONS)})\.[a-z_0-9]+)\b(?!\()",
                       text(doc))  # not a call such as model.load_state_dict(...)
    assert sorted({k for k in named if not is_key_or_known_name(k)}) == []


def command_lines(doc_text: str):
    """Each command line of the doc (continuation lines joined) that runs one of our commands:
    ``(command, the words after it)``."""
    joined = re.sub(r'\\\n\s*', ' ', doc_text)
    for line in joined.splitlines():
        words = line.strip().strip('`').split()
        for i, word in enumerate(words):
            name = word.rsplit('/', 1)[-1]
            if name in COMMANDS:
                yield name, words[i + 1:]
                break


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: p.name)
def test_options_on_command_lines_are_options_of_that_command(doc):
    wrong = []
    for command, words in command_lines(text(doc)):
        for word in words:
            if word in ('#', '|', '&&', ';', '>'):
                break  # a comment or the next command
            option = word.split('=')[0].strip('`,;.)')
            if option.startswith('-') and option not in COMMANDS[command] | {'-h', '--help'}:
                wrong.append(f'{command} {option}')
    assert wrong == []


def test_converting_md_lists_the_image_extensions_the_converter_reads():
    """The list users read is the converter's own (constants.IMAGE_EXTENSIONS)."""
    from imagenet_ffcv.constants import IMAGE_EXTENSIONS
    listed = re.search(r'Images are the files named (.*?), in any case', text(
        REPO / 'docs' / 'converting.md'), re.DOTALL).group(1)
    assert tuple(re.findall(r'`(\.\w+)`', listed)) == IMAGE_EXTENSIONS

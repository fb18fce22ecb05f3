"""Set-up files: the pins of requirements.txt and environment.yml agree and match the install."""
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PIN = re.compile(r'^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)$')


def _norm(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r'[-_.]+', '-', name).lower()


def _requirements(name: str = 'requirements.txt') -> dict:
    pins = {}
    for line in (REPO / name).read_text().splitlines():
        line = line.split('#', 1)[0].strip()
        if not line:
            continue
        m = PIN.match(line)
        assert m, f'{name}: not an exact name==version pin: {line!r}'
        pins[_norm(m.group(1))] = m.group(2)
    return pins


def _environment_pip() -> dict:
    env = yaml.safe_load((REPO / 'environment.yml').read_text())
    pip_lists = [d['pip'] for d in env['dependencies'] if isinstance(d, dict) and 'pip' in d]
    assert len(pip_lists) == 1, 'environment.yml: expected one pip: list'
    pins = {}
    for line in pip_lists[0]:
        m = PIN.match(str(line).strip())
        assert m, f'environment.yml: not an exact name==version pin: {line!r}'
        pins[_norm(m.group(1))] = m.group(2)
    return pins


def test_requirements_and_environment_pins_identical():
    """requirements.txt and environment.yml's pip list pin the same name==version set."""
    req, env = _requirements(), _environment_pip()
    assert len(req) >= 5
    assert set(req.items()) == set(env.items())


def test_environment_yml_uses_pip_for_python_packages():
    """environment.yml is named imagenet-ffcv, uses conda-forge and installs pip."""
    env = yaml.safe_load((REPO / 'environment.yml').read_text())
    assert env['name'] == 'imagenet-ffcv'
    assert 'conda-forge' in env['channels']
    assert 'pip' in env['dependencies']


@pytest.mark.parametrize('name, pinned', [('torch', '2.14.1'), ('torchvision', '0.29.1'),
                                          ('ffcv', '1.0.2')])
def test_core_pins(name, pinned):
    """torch, torchvision and ffcv are pinned to the versions the project was built with."""
    assert _requirements().get(name) == pinned
    assert _environment_pip().get(name) == pinned


@pytest.mark.parametrize('name', ['numpy', 'numba', 'fastargs', 'torch', 'tensorboard'])
def test_installed_version_matches_pin(name):
    """The installed version (local suffix like +cu130 stripped) is the pinned one."""
    installed = version(name).split('+', 1)[0]
    assert installed == _requirements()[name]


def test_extras_are_exact_pins_apart_from_requirements():
    """requirements-extras.txt (optional integrations, installed only on request, so never checked
    against the install) pins exact versions of packages that requirements.txt does not name, and
    environment.yml lists the same pins in a comment."""
    extras = _requirements('requirements-extras.txt')
    assert {'timm', 'wandb'} <= set(extras)
    assert not set(extras) & set(_requirements())
    commented = {m.group(1) for line in (REPO / 'environment.yml').read_text().splitlines()
                 if (m := re.match(r'^\s*#\s*-\s*(\S+==\S+)\s*$', line))}
    assert {f'{name}=={pin}' for name, pin in extras.items()} <= commented
    assert not set(extras) & set(_environment_pip())


def test_ci_runs_make_test():
    """.ci/run runs exactly `make test` (the README's test command)."""
    commands = [line.strip() for line in (REPO / '.ci' / 'run').read_text().splitlines()
                if line.strip() and not line.lstrip().startswith('#')]
    assert 'make test' in commands


def test_makefile_has_demo_and_test_targets():
    """The Makefile defines the demo and test targets; test runs pytest on tests/."""
    text = (REPO / 'Makefile').read_text()
    assert re.search(r'^demo:', text, re.M) and re.search(r'^test:', text, re.M)
    assert re.search(r'^\t.*-m pytest .*tests', text, re.M)


def test_readme_shows_make_demo_and_make_test():
    """README.md shows the `make demo` and `make test` commands in its section of the two
    commands, before the install and the quick start."""
    text = (REPO / 'README.md').read_text()
    section = text.split('\n## Two commands\n', 1)[1].split('\n## ', 1)[0]
    commands = [line.split('#')[0].strip() for line in section.splitlines()]
    assert 'make demo' in commands and 'make test' in commands
    assert text.index('## Two commands') < text.index('## Install') < text.index('## Quick start')


def _pyproject() -> dict:
    import tomllib
    return tomllib.loads((REPO / 'pyproject.toml').read_text())


def test_pyproject_ranges_admit_the_exact_pins():
    """Every dependency of pyproject.toml (and of its timm/wandb/tensorboard/test extras) is pinned
    in requirements.txt or requirements-extras.txt, and the pin satisfies the package's range:
    `pip install -e .` after `pip install -r requirements.txt` changes nothing."""
    from packaging.requirements import Requirement
    project = _pyproject()['project']
    pins = {**_requirements(), **_requirements('requirements-extras.txt')}
    extras = project['optional-dependencies']
    wanted = project['dependencies'] + [r for name in ('timm', 'wandb', 'tensorboard', 'test')
                                        for r in extras[name]]
    for line in wanted:
        req = Requirement(line)
        name = _norm(req.name)
        assert name in pins, f'{req.name} has no exact pin'
        assert req.specifier.contains(pins[name], prereleases=True), (line, pins[name])
    # and nothing pinned for the package itself is missing from pyproject.toml but pytest
    named = {_norm(Requirement(r).name) for r in wanted}
    assert set(_requirements()) - named == set()


def test_the_commands_and_the_license_are_declared():
    """The three console scripts point at the package's cli functions; the licence is
    Apache-2.0 with its text in LICENSE."""
    import importlib
    project = _pyproject()['project']
    for script, target in project['scripts'].items():
        module, function = target.split(':')
        assert callable(getattr(importlib.import_module(module), function)), script
    assert set(project['scripts']) == {'imagenet-ffcv-write', 'imagenet-ffcv-train',
                                       'imagenet-ffcv-predict'}
    assert project['license'] == 'Apache-2.0'
    assert 'Apache License' in (REPO / 'LICENSE').read_text()[:200]


def test_the_wheel_ships_the_configs_and_the_decoder_without_setuptools_warnings(tmp_path):
    """`pip wheel` of the package's files (copied, so the checkout is not written) builds without
    setuptools' BuildBackendWarning or deprecation warnings (its warning that the config folders
    are absent from `packages` meant a later setuptools would stop shipping them), and the wheel
    holds every shipped config, the wnid table and the built JPEG region decoder."""
    src = tmp_path / 'src'
    src.mkdir()
    for name in ('pyproject.toml', 'setup.py', 'README.md', 'LICENSE'):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / 'imagenet_ffcv', src / 'imagenet_ffcv',
                    ignore=shutil.ignore_patterns('__pycache__', '*.so'))
    built = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps',
                            '--no-build-isolation', '--no-cache-dir', '-w', str(tmp_path / 'dist'),
                            str(src)],
                           capture_output=True, text=True, timeout=300)
    log = built.stdout + built.stderr
    assert built.returncode == 0, log[-3000:]
    assert 'Warning' not in log, log[-3000:]
    wheel, = (tmp_path / 'dist').glob('imagenet_ffcv-*.whl')
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f'imagenet_ffcv/{p.relative_to(REPO / "imagenet_ffcv").as_posix()}'
               for p in (REPO / 'imagenet_ffcv' / 'configs').glob('*/*.yaml')}
    assert len(configs) >= 10 and configs <= names, sorted(configs - names)
    assert 'imagenet_ffcv/imagenet_wnids.tsv' in names
    assert any(n.startswith('imagenet_ffcv/_jpeg_region') and n.endswith('.so') for n in names)


def test_the_sdist_ships_the_docs_the_readme_links_and_no_tests(tmp_path):
    """The source distribution held the test files (setuptools takes tests/test*.py by default)
    without conftest.py, tests/data or requirements.txt, so they failed there, and not docs/,
    which the README links about 15 times. MANIFEST.in grafts docs/ and prunes tests/."""
    src = tmp_path / 'src'
    src.mkdir()
    for name in ('pyproject.toml', 'setup.py', 'README.md', 'LICENSE', 'MANIFEST.in'):
        shutil.copy(REPO / name, src / name)
    for folder in ('imagenet_ffcv', 'docs', 'tests'):
        shutil.copytree(REPO / folder, src / folder,
                        ignore=shutil.ignore_patterns('__pycache__', '*.so'))
    built = subprocess.run([sys.executable, '-c', 'import setuptools.build_meta as b; '
                            'print(b.build_sdist("dist"))'], cwd=src, capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 0, (built.stdout + built.stderr)[-3000:]
    sdist = src / 'dist' / built.stdout.split()[-1]
    with tarfile.open(sdist) as tar:
        names = {name.split('/', 1)[1] for name in tar.getnames() if '/' in name}
    docs = {f'docs/{p.name}' for p in (REPO / 'docs').glob('*.md')}
    assert len(docs) >= 5 and docs <= names, sorted(docs - names)
    assert {'README.md', 'LICENSE', 'imagenet_ffcv/jpeg_region.c', 'setup.py'} <= names
    assert [n for n in names if n.startswith('tests/')] == []


@pytest.mark.parametrize('command', ['write', 'train', 'predict'])
def test_each_command_prints_the_versions_a_bug_report_needs(command, capsys):
    """``--version`` (each command refused it: an unknown argument, or predict's missing
    images): this package's version, its checkout's commit, whether the region decoder is built
    (without it the loader decodes whole JPEGs), Python's and the key packages' versions."""
    import importlib
    from imagenet_ffcv import jpeg_region
    cli = importlib.import_module(f'imagenet_ffcv.{command}').cli
    with pytest.raises(SystemExit) as e:
        cli(['--version'])
    assert e.value.code == 0
    first, decoder, packages = capsys.readouterr().out.splitlines()
    assert first.startswith(f'imagenet-ffcv {version("imagenet-ffcv")} ')
    assert first.endswith(f' in {REPO / "imagenet_ffcv"}')
    head = subprocess.run(['git', '-C', str(REPO), 'rev-parse', 'HEAD'], capture_output=True,
                          text=True)
    if head.returncode == 0 and (REPO / '.git').exists():
        assert f' (git {head.stdout.strip()[:12]}' in first
    assert decoder == f'JPEG region decoder: built, {jpeg_region.library_path()}'
    assert packages.startswith(f'Python {sys.version.split()[0]}, torch {version("torch")}, ')
    assert f', ffcv {version("ffcv")}, numba {version("numba")}, ' in packages

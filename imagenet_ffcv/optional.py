"""Packages imported only when a config asks for them: the optional integrations (timm, W&B,
pinned in ``requirements-extras.txt``, which ``make`` never installs) and TensorBoard (pinned in
``requirements.txt``, but absent from some machines, e.g. a bare GPU box; a run that does not log to
it must not need it).
"""
import importlib
from pathlib import Path

from .errors import ImagenetFfcvError

REPO = Path(__file__).resolve().parents[1]
EXTRAS_FILE = REPO / 'requirements-extras.txt'
EXTRAS = ('timm', 'wandb', 'tensorboard')  # the package's extras of the same names (pyproject.toml)


class MissingPackageError(ImagenetFfcvError, ImportError):
    """An optional package a config asks for is not installed; the message names the package,
    the config key that needs it and the install command."""


def pinned(package: str) -> str:
    """``'name==version'`` for ``package`` as ``requirements.txt`` or
    ``requirements-extras.txt`` pins it; ``package`` when neither does."""
    for path in (REPO / 'requirements.txt', EXTRAS_FILE):
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        pins = [line.strip() for line in lines if line.strip().startswith(f'{package}==')]
        if pins:
            return pins[0]
    return package


def require(module: str, needed_for: str, package: str = None):
    """The module ``module`` (e.g. ``'timm'``, ``'timm.optim'``, ``'wandb'``,
    ``'torch.utils.tensorboard'``), imported now. ``needed_for`` names what asked for it (e.g.
    ``"model.arch='timm:convnext_tiny'"``, ``'TensorBoard logging'``); ``package``: the pip package
    that provides it (default: the module's top-level name). Raises MissingPackageError when it is
    not installed (or fails to import), naming the package, what asked for it and how to install
    it: its pin, and in a checkout of the project the package's extra of that name where there
    is one (the package is not on PyPI, so ``pip install 'imagenet-ffcv[wandb]'`` would fail)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pin = pinned(package or module.split('.')[0])
        name = pin.split('==')[0]
        extra = (f" (from a checkout of this project: pip install -e '.[{name}]')"
                 if name in EXTRAS and (REPO / 'pyproject.toml').is_file() else '')
        raise MissingPackageError(
            f'{needed_for} needs the package {name!r}, which is not installed ({e}): '
            f'pip install {pin}{extra}') from e

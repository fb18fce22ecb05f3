"""The optional integrations (timm, W&B), imported only when a config asks for them.

They are pinned in ``requirements-extras.txt`` (at the repository root), which ``make`` never
installs.
"""
import importlib
from pathlib import Path

EXTRAS_FILE = Path(__file__).resolve().parents[1] / 'requirements-extras.txt'


class MissingPackageError(ImportError):
    """An optional package a config asks for is not installed; the message names the package,
    the config key that needs it and the install command."""


def pinned(package: str) -> str:
    """``'name==version'`` for ``package`` as ``requirements-extras.txt`` pins it, or the bare
    name when the file or the pin is absent."""
    try:
        lines = EXTRAS_FILE.read_text().splitlines()
    except OSError:
        return package
    pins = [line.strip() for line in lines if line.strip().startswith(f'{package}==')]
    return pins[0] if pins else package


def require(module: str, needed_for: str):
    """The module ``module`` (e.g. ``'timm'``, ``'timm.optim'``, ``'wandb'``), imported now.
    ``needed_for`` names what asked for it (e.g. ``"model.arch='timm:convnext_tiny'"``). Raises
    MissingPackageError when it is not installed (or fails to import), naming the package, the
    key and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split('.')[0]
        raise MissingPackageError(
            f'{needed_for} needs the optional package {package!r}, which is not installed '
            f'({e}); install the optional integrations with: pip install -r '
            f'{EXTRAS_FILE.name} (or pip install {pinned(package)})') from e

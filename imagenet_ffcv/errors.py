"""The tool's base exception, and the types derived from it that several modules raise. Every
error the tool raises for bad input, a missing file or package, or a run that cannot go on derives
from :class:`ImagenetFfcvError` (and, where one fits, from the built-in type a caller would
expect: ValueError, ImportError, OSError, ...), so a command line catches one type and prints its
message instead of a traceback. :func:`first_few` is how a message lists files, folders or
classes."""


class ImagenetFfcvError(Exception):
    """An error of this tool; its message names the file, key or sample and says what to do."""


class InputError(ImagenetFfcvError, ValueError):
    """A value, a file's content or a folder's layout the tool cannot use (a config value out of
    range, a devkit that does not read, class folders that clash, a folder where a file goes)."""


class CheckpointError(ImagenetFfcvError):
    """A checkpoint or weights file that cannot be found, read or used (resumed with this config,
    loaded into this model); the message says why and what to do."""


class MissingFileError(ImagenetFfcvError, FileNotFoundError):
    """A file or folder the tool needs is not there (a .beton, a split folder, a config file)."""


def first_few(items, n: int = 5, sep: str = ', ') -> str:
    """The first ``n`` of ``items`` (any iterable; ``str`` of each) joined by ``sep``, and ' ...'
    after them when there are more: how a message or warning lists files, folders or classes."""
    items = list(items)
    return sep.join(map(str, items[:n])) + (' ...' if len(items) > n else '')

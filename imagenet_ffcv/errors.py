"""The tool's base exception. Every error the tool raises for bad input, a missing file or
package, or a run that cannot go on derives from :class:`ImagenetFfcvError` (and, where one fits,
from the built-in type a caller would expect: ValueError, ImportError, OSError, ...), so a command
line catches one type and prints its message instead of a traceback."""


class ImagenetFfcvError(Exception):
    """An error of this tool; its message names the file, key or sample and says what to do."""

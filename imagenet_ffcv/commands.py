"""What the three commands (``imagenet-ffcv-write``, ``imagenet-ffcv-train``,
``imagenet-ffcv-predict``) share: the name their messages give the command the user ran, their
``--version``, which errors they tell in one line, warnings printed as one line, the one line
of a command stopped by Ctrl-C, and their progress bars."""
import argparse
import errno
import functools
import importlib.metadata
import os
import platform
import signal
import sys
import warnings

from tqdm import tqdm

from .errors import ImagenetFfcvError
from .jpeg_region import JpegLibraryError, library_path, load_library
from .run_dir import code_version
from .signals import end_by_sigint

PACKAGE = os.path.dirname(os.path.abspath(__file__))
# Seconds between a progress bar's redraws where stderr is a file (a SLURM job's output, a
# redirect), not a terminal. tqdm's 0.1 s redrew the demo's bars 124 times in its first 2 epochs
# (12 kB in 25 s, CPU); at 10 redraws a second, a day's run would log about 90 MB of them.
LOG_REDRAW_S = 60


def progress_bar(iterable=None, **options) -> tqdm:
    """tqdm's bar (``options`` are tqdm's; on stderr unless ``file``), redrawn as tqdm redraws it
    (up to 10 times a second) on a terminal or in a Jupyter kernel, and every
    :data:`LOG_REDRAW_S` seconds (tqdm's ``mininterval`` and ``maxinterval``) in a file: a long
    job's log keeps one line a minute of it instead of megabytes of redraws."""
    if not options.get('disable') and not _interactive(options.get('file') or sys.stderr):
        options.setdefault('mininterval', LOG_REDRAW_S)
        options.setdefault('maxinterval', LOG_REDRAW_S)  # tqdm's monitor thread redraws too
    return tqdm(iterable, **options)


def _interactive(stream) -> bool:
    """Whether ``stream`` is a terminal, or a Jupyter kernel's (which redraws a bar in place);
    False for a file, a pipe, or no stream (None, closed)."""
    try:
        return bool(stream.isatty()) or 'ipykernel' in sys.modules
    except (AttributeError, ValueError, OSError):
        return False


def command_name(module: str) -> str:
    """The command as the user ran it, for messages: ``imagenet-ffcv-train`` or
    ``train_imagenet.py`` (the name of the script run, the checkout's ``predict.py`` included),
    or ``python -m imagenet_ffcv.train`` when run as a module (``sys.argv[0]`` is then the
    module's file in this package); ``module`` is the command's module name in this package."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ''
    if argv0 in ('', '-m', '-c') or os.path.dirname(os.path.abspath(argv0)) == PACKAGE:
        return f'python -m imagenet_ffcv.{module}'
    return os.path.basename(argv0)


# The packages whose versions decide a run's results and speed, in --version's line (a tuple:
# the distributions that provide one module, the first installed named)
VERSIONED = ('torch', 'torchvision', 'ffcv', 'numba', 'numpy', 'pillow',
             ('opencv-python', 'opencv-python-headless', 'opencv-contrib-python',
              'opencv-contrib-python-headless'))


def version_text() -> str:
    """What ``--version`` prints, as a bug report wants it: this package's version and the git
    commit of its checkout (with local changes or not; ``run_dir.code_version``, as params.json
    records them) and its folder; whether the JPEG region decoder is built (its library, else why
    not: ``jpeg_region.load_library``); Python's version and those of :data:`VERSIONED`."""
    code = code_version()
    changed = ', with local changes' if code['git_dirty'] else ''
    commit = f' (git {code["git_commit"][:12]}{changed})' if code['git_commit'] else ''
    try:
        load_library()
        decoder = f'built, {library_path()}'
    except JpegLibraryError as e:
        decoder = f'not usable: {e}'

    def version(names):
        names = (names,) if isinstance(names, str) else names
        for name in names:
            try:
                return f'{name} {importlib.metadata.version(name)}'
            except importlib.metadata.PackageNotFoundError:
                pass
        return f'{names[0]} not installed'
    return (f'imagenet-ffcv {code["version"] or "(not installed)"}{commit} in {PACKAGE}\n'
            f'JPEG region decoder: {decoder}\n'
            f'Python {platform.python_version()}, ' + ', '.join(map(version, VERSIONED)))


class _Version(argparse.Action):
    """``--version``: print :func:`version_text` and exit 0 (argparse's own version action takes
    its text when the parser is built, which would run git for every command)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help='print the versions of this tool, its region decoder and the '
                              'packages it runs on, then exit')

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


# The limits of the storage options the converter and predict share: {option: (least, most or
# None, what the least means)}
STORAGE_OPTION_RANGES = {'--max-res': (1, None, ''), '--jpeg-quality': (1, 100, ''),
                         '--restart-interval': (0, None, ' (0: no markers)')}


def check_ranges(parser: argparse.ArgumentParser, args, ranges: dict) -> None:
    """``parser.error`` (exit status 2), naming it, for the first option of ``ranges``
    (``{'--max-res': (least, most or None, note)}``) whose whole-number value in ``args`` (None:
    not given) lies outside them: ``--max-res 0: must be >= 1`` (a value out of range was used as
    something else: --max-res 0 as the default, -1 as a 1 x 1 image, OpenCV's quality 100 for
    150)."""
    for option, (least, most, note) in ranges.items():
        value = getattr(args, option.lstrip('-').replace('-', '_'))
        if value is not None and not least <= value <= (value if most is None else most):
            parser.error(f'{option} {value}: must ' + (
                f'be >= {least}' if most is None else f'lie in [{least}, {most}]') + note)


def add_version_option(parser: argparse.ArgumentParser) -> None:
    """Give a command's ``parser`` the ``--version`` option (:func:`version_text`)."""
    parser.add_argument('--version', action=_Version)


# OSErrors of the machine, not the code: told in one line even without a file name (a full disk, a
# quota, a file-size limit, a read-only folder, a permission, a failing disk).
USER_OS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                  errno.EIO)


def is_user_error(e: BaseException) -> bool:
    """Whether a command tells the error ``e`` in one line, as the user's to mend, rather than by
    its traceback, as a defect of the code: the tool's own errors (``errors.ImagenetFfcvError``:
    their messages name the file or key and say what to do), and an OSError that names a file or
    is the machine's (:data:`USER_OS_ERRORS`)."""
    return isinstance(e, ImagenetFfcvError) or (
        isinstance(e, OSError) and bool(e.filename or e.errno in USER_OS_ERRORS))


def one_line_errors(module: str):
    """Decorator of a command's ``cli`` that returns an exit status: an exception that is the
    user's to mend (:func:`is_user_error`) prints as one line, ``<command>: <message>``, on stderr,
    and the status is 1; any other keeps its traceback (a defect of the code: it shows where)."""
    def decorate(cli):
        @functools.wraps(cli)
        def wrapped(*args, **kwargs):
            try:
                return cli(*args, **kwargs)
            except Exception as e:
                if not is_user_error(e):
                    raise
                print(f'{command_name(module)}: {e}', file=sys.stderr)
                return 1
        return wrapped
    return decorate


def stopped_by_ctrl_c(module: str, what: str = '') -> int:
    """After a command's KeyboardInterrupt (its clean-up done): ``<command>: stopped by
    Ctrl-C<what>`` on stderr, in place of a traceback, then the process ends by SIGINT
    (``signals.end_by_sigint``: a shell running a loop of commands stops the loop only when one
    dies of SIGINT). Returns 128 + SIGINT where it does not end (off the main thread)."""
    print(f'{command_name(module)}: stopped by Ctrl-C{what}', file=sys.stderr, flush=True)
    end_by_sigint()
    return 128 + signal.SIGINT


def stops_on_ctrl_c(module: str, what: str = ''):
    """Decorator of a command's ``cli`` that returns an exit status: a KeyboardInterrupt (Ctrl-C
    before the command's own handling of it, or a second one) ends it as
    :func:`stopped_by_ctrl_c` says, with ``what``; a status of 128 + SIGINT (the command stopped
    for Ctrl-C, its clean-up done) ends the process by SIGINT too, so that a shell loop of
    commands stops instead of starting the next one."""
    def decorate(cli):
        @functools.wraps(cli)
        def wrapped(*args, **kwargs):
            try:
                status = cli(*args, **kwargs)
            except KeyboardInterrupt:
                return stopped_by_ctrl_c(module, what)
            if status == 128 + signal.SIGINT:
                end_by_sigint()
            return status
        return wrapped
    return decorate


def one_line_warnings(module: str):
    """Decorator of a command's ``cli``: while it runs, warnings that Python attributes to the
    package's code print as one line, ``<command>: warning: <message>`` (:func:`command_name`),
    instead of ``/path/sources.py:272: UserWarning: <message>`` followed by a line of our source
    code. Those are the package's own, and another library's whose ``stacklevel`` points at the
    package's call; other warnings print as Python prints them."""
    def decorate(cli):
        @functools.wraps(cli)
        def wrapped(*args, **kwargs):
            python_format = warnings.formatwarning

            def formatted(message, category, filename, lineno, line=None):
                if os.path.abspath(filename).startswith(PACKAGE + os.sep):
                    return f'{command_name(module)}: warning: {message}\n'
                return python_format(message, category, filename, lineno, line)
            warnings.formatwarning = formatted
            try:
                return cli(*args, **kwargs)
            finally:
                warnings.formatwarning = python_format
        return wrapped
    return decorate

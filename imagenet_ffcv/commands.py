"""What the three commands (``imagenet-ffcv-write``, ``imagenet-ffcv-train``,
``imagenet-ffcv-predict``) share: the name their messages give the command the user ran."""
import os
import sys


def command_name(module: str) -> str:
    """The command as the user ran it, for messages: ``imagenet-ffcv-train`` or
    ``train_imagenet.py`` (the name of the script run), or ``python -m imagenet_ffcv.train`` when
    run as a module; ``module`` is the command's module name in this package."""
    name = os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else '')
    if not name or name in (f'{module}.py', '-m', '-c'):
        return f'python -m imagenet_ffcv.{module}'
    return name

"""Launched by test_train.py under torchrun: trains with the given overrides and writes this rank's
summary (weights hash, val count, top-1) to OUT_DIR/rank<RANK>.json, and its process id to
OUT_DIR/pid<RANK> when it starts.

    torchrun --nproc_per_node=2 tests/torchrun_main.py OUT_DIR --section.key=value ...
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_imagenet  # noqa: E402
from imagenet_ffcv import config  # noqa: E402

if __name__ == '__main__':
    out_dir = Path(sys.argv[1])
    (out_dir / f'pid{os.environ["RANK"]}').write_text(str(os.getpid()))  # for the fault tests
    summary = train_imagenet.main(config.load_config(sys.argv[2:]))
    (out_dir / f'rank{os.environ["RANK"]}.json').write_text(json.dumps(summary))

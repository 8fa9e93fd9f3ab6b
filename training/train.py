"""Train an aksis model: `accelerate launch training/train.py [options]` (or plain `python training/train.py`).

Every option is a field of `aksis.config.TrainConfig`; `--config training/configs/tiny-cpu.yaml` reads a preset,
and flags given on the command line override it. Run with --help for the full list.
"""

from __future__ import annotations

import sys

from aksis.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())

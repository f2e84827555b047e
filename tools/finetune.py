#!/usr/bin/env python
"""Thin wrapper: `python tools/finetune.py CONFIG [overrides] [--seeds N] [--report] [--export DIR]`
= `megamlm finetune ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megamlm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))

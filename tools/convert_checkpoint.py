#!/usr/bin/env python
"""Thin wrapper: same as `megamlm convert SOURCE OUTPUT --to {megamlm,hf} [...]` (offline, CPU)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megamlm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))

#!/usr/bin/env python3
"""Thin wrapper: `python tools/train_tokenizer.py CONFIG [overrides] [flags]` == `megamlm train-tokenizer ...`."""

import sys

from megamlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-tokenizer", *sys.argv[1:]]))

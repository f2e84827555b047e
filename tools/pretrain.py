#!/usr/bin/env python3
"""Thin wrapper for launchers that want a script: `deepspeed --num_accelerators 2 tools/pretrain.py CONFIG`
== `megamlm pretrain CONFIG` (the `--local_rank` the deepspeed launcher adds is accepted and ignored)."""

import sys

from megamlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))

#!/usr/bin/env python3
"""Thin wrapper: `python tools/make_shards.py CONFIG [overrides] [flags]` == `megamlm make-shards ...`."""

import sys

from megamlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["make-shards", *sys.argv[1:]]))

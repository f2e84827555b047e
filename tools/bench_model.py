#!/usr/bin/env python
"""Standalone ``megamlm bench model``: training-step tokens/s, MFU and peak memory, megamlm vs HF BERT.

Same options as ``megamlm bench model --help``. Examples (the goal config on a 2-core CPU):
    OMP_NUM_THREADS=2 python tools/bench_model.py --threads 2
    OMP_NUM_THREADS=2 python tools/bench_model.py --threads 2 --precision bf16
    OMP_NUM_THREADS=2 python tools/bench_model.py --threads 2 --dropout 0 --padding --json out.json
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megamlm.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["model"] + sys.argv[1:]))

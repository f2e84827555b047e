#!/usr/bin/env python
"""Per-rank memory and step time of the vocabulary-sized tensors (embedding / tied decoder, logits) for
vocab-parallel sizes t: ``python tools/bench_vocab_parallel.py --vocab 256000 --hidden 256 --rows 4096``.
See megamlm/parallel/bench.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamlm.parallel.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

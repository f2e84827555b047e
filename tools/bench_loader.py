#!/usr/bin/env python
"""``megamlm bench loader`` as a script: loader throughput per worker process (see ``--help``)."""

import sys

from megamlm.data.bench import main

if __name__ == "__main__":
    sys.exit(main())

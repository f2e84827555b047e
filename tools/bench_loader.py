#!/usr/bin/env python
"""

import sys

from megamlm.data.bench import main

if __name__ == "__main__":
    sys.exit(main())

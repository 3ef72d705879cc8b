"""``python -m meepo …``: the same as the ``meepo`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m meepo …``: the same as the ``meepo`` console script."""

import sys

from .cli import console

if __name__ == "__main__":
    console()

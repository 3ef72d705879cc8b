"""``python -m meepo …``: the same as the ``meepo`` console script."""

from .cli import console

if __name__ == "__main__":
    console()

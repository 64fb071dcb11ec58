"""Entry point: ``python -m pippy --help``."""

import sys

from pippy.cli import main

if __name__ == "__main__":
    sys.exit(main())

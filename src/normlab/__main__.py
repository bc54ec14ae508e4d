"""``python -m normlab ...`` runs the command-line lab (see :mod:`normlab.cli`)."""

import sys

from normlab.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())

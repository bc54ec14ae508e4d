"""``python -m normlab ...`` runs the command-line lab (see :mod:`normlab.lab.cli`)."""

import sys

from normlab.lab.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())

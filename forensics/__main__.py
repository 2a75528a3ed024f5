"""``python -m forensics``: the command line (:mod:`forensics.cli`)."""

import sys

from forensics.cli import main

if __name__ == "__main__":
    sys.exit(main())

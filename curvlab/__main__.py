"""``python -m curvlab``: the ``curvlab`` command (see :mod:`curvlab.cli`)."""

import sys

from curvlab.cli import main

if __name__ == "__main__":
    sys.exit(main())

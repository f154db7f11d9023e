"""`python -m lmforge`: the same command line as the `lmforge` script."""

import sys

from lmforge.cli import main

sys.exit(main())

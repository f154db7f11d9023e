"""`python -m lmforge`: the same command line as the `lmforge` script."""

import sys

from lmforge.cli import main

# Guarded: `lmforge serve` starts its engine process with the "spawn" method, which imports this module again
# there (as __mp_main__), where it must not run the command line a second time.
if __name__ == "__main__":
    sys.exit(main())

"""`python -m largeforge ...`: the same CLI as the `largeforge` command (and what `torchrun -m
largeforge train ...` runs in every process)."""

import sys

from largeforge.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

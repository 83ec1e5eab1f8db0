"""`python -m rmbert ...` (what `torchrun -m rmbert train ...` runs)."""

import sys

from rmbert.cli import main

sys.exit(main())

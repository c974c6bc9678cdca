"""``python -m lowrank_optim``: the ``lowrank-optim`` command, where the console script is not on PATH."""

import sys

from .cli import main

sys.exit(main())

"""``python -m lfpass.cli``: the ``lfpass`` command (as ``tools/bench_optimize.py`` runs it)."""

import sys

from lfpass.cli import main

sys.exit(main())

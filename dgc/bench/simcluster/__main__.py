"""``python -m dgc.bench.simcluster ...``: the same command line as ``launch/simcluster.py``."""

import sys

from .cli import main

sys.exit(main())

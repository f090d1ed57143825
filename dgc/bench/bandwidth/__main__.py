"""``python -m dgc.bench.bandwidth ...``: the same command line as ``launch/bench_bandwidth.py``."""

import sys

from .cli import main

sys.exit(main())

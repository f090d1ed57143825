#!/usr/bin/env python3
"""Simulated multi-node cluster (network namespaces, shaped links): see docs/simcluster.md.

The code is :mod:`dgc.bench.simcluster`; ``python launch/simcluster.py --help`` for the options.
"""

import sys

from dgc.bench.simcluster.cli import main

if __name__ == "__main__":
    sys.exit(main())

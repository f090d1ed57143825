#!/usr/bin/env python3
"""Accuracy parity: dense vs every compression option, same seeds (see docs/parity.md).

The code is :mod:`dgc.bench.parity`; ``python launch/parity.py --help`` for the options.
"""

from dgc.bench.parity import main

if __name__ == "__main__":
    raise SystemExit(main())

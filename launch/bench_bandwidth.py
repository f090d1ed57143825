#!/usr/bin/env python3
"""Bandwidth benchmark: gradient compressors side by side on the same model, network and run.

    torchrun ... launch/bench_bandwidth.py worker --model resnet50 --out results/run.json
    sudo .venv/bin/python launch/bench_bandwidth.py sweep --out results/bandwidth
    python launch/bench_bandwidth.py report --out results/bandwidth

The code is :mod:`dgc.bench.bandwidth`; see docs/bandwidth.md.
"""

import sys

from dgc.bench.bandwidth.cli import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The bandwidth sweep's report again (CSV, JSON, summary.md, plots) from its per-run JSON.

    python launch/bandwidth_report.py --out results/bandwidth

Same as ``launch/bench_bandwidth.py report``; the code is :mod:`dgc.bench.bandwidth.report`.
"""

import sys

from dgc.bench.bandwidth.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))

#!/usr/bin/env python3
"""MNIST CNN: 90% bank-balanced weight sparsity + DGC at density 0.001 vs dense, several seeds.

The code is :mod:`dgc.bench.prune_dgc_mnist`; ``python launch/prune_dgc_mnist.py --help``.
"""

from dgc.bench.prune_dgc_mnist import main

if __name__ == "__main__":
    raise SystemExit(main())

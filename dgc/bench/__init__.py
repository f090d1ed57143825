"""Benchmarks and studies: the simulated cluster (:mod:`dgc.bench.simcluster`), the bandwidth
benchmark (:mod:`dgc.bench.bandwidth`), model shapes (:mod:`dgc.bench.grad_shapes`) and the
accuracy studies (:mod:`dgc.bench.parity`, :mod:`dgc.bench.prune_dgc_mnist`). Their command
lines are the scripts in ``launch/``."""

__all__: list[str] = []

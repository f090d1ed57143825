"""Benchmark the DGC kernels against the memory-bandwidth yardstick: a preallocated triad.

Per kernel: median time over interleaved repeats (every case runs once per round, so load from other
processes hits all of them alike), achieved GB/s of the bytes the operation must move, and the fraction
of the **triad's** bandwidth measured in the same run: ``torch.add(a, b, alpha=0.9, out=c)`` on
preallocated float32 tensors of the same length (12 bytes per element), what memory can deliver to a
streaming kernel here.  ``x.clone()`` (which page-faults a fresh buffer every call) stays as a
secondary column.  On a GPU also the fraction of the device's peak memory bandwidth (``2 x memory
clock x bus width``, from CuPy's device attributes).

    python launch/bench_kernels.py                       # CPU: compiled path, twins, baselines
    python launch/bench_kernels.py --hook                # + the DGC hook's codec per step (DDP, world 1)
    python launch/bench_kernels.py --device cuda         # GPU: CuPy kernels, twins on the GPU, baselines
    python launch/bench_kernels.py --quant               # + the quantizers' codec (int8, TernGrad, QSGD)
    python launch/bench_kernels.py --only-dense          # the dense path's step, the triad, x.clone()

Implementations: ``fused`` is the compiled CPU path (:mod:`dgc.kernels.cpu_fused`, what
``backend="auto"`` runs on a CPU), ``twin`` the pure-torch twins (:mod:`dgc.kernels.reference`,
``backend="torch"``), ``cupy`` the CUDA kernels.

Bytes counted (float32 tensor of n elements): triad 12n; ``x.clone()`` 8n (read + write);
``torch.topk(|x|)``, ``block_absmax`` and ``select_topk`` 4n (one read of x); ``compress_step`` 20n with
momentum (read g, u, v; write u, v); the fused pass alone (GPU) the same 20n; ``dense_momentum`` (the
dense path's step while v is zero: ``u <- g + 0.9 u``, ``g <- u / N``) 16n for both implementations,
what one pass must move (read g, u; write u, g; the twin's two torch operations move 20n); ``scatter_unpack`` 4n (the
dense output) plus the N*k pairs; the hook's codec (``--hook``: a DDP step with the DGC hook minus the
same step with plain DDP, world size 1, one n-element parameter) 20n; the quantizers' codec
(``--quant``, :mod:`dgc.quant` with the ``compress=int8|terngrad|qsgd`` defaults: a scale per 512
elements, round to nearest) ``encode`` = quantize + pack + serialize, 4n + the message's bytes, and
``decode`` = parse + unpack + dequantize, the message + 4n (int8 n, QSGD at 7 levels n/2, TernGrad
n/4, plus a float32 scale per 512 elements); ``fused`` (:mod:`dgc.kernels.quant_fused`) against the
torch reference (``twin``), both allocating their output, and ``(out=)`` the fused pass into
preallocated buffers.  Goals (issue 14; issue 15: quantizer encode >= 20%): on a CPU,
the hook's codec and ``compress_step`` >= 50% of the triad's bandwidth, ``select_topk`` >= 30%; on a GPU
the fused pass >= 60% of peak bandwidth and the kernel >= 10x faster than the twin on the same GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from dgc.kernels import cpu_fused, cupy_available, reference


@dataclass
class Case:
    kernel: str
    impl: str
    bytes: float
    fn: Callable[[], object]
    times: list[float]


@dataclass
class Row:
    kernel: str
    impl: str
    median_ms: float
    min_ms: float
    gb_per_s: float
    of_triad: float
    """Achieved bandwidth / the triad's bandwidth in the same run."""
    vs_clone: float
    """Time / the time of ``x.clone()`` in the same run (the old yardstick)."""
    peak_fraction: float | None


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":

        def run(fn: Callable[[], object]) -> float:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) / 1e3

        return run

    def run_cpu(fn: Callable[[], object]) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    return run_cpu


def peak_bandwidth(device: torch.device) -> float | None:
    """Peak DRAM bandwidth in bytes/s from CuPy's attributes (memory clock in kHz, bus width in bits)."""
    if device.type != "cuda":
        return None
    try:
        import cupy

        attrs = cupy.cuda.Device(device.index or 0).attributes
        return 2.0 * attrs["MemoryClockRate"] * 1e3 * attrs["GlobalMemoryBusWidth"] / 8.0
    except Exception as exc:  # attribute missing in this CUDA version: no fraction
        print(f"(no peak bandwidth: {exc})", file=sys.stderr)
        return None


def build_cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    n, k, world = args.numel, max(1, math.ceil(args.density * args.numel)), args.world_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen).to(device)
    grad = torch.randn(n, generator=gen).to(device)
    wire = getattr(torch, args.wire)
    impls: dict[str, object] = {"twin": reference}
    if device.type == "cpu" and cpu_fused.is_available():
        impls = {"fused": cpu_fused, "twin": reference}
    if device.type == "cuda" and cupy_available():
        from dgc.kernels import cupy_backend

        impls = {"cupy": cupy_backend, "twin": reference}
    cases: list[Case] = []

    def add(kernel: str, impl: str, nbytes: float, fn: Callable[[], object]) -> None:
        cases.append(Case(kernel, impl, nbytes, fn, []))

    a, b, c = torch.randn(n, generator=gen).to(device), x.clone(), torch.empty_like(x)
    add("triad", "torch", 12 * n, lambda: torch.add(a, b, alpha=0.9, out=c))
    add("x.clone()", "torch", 8 * n, lambda: x.clone())
    add("torch.topk(|x|, k)", "torch", 4 * n, lambda: torch.topk(x.abs(), k, sorted=False))
    for name, mod in impls.items():
        add("block_absmax", name, 4 * n, lambda mod=mod: mod.block_absmax(x))
        add("select_topk", name, 4 * n, lambda mod=mod: mod.select_topk(x, k, sample_ratio=0.01, offset=7))
        u = torch.zeros(n, device=device)
        v = torch.zeros(n, device=device)
        out_i = torch.empty(k, dtype=torch.int32, device=device)
        out_v = torch.empty(k, dtype=wire, device=device)

        offsets = iter(np.random.default_rng(0).integers(100, size=10_000).tolist())

        def step(mod=mod, u=u, v=v, out_i=out_i, out_v=out_v, offsets=offsets) -> object:
            return mod.compress_step(
                grad, u, v, beta=0.9, nesterov=False, k=k, sample_ratio=0.01, offset=next(offsets),
                momentum_masking=True, out_indices=out_i, out_values=out_v,
            )  # fmt: skip

        add("compress_step", name, (grad.element_size() + 16) * n, step)
        idx = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(world)]).int().to(device)
        val = torch.randn(world, k, generator=gen).to(wire).to(device)
        out = torch.empty(n, device=device)
        pair_bytes = world * k * (4 + val.element_size())
        add(f"scatter_unpack N={world}", name, 4 * n + pair_bytes,
            lambda mod=mod, idx=idx, val=val, out=out: mod.scatter_unpack(out, idx, val, world))  # fmt: skip
        add_dense_case(cases, name, mod, grad, world)
        if name == "cupy":
            add("fused pass alone", name, (grad.element_size() + 16) * n, _fused_pass(mod, grad, u, v))
    return cases


def add_dense_case(cases: list[Case], impl: str, mod, grad: torch.Tensor, divide: int) -> None:
    """The dense path's step (``mod.dense_momentum``) on its own g and u, 16 bytes per element.  Each call
    scales u by about ``0.9 + 1 / divide``, so values stay finite (and never subnormal) for hundreds of
    rounds."""
    g, u = grad.clone(), torch.randn(grad.numel(), generator=torch.Generator().manual_seed(3)).to(grad.device)
    cases.append(Case("dense_momentum", impl, 16 * grad.numel(),
                      lambda: mod.dense_momentum(g, u, 0.9, divide), []))  # fmt: skip


def add_quant_cases(args: argparse.Namespace, cases: list[Case], device: torch.device) -> None:
    """Encode (to the message bytes) and decode (back to float32) of each quantized compressor: the
    torch reference (``twin``) and, on a CPU where it builds, the compiled pass (``fused``,
    :mod:`dgc.kernels.quant_fused`, what ``dgc.quant`` runs by default), interleaved."""
    from dgc.kernels import quant_fused

    from dgc.quant import QuantConfig

    n = args.numel
    x = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(device)
    impls = {"twin": "torch"}
    if device.type == "cpu" and quant_fused.is_available():
        impls = {"fused": "auto", "twin": "torch"}
    for method, fields in (("int8", {"bits": 8}), ("terngrad", {}), ("qsgd", {"levels": 7})):
        q = QuantConfig(method=method, **fields).quantizer()
        message = q.encode(x, backend="torch").to_bytes()
        wire = message.numel()
        for impl, backend in impls.items():
            cases.append(Case(f"{method} encode", impl, 4 * n + wire,
                              lambda q=q, b=backend: q.encode(x, backend=b).to_bytes(), []))
            cases.append(Case(f"{method} decode", impl, wire + 4 * n,
                              lambda q=q, m=message, b=backend: q.decode(q.from_bytes(m, n), backend=b), []))
        if "fused" in impls:  # into preallocated buffers, as a transport's send/receive buffers
            buf, out = torch.empty_like(message), torch.empty(n)
            cases.append(Case(f"{method} encode (out=)", "fused", 4 * n + wire,
                              lambda q=q, buf=buf: q.encode(x, out=buf), []))
            cases.append(Case(f"{method} decode (out=)", "fused", wire + 4 * n,
                              lambda q=q, m=message, out=out: q.decode(q.from_bytes(m, n), out=out), []))


def _fused_pass(mod, grad: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> Callable[[], object]:
    """Steps 1-2 and the block maxima only (``dgc_fused_update``): the bandwidth-bound part."""
    n = grad.numel()
    bm = torch.empty((n + reference.BLOCK - 1) // reference.BLOCK, device=grad.device)

    def run() -> None:
        with mod._on_torch_stream(grad.device) as index:
            args = (
                mod._arr(grad), np.int32(0), mod._arr(u), np.int32(1), mod._arr(v), mod._NULL, np.int32(0),
                mod._arr(bm), np.int64(n), np.float32(0.9), np.int32(0),
            )  # fmt: skip
            mod._warp_blocks("dgc_fused_update", index, n, args)

    return run


class _OneTensor(torch.nn.Module):
    """One n-element weight (2-D: DGC compresses matrices, not biases); its gradient is the input (a
    4n-byte write, alike with and without DGC)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.dot(self.w.view(-1), x)


def add_hook_cases(args: argparse.Namespace, cases: list[Case], impls: list[str]) -> None:
    """A training step (forward, backward, SGD step) of DDP at world size 1, plain and with the DGC hook
    (per kernel backend); the hook's codec is the difference of the medians (see :func:`hook_rows`)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dgc

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    n = args.numel
    xin = torch.randn(n, generator=torch.Generator().manual_seed(2))
    backends = {"fused": "auto", "twin": "torch"}
    for impl in ["ddp", *impls]:
        model = DDP(_OneTensor(n))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        if impl != "ddp":
            config = dgc.DGCConfig(density=args.density, dense_steps=0, backend=backends[impl])
            dgc.register(model, opt, config)

        def step(model=model, opt=opt) -> None:
            model(xin).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)

        cases.append(Case("DDP step", impl, 0.0, step, []))


def hook_rows(cases: list[Case], n: int, triad_bw: float, clone: float) -> list[Row]:
    """The hook's codec per step: DGC step minus plain DDP step (medians), 20n bytes."""
    steps = {c.impl: c for c in cases if c.kernel == "DDP step"}
    if "ddp" not in steps:
        return []
    base = statistics.median(steps["ddp"].times)
    rows = []
    for impl, c in steps.items():
        if impl == "ddp":
            continue
        codec = statistics.median(c.times) - base
        gbs = 20 * n / codec / 1e9 if codec > 0 else math.inf
        rows.append(Row("hook codec (DGC - DDP)", impl, codec * 1e3, math.nan, gbs, gbs * 1e9 / triad_bw,
                        codec / clone, None))  # fmt: skip
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"


def print_table(
    args: argparse.Namespace, device: torch.device, rows: list[Row], peak: float | None, triad_bw: float
) -> None:
    k = max(1, math.ceil(args.density * args.numel))
    print(f"# {device_name(device)}; numel={args.numel:,} density={args.density} k={k:,} wire={args.wire}; "
          f"median of {args.repeats} interleaved rounds; triad {triad_bw / 1e9:.1f} GB/s")  # fmt: skip
    if peak:
        print(f"# peak memory bandwidth {peak / 1e9:.0f} GB/s")
    print(f"{'kernel':24s} {'impl':6s} {'median ms':>10s} {'min ms':>9s} {'GB/s':>8s} {'of triad':>9s} "
          f"{'x clone':>8s}" + ("  of peak" if peak else ""))  # fmt: skip
    for r in rows:
        frac = f"  {r.peak_fraction:7.1%}" if r.peak_fraction is not None else ""
        print(f"{r.kernel:24s} {r.impl:6s} {r.median_ms:10.2f} {r.min_ms:9.2f} {r.gb_per_s:8.1f} "
              f"{r.of_triad:9.1%} {r.vs_clone:8.2f}{frac}")  # fmt: skip
    by = {(r.kernel, r.impl): r for r in rows}
    print("# goals (fraction of the triad's bandwidth):")
    if device.type == "cpu":
        for kernel, goal in (("hook codec (DGC - DDP)", 0.5), ("compress_step", 0.5), ("select_topk", 0.3),
                             ("int8 encode", 0.2), ("terngrad encode", 0.2), ("qsgd encode", 0.2)):
            for impl in ("fused", "twin"):
                if (kernel, impl) in by:
                    print(f"#   {kernel:24s} {impl:6s} {by[kernel, impl].of_triad:6.1%}  (>= {goal:.0%})")
        if ("dense_momentum", "fused") in by:
            fused, twin = by["dense_momentum", "fused"], by["dense_momentum", "twin"]
            print(f"#   dense_momentum twin / fused = {twin.median_ms / fused.median_ms:.2f}x "
                  f"(one pass moving 16n bytes against two moving 20n)")  # fmt: skip
    elif ("compress_step", "cupy") in by:
        twin, kern = by["compress_step", "twin"], by["compress_step", "cupy"]
        print(f"#   compress_step twin / kernel = {twin.median_ms / kern.median_ms:.1f}x  (>= 10)")
        fused = by["fused pass alone", "cupy"]
        if fused.peak_fraction is not None:
            print(f"#   fused pass {fused.peak_fraction:.1%} of peak; whole compress_step "
                  f"{kern.peak_fraction:.1%}  (>= 60%)")  # fmt: skip


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=25_000_000, help="elements of the tensor (default 25M)")
    p.add_argument("--density", type=float, default=0.001, help="k = ceil(density * numel)")
    p.add_argument("--repeats", type=int, default=9, help="interleaved rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave as is)")
    p.add_argument("--wire", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--world-size", type=int, default=8, help="workers' messages for scatter_unpack")
    p.add_argument("--hook", action="store_true", help="also time the DGC hook's codec (DDP, world size 1)")
    p.add_argument("--quant", action="store_true", help="also time the quantizers' encode/decode")
    p.add_argument("--only-quant", action="store_true",
                   help="the triad, x.clone() and the quantizers only (implies --quant)")
    p.add_argument("--only-dense", action="store_true",
                   help="the triad, x.clone() and the dense path's dense_momentum only")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cases = build_cases(args, device)
    if args.only_quant:
        cases = cases[:2]  # the triad and x.clone(), the yardsticks
    elif args.only_dense:
        cases = cases[:2] + [c for c in cases if c.kernel == "dense_momentum"]
    if args.quant or args.only_quant:
        add_quant_cases(args, cases, device)
    if args.hook and device.type == "cpu":
        add_hook_cases(args, cases, sorted({c.impl for c in cases} & {"fused", "twin"}))
    timer = _timer(device)
    for _ in range(args.warmup):
        for c in cases:
            c.fn()
    for _ in range(args.repeats):
        for c in cases:
            c.times.append(timer(c.fn))
    peak = peak_bandwidth(device)
    triad_bw = cases[0].bytes / statistics.median(cases[0].times)
    clone = statistics.median(cases[1].times)
    rows = []
    for c in cases:
        med = statistics.median(c.times)
        if c.kernel == "DDP step":
            print(f"# DDP step ({c.impl}): median {med * 1e3:.1f} ms")
            continue
        rows.append(Row(c.kernel, c.impl, med * 1e3, min(c.times) * 1e3, c.bytes / med / 1e9,
                        c.bytes / med / triad_bw, med / clone,
                        None if peak is None else c.bytes / med / peak))  # fmt: skip
    rows += hook_rows(cases, args.numel, triad_bw, clone)
    print_table(args, device, rows, peak, triad_bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(device), "args": vars(args), "triad_gb_per_s": triad_bw / 1e9,
                       "rows": [asdict(r) for r in rows]}, f, indent=1)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()

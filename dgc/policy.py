"""Sparse or dense, per group: ``DGCConfig(policy=...)`` and the cost model behind ``"auto"``.

Compression only pays where the link is slower than the codec.  DGC's allgather also grows with the
number of workers N (each receives N-1 messages) while a ring allreduce stays at about twice the dense
size, and during the warm-up (density 25%) a message is bigger than the gradient.  So with
``policy="auto"`` each group (a DDP bucket, a Horovod tensor) goes the way the cost model predicts faster:

    dense   t = 2 (N-1)/N * B / bw + 2 (N-1) * lat                      (ring allreduce of B bytes)
    sparse  t = (N-1) * M / bw + (N-1) * lat + codec                    (ring allgather of N messages of M bytes)

With ``hierarchy="node"`` (n nodes of L processes) on the DDP hook a sparse group sends this rank's
share message W (about M / L) across the nodes to its n - 1 peers only, then the node gathers what its
ranks got (Horovod: the sparse formula with W for M, one all-gather over all processes):

    node    t = (n-1) * W / bw + (n-1) * lat + (L-1) * n * W / bw_in + (L-1) * lat_in + codec

``bw`` and ``lat`` come from the run: every dense allreduce is a sample (bytes, seconds), fitted by
least squares; ``bw_in`` and ``lat_in`` likewise from the timed gathers inside the node (until one
ran, the inter-node link's: an upper bound); ``codec`` is the measured extra time of encoding and decoding the group sparsely (a short
probe of the selection on the group's size until the group has run sparse).  Rank 0 decides and
broadcasts one byte per group, so every rank takes the same decision; decisions are re-made every
``policy_interval`` steps and whenever the density changes, and logged on rank 0 with both predictions.
Switching keeps DGC's invariant: a group that goes dense sends all of v (momentum-corrected, as in the
dense warm-up steps); a group that goes sparse continues from its residual.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .state import DGCState

__all__ = ["LinkModel", "Policy", "Prediction", "SparseTerms", "gather_inside_s", "predict"]

log = logging.getLogger(__name__)

_SAMPLES = 64
"""Dense allreduce samples kept for the link fit (the most recent)."""


@dataclass(kw_only=True)
class LinkModel:
    """Bandwidth (bytes/s) and latency (s) of the collectives, fitted from timed dense allreduces."""

    samples: list[tuple[float, float]] = field(default_factory=list)
    """(bytes on the wire per worker, seconds) of recent dense allreduces."""

    def observe(self, wire_bytes: float, seconds: float) -> None:
        if seconds > 0 and wire_bytes > 0:
            self.samples.append((float(wire_bytes), float(seconds)))
            del self.samples[:-_SAMPLES]

    @property
    def measured(self) -> bool:
        return bool(self.samples)

    def fit(self) -> tuple[float, float]:
        """``(bandwidth, latency)``: least squares of seconds = latency + bytes / bandwidth; where the
        samples cannot separate the two (one size, or a negative slope), all time counts as bandwidth."""
        xs, ys = zip(*self.samples, strict=True)
        n = len(xs)
        mx, my = sum(xs) / n, sum(ys) / n
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
        lat = my - slope * mx
        if slope <= 0 or lat < 0:
            return sum(xs) / sum(ys), 0.0
        return 1.0 / slope, lat


@dataclass(kw_only=True, frozen=True)
class Prediction:
    """Predicted seconds of one group's step, both ways."""

    sparse: float
    dense: float

    @property
    def choose_sparse(self) -> bool:
        return self.sparse < self.dense


@dataclass(kw_only=True, frozen=True)
class SparseTerms:
    """What a group's sparse exchange costs besides the link: its message and who it goes to."""

    message_bytes: int
    """The message each worker sends (``hierarchy="node"``: the padded share message W)."""
    codec_s: float
    """Encoding plus decoding, seconds."""
    peers: int | None = None
    """Workers the message is gathered from over the link (None: all N; the node hierarchy: n nodes)."""
    inside_s: float = 0.0
    """The node hierarchy's gather inside the node (stage B), seconds."""


def predict(n: int, dense_bytes: int, message_bytes: int, codec_s: float, bw: float, lat: float,
            peers: int | None = None, inside_s: float = 0.0) -> Prediction:
    """The cost model of the module docstring, for one group on ``n`` workers whose sparse message
    goes around a ring of ``peers`` (default ``n``; the node hierarchy: the n nodes, plus
    ``inside_s`` for the gather inside the node)."""
    if n <= 1:
        return Prediction(sparse=codec_s, dense=0.0)
    ring = n if peers is None else peers
    dense = 2 * (n - 1) / n * dense_bytes / bw + 2 * (n - 1) * lat
    sparse = (ring - 1) * message_bytes / bw + (ring - 1) * lat + inside_s + codec_s
    return Prediction(sparse=sparse, dense=dense)


def gather_inside_s(n_nodes: int, local: int, share_bytes: float, bw: float, lat: float) -> float:
    """The node hierarchy's stage B: a ring all-gather inside a node of ``local`` processes of the
    ``n_nodes`` share messages each got (``(local-1) n W`` through each rank's link)."""
    return (local - 1) * (n_nodes * share_bytes / bw + lat)


class Policy:
    """Which groups go sparse: fixed (``"sparse"``/``"dense"``) or decided from measurements (``"auto"``)."""

    def __init__(self, mode: str, interval: int) -> None:
        self.mode = mode
        self.interval = interval
        self.link = LinkModel()
        self.inside = LinkModel()
        """``hierarchy="node"``: the node's gathers (stage B), timed where they run."""
        self.decisions: dict[tuple[str, ...], bool] = {}
        self.codec_seconds: dict[tuple[str, ...], float] = {}
        self._probed: dict[tuple[int, int], float] = {}
        self._decided_at: tuple[int, float] | None = None
        self.topology: Any = None
        """``hierarchy="node"``: the transport's :class:`~dgc.hierarchy.NodeTopology` (set when it is
        built): a sparse group then sends this rank's share of it, so predictions use the share's
        padded message and codec time."""

    def sparse(self, names: tuple[str, ...]) -> bool:
        """Whether the group goes sparse at the current step (when DGC's dense steps are over)."""
        if self.mode != "auto":
            return self.mode == "sparse"
        return self.decisions.get(names, False)

    # ------------------------------------------------------------------ measurements
    def observe_dense(self, payload_bytes: int, world_size: int, seconds: float) -> None:
        """A dense allreduce of ``payload_bytes`` took ``seconds`` (ring: 2 (N-1)/N of it per worker)."""
        if world_size > 1:
            self.link.observe(2 * (world_size - 1) / world_size * payload_bytes, seconds)

    def observe_inside(self, wire_bytes: int, seconds: float) -> None:
        """A gather inside the node put ``wire_bytes`` through this rank's link in ``seconds``."""
        self.inside.observe(wire_bytes, seconds)

    def observe_codec(self, names: tuple[str, ...], seconds: float) -> None:
        """Encoding plus decoding the group sparsely took ``seconds`` (beyond what dense costs)."""
        old = self.codec_seconds.get(names)
        self.codec_seconds[names] = seconds if old is None else 0.8 * old + 0.2 * seconds

    # ------------------------------------------------------------------ decisions
    def due(self, step: int, density: float) -> bool:
        """Whether ``"auto"`` decides at ``step`` (every ``interval`` steps, and when the density moved)."""
        if self.mode != "auto":
            return False
        last = self._decided_at
        return last is None or step - last[0] >= self.interval or density != last[1]

    def decide(self, state: DGCState, groups: Sequence[tuple[str, ...]], broadcast: Callable[[Tensor], None]) -> None:
        """Rank 0 predicts both ways for every group and broadcasts the choices (one byte per group)."""
        self._decided_at = (state.step, state.density)
        if not groups:
            return
        choice = torch.zeros(len(groups), dtype=torch.uint8)
        if state.rank == 0:
            choice = self._choose(state, groups)
        device = next(iter(state.memory.values())).residual.device
        flags = choice.to(device)
        broadcast(flags)
        self.decisions = {g: bool(f) for g, f in zip(groups, flags.tolist(), strict=True)}

    def _choose(self, state: DGCState, groups: Sequence[tuple[str, ...]]) -> Tensor:
        out = torch.zeros(len(groups), dtype=torch.uint8)
        if not self.link.measured:
            log.info("DGC policy (step %d): no link measurement yet, every group dense", state.step)
            return out
        bw, lat = self.link.fit()
        n = state.world_size
        for i, names in enumerate(groups):
            layout = state.codec.layout(names, sparse=True)
            if not layout.compressed:
                continue
            dense_bytes = 4 * sum(layout.numels)
            terms = self._sparse_terms(state, names, layout, bw, lat)
            pred = predict(n, dense_bytes, terms.message_bytes, terms.codec_s, bw, lat, terms.peers,
                           terms.inside_s)
            out[i] = pred.choose_sparse
            log.info(
                "DGC policy (step %d): [%s%s] -> %s (predicted sparse %.3f ms, dense %.3f ms; "
                "link %.3g Gbit/s, %.3g ms latency, %d workers)",
                state.step, ", ".join(names[:3]), " ..." if len(names) > 3 else "",
                "sparse" if pred.choose_sparse else "dense", 1e3 * pred.sparse, 1e3 * pred.dense,
                8 * bw / 1e9, 1e3 * lat, n,
            )
        return out

    def _sparse_terms(self, state: DGCState, names: tuple[str, ...], layout,  # noqa: ANN001
                      bw: float, lat: float) -> SparseTerms:
        """The group's message and codec seconds: the whole group's (flat), or, ``hierarchy="node"``,
        the largest share's message (every share is padded to it; element shards cut to balance the
        messages, :mod:`dgc.hierarchy_shards`) gathered across the n nodes, then inside the node (at
        the timed rate of those gathers, else at ``bw``, ``lat``; Horovod: over all processes), with the codec time of this rank's
        share (the dense intra-node reduce costs the same either way, so it leaves the choice alone)."""
        if self.topology is None:
            return SparseTerms(message_bytes=layout.message_bytes, codec_s=self._codec_cost(state, names, layout))
        topo = self.topology
        shares = topo.plan(state, layout)
        widest = max(shares, key=lambda s: s.message_bytes)
        mine = shares[topo.local_rank]
        measured = self.codec_seconds.get(mine.names)
        codec_s = measured if measured is not None else self._codec_cost(state, widest.names, widest)
        if not topo.two_stage:  # one all-gather over all processes
            return SparseTerms(message_bytes=widest.message_bytes, codec_s=codec_s)
        bw_in, lat_in = self.inside.fit() if self.inside.measured else (bw, lat)
        inside_s = gather_inside_s(topo.n_nodes, topo.local_size, widest.message_bytes, bw_in, lat_in)
        return SparseTerms(message_bytes=widest.message_bytes, codec_s=codec_s, peers=topo.n_nodes,
                           inside_s=inside_s)

    def _codec_cost(self, state: DGCState, names: tuple[str, ...], layout) -> float:  # noqa: ANN001
        """Measured sparse codec seconds of the group, else a probe of the selection on its size."""
        measured = self.codec_seconds.get(names)
        if measured is not None:
            return measured
        numel, k = sum(layout.numels), max(1, layout.pairs)
        key = (numel, k)
        if key not in self._probed:
            x = torch.randn(numel, device=next(iter(state.memory.values())).residual.device)
            kernels = state.kernels_for(x)
            t0 = time.perf_counter()
            kernels.select_topk(x, min(k, numel), sample_ratio=state.config.sample_ratio, offset=0)
            self._probed[key] = time.perf_counter() - t0
        # the selection dominates; the momentum pass costs the same on both paths
        return self._probed[key] * (1.0 + math.log2(max(2, state.world_size)) / 8)

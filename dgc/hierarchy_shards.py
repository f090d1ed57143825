"""Element shards of a bucket for ``hierarchy="node"``: where the bucket is cut between the local ranks.

Each of the ``L`` local ranks of a node owns one *contiguous element range* of every bucket (its share).
The cuts balance the share *messages*, not the elements: walking the bucket's tensors in bucket order,
each element weighs the bytes it puts in a message (a sparse tensor ``k / numel`` pairs of index plus
value bytes per element, a dense one its value bytes), and cut ``j`` falls where the running weight
reaches ``j / L`` of the total.  A cut inside a tensor splits it into *pieces* (:mod:`dgc.pieces`), each
DGC'd on its own.  A piece of a tensor that goes sparse selects its own top-k with a threshold sampled
from the piece, so no such piece is made below :data:`MIN_PIECE` elements (the cut moves to the
tensor's boundary).  A tensor on the dense path (biases, norms, anything below ``min_compress_numel``,
every tensor of a dense bucket) is cut at any element: its pieces just send their values.  Small dense
tensors carry much of a sparse message (at density 0.001 a dense element weighs 500 times a sparse
one: about half of ResNet-50's message), so cuts that could only fall between them would leave whole
per-mille of imbalance per bucket.

Whole tensors as shares (the earlier split) left the largest share's message at 0.509, 0.262 and 0.175
of the whole bucket's for ResNet-50 at 2, 4 and 8 ranks per node, and a one-tensor bucket with one busy
rank; element shards reach 1/L up to the per-message constants (header, block16 counts, padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .wire import BucketLayout

__all__ = ["MIN_PIECE", "ShareRange", "cut_bucket", "message_weights", "share_ranges"]

MIN_PIECE = 1024
"""Fewest elements of a piece of a split tensor (a cut closer to a tensor boundary moves onto it)."""


@dataclass(frozen=True, slots=True)
class ShareRange:
    """Elements ``start:stop`` of tensor ``index`` of the bucket layout, in one local rank's share."""

    index: int
    start: int
    stop: int


def message_weights(layout: BucketLayout) -> list[float]:
    """Bytes each tensor of ``layout`` puts in a message: its pairs (index and value bytes), or its
    dense entries' values."""
    pair = layout.index_bytes / max(1, layout.pairs) + layout.value_size
    return [k * pair if k else layout.dense_size(i) * layout.value_size for i, k in enumerate(layout.ks)]


def _cut_in(target: float, before: float, weight: float, numel: int, least: int) -> int:
    """Where, in elements of a tensor whose message weight spans ``before .. before + weight``, the cut
    at ``target`` falls, making no piece below ``least`` elements (0 or ``numel``: on a boundary)."""
    at = round((target - before) / weight * numel)
    if at < least:
        return 0
    return numel if numel - at < least else at


def cut_bucket(layout: BucketLayout, parts: int) -> list[int]:
    """The ``parts + 1`` cut positions (bucket positions, ascending, from the first tensor's offset to
    the end of the last): share ``j`` is ``cuts[j]:cuts[j + 1]``."""
    offsets, numels = layout.offsets, layout.numels
    first = offsets[0] if offsets else 0
    end = offsets[-1] + numels[-1] if offsets else 0
    weights = message_weights(layout)
    total = sum(weights)
    if total <= 0:  # nothing travels (all pruned): balance the elements
        weights, total = [float(n) for n in numels], float(sum(numels))
    cuts, before, i = [first], 0.0, 0
    for j in range(1, parts):
        target = total * j / parts
        while i < len(weights) and before + weights[i] <= target:
            before += weights[i]
            i += 1
        if i == len(weights):
            cut = end
        else:
            least = MIN_PIECE if layout.ks[i] else 1
            cut = offsets[i] + _cut_in(target, before, weights[i], numels[i], least)
            prev = cuts[-1]
            if offsets[i] < prev < cut < offsets[i] + numels[i] and cut - prev < least:
                cut = prev  # a sliver between two cuts in one tensor
        cuts.append(max(cut, cuts[-1]))
    cuts.append(end)
    return cuts


def share_ranges(layout: BucketLayout, cuts: Sequence[int]) -> list[list[ShareRange]]:
    """Per share, the tensors (whole or in part) that ``cuts`` give it, in bucket order.  A tensor of
    no elements goes with the share whose range starts at or before it."""
    out: list[list[ShareRange]] = [[] for _ in range(len(cuts) - 1)]
    for i, (off, numel) in enumerate(zip(layout.offsets, layout.numels, strict=True)):
        for j in range(len(out)):
            lo, hi = cuts[j], cuts[j + 1]
            if numel == 0:
                if lo <= off and (off < hi or j == len(out) - 1):
                    out[j].append(ShareRange(index=i, start=0, stop=0))
                    break
                continue
            if off < hi and off + numel > lo:
                out[j].append(ShareRange(index=i, start=max(lo, off) - off, stop=min(hi, off + numel) - off))
    return out

"""The interleaved benchmark's order: a balanced Latin square, so no method always runs right after the
same one (a heavy method, e.g. DGC at density 0.25, would otherwise slow only its successor)."""

from __future__ import annotations

from collections import Counter

import pytest

from dgc.bench.bandwidth.interleave import rotated


@pytest.mark.parametrize("count", [2, 3, 4, 5, 6])
def test_every_method_runs_everywhere_and_after_every_other_equally_often(count: int) -> None:
    period = count if count % 2 == 0 else 2 * count
    rows = [rotated(count, s) for s in range(period)]
    assert all(sorted(r) == list(range(count)) for r in rows)  # each method once per step
    places = Counter((m, i) for r in rows for i, m in enumerate(r))
    assert set(places.values()) == {period // count}  # every place equally often
    pairs = Counter(p for r in rows for p in zip(r, r[1:], strict=False))
    assert len(pairs) == count * (count - 1) and len(set(pairs.values())) == 1, pairs


def test_the_plain_rotation_would_not_do_and_edges() -> None:
    # a rotation puts method 2 right before method 3 in three steps of four: the square never repeats it
    assert sum((2, 3) in set(zip(r, r[1:], strict=False)) for r in (rotated(4, s) for s in range(4))) == 1
    assert rotated(4, 1) == rotated(4, 5)  # the same order on every rank, step by step
    assert rotated(1, 7) == [0]
    assert rotated(0, 3) == []

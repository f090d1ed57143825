"""One-shot and AGP schedules against their formulas."""

from __future__ import annotations

import pytest

from dgc.pruning import AGP, OneShot


def agp_formula(t: int, s_i: float, s_f: float, t0: int, dt: int, n: int) -> float:
    """Zhu & Gupta: s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3 at update steps."""
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


@pytest.mark.parametrize("s_i,s_f,t0,dt,n", [(0.0, 0.9, 0, 10, 10), (0.2, 0.75, 35, 7, 5)])
def test_agp_matches_formula_at_update_steps_and_holds_between(s_i, s_f, t0, dt, n):
    sched = AGP(sparsity=s_f, initial_sparsity=s_i, start_step=t0, end_step=t0 + n * dt,
                frequency=dt)
    for t in range(0, t0):
        assert sched.sparsity_at(t) == 0.0
    for k in range(n + 1):
        t = t0 + k * dt
        assert sched.sparsity_at(t) == pytest.approx(agp_formula(t, s_i, s_f, t0, dt, n), abs=1e-12)
        if k < n:
            for between in range(t + 1, t + dt):
                assert sched.sparsity_at(between) == sched.sparsity_at(t)
    assert sched.sparsity_at(t0) == pytest.approx(s_i)
    assert sched.sparsity_at(t0 + n * dt + 1000) == s_f
    values = [sched.sparsity_at(t) for t in range(t0, t0 + n * dt + 1)]
    assert values == sorted(values)  # nondecreasing
    # Cubic: the first interval prunes more than the last.
    first = sched.sparsity_at(t0 + dt) - sched.sparsity_at(t0)
    last = sched.sparsity_at(t0 + n * dt) - sched.sparsity_at(t0 + (n - 1) * dt)
    assert first > last > 0


def test_agp_fractions_resolve_against_total_steps():
    sched = AGP(sparsity=0.8, start_step=0.1, end_step=0.5, frequency=10)
    with pytest.raises(ValueError, match="total_steps"):
        sched.sparsity_at(0)
    r = sched.resolve(1000)
    assert (r.start_step, r.end_step) == (100, 500)
    assert r.sparsity_at(99) == 0.0
    assert r.sparsity_at(500) == 0.8
    assert r.sparsity_at(300) == pytest.approx(agp_formula(300, 0.0, 0.8, 100, 10, 40))


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": 0.5, "initial_sparsity": 0.6}, "initial_sparsity"),
    ({"frequency": 0}, "frequency"),
    ({"start_step": 10, "end_step": 10}, "end_step"),
    ({"end_step": 1.5}, "fraction"),
])
def test_agp_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AGP(**kwargs).resolve(100)


def test_oneshot():
    s = OneShot(sparsity=0.7, at_step=5)
    assert [s.sparsity_at(t) for t in (0, 4, 5, 6, 10**6)] == [0, 0, 0.7, 0.7, 0.7]
    assert OneShot(sparsity=0.5, at_step=0.25).resolve(40).at_step == 10
    with pytest.raises(ValueError, match="sparsity"):
        OneShot(sparsity=-0.1)

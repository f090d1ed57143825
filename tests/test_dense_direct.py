"""The dense path's direct form: while v is known to be zero, a dense tensor's payload is ``u / N`` in two
passes and v is never touched.  It must send the same values as the five-pass form, keep the invariant
(what was delivered plus what v holds equals everything momentum-corrected), and give a failed step's
payload back to v.  N workers are simulated by N states in one process; the "allreduce" is a sum."""

from __future__ import annotations

import torch
import torch.nn as nn

import dgc

N = 3
SHAPES = {"a": (64, 32), "b": (40,)}


def _states(**cfg) -> list[dgc.DGCState]:
    config = dgc.DGCConfig(dense_steps=0, min_compress_numel=1, **cfg)
    return [
        dgc.DGCState(config, [(n, nn.Parameter(torch.zeros(s))) for n, s in SHAPES.items()])
        for _ in range(N)
    ]


def _grads(step: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    numel = sum(torch.Size(s).numel() for s in SHAPES.values())
    return [torch.randn(numel, generator=gen).to(dtype) for _ in range(N)]


def _step(states, grads, *, sparse: bool = False, fail: bool = False):
    """One step of every worker: encode (dense payload divided by N, or sparse pairs), sum, decode,
    then commit (or undo when ``fail``).  Returns the sends and the average every worker decoded."""
    sends = []
    for s, g in zip(states, grads, strict=True):
        layout = s.codec.layout(tuple(SHAPES), sparse=sparse)
        sends.append(s.codec.encode(layout, g, divide=N))
    received = torch.cat([x.message for x in sends]) if sparse else sum(x.payload.clone() for x in sends)
    for s, x in zip(states, sends, strict=True):
        assert s.codec.decode(x, received.clone()) is None
        (x.undo if fail else x.commit)(s)
        s.end_step(failed=fail)
    out = sends[0].buffer.clone()
    return sends, out


def _u(state: dgc.DGCState) -> torch.Tensor:
    return torch.cat([state.memory[n].momentum for n in SHAPES])


def _v(state: dgc.DGCState) -> torch.Tensor:
    return torch.cat([state.memory[n].residual for n in SHAPES])


def test_direct_path_sends_the_momentum_corrected_average_and_leaves_v_zero():
    states = _states(momentum=0.9)
    u_ref = [torch.zeros(sum(torch.Size(s).numel() for s in SHAPES.values())) for _ in range(N)]
    for step in range(4):
        grads = _grads(step)
        for i in range(N):
            u_ref[i] = grads[i] + 0.9 * u_ref[i]
        expect = sum(u / N for u in u_ref)
        sends, out = _step(states, [g.clone() for g in grads])
        # the first step cannot know v is zero (it was never cleared); every later one can
        assert all(x.direct == ((step > 0),) * len(SHAPES) for x in sends), [x.direct for x in sends]
        torch.testing.assert_close(out, expect, rtol=0, atol=1e-6)
        for s, u in zip(states, u_ref, strict=True):
            torch.testing.assert_close(_u(s), u, rtol=0, atol=1e-6)
            assert not _v(s).any()


def test_direct_and_five_pass_forms_send_the_same_bits():
    fast, slow = _states(momentum=0.9), _states(momentum=0.9)
    for step in range(3):
        grads = _grads(step)
        for s in slow:  # forget that v is zero: the five-pass form every time
            for mem in s.memory.values():
                mem.zero_mark = None
        f_sends, f_out = _step(fast, [g.clone() for g in grads])
        s_sends, s_out = _step(slow, [g.clone() for g in grads])
        assert not any(any(x.direct) for x in s_sends)
        assert torch.equal(f_out, s_out)
        for a, b in zip(fast, slow, strict=True):
            assert torch.equal(_u(a), _u(b)) and torch.equal(_v(a), _v(b))


def test_failed_direct_step_keeps_its_payload_in_v_and_sends_it_next():
    states = _states(momentum=0.9)
    _step(states, _grads(0))  # five-pass; clears v and marks it zero
    u_before = [_u(s).clone() for s in states]
    g1 = _grads(1)
    sends, _ = _step(states, [g.clone() for g in g1], fail=True)
    assert all(all(x.direct) for x in sends)
    for s, u0, g in zip(states, u_before, g1, strict=True):
        u1 = g + 0.9 * u0
        torch.testing.assert_close(_u(s), u1, rtol=0, atol=1e-6)
        assert torch.equal(_v(s), _u(s))  # nothing lost: v holds the undelivered payload exactly
    g2 = _grads(2)
    sends, out = _step(states, [g.clone() for g in g2])
    assert not any(any(x.direct) for x in sends)  # v is not zero: the five-pass form sends it whole
    expect = sum(
        (g2[i] + 0.9 * _u_after(u_before[i], g1[i])) / N + _u_after(u_before[i], g1[i]) / N for i in range(N)
    )
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-6)
    assert all(not _v(s).any() for s in states)


def _u_after(u0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return g + 0.9 * u0


def test_sparse_step_ends_the_known_zero_and_the_next_dense_step_sends_v_whole():
    states = _states(momentum=0.9, density=0.05)
    _step(states, _grads(0))
    _step(states, _grads(1))  # direct
    _step(states, _grads(2), sparse=True)  # leaves residuals
    assert all(_v(s).any() for s in states)
    v_left = [_v(s).clone() for s in states]
    u_left = [_u(s).clone() for s in states]
    g3 = _grads(3)
    sends, out = _step(states, [g.clone() for g in g3])
    # "a" went sparse and holds a residual: sent whole by the five-pass form; "b" (a vector) was dense
    assert all(x.direct == (False, True) for x in sends)
    expect = sum((v_left[i] + g3[i] + 0.9 * u_left[i]) / N for i in range(N))
    torch.testing.assert_close(out, expect, rtol=1e-6, atol=1e-6)


def test_direct_path_is_not_taken_where_it_would_change_what_is_sent():
    cases = {
        "nesterov": ({"momentum": 0.9, "nesterov": True}, torch.float32),
        "no momentum": ({"momentum": 0.0}, torch.float32),
        "bfloat16 gradients": ({"momentum": 0.9}, torch.bfloat16),
    }
    for why, (cfg, dtype) in cases.items():
        states = _states(**cfg)
        for step in range(3):
            sends, _ = _step(states, _grads(step, dtype))
            assert not any(any(x.direct) for x in sends), why


def test_tracked_payload_is_noted_undivided():
    states = _states(momentum=0.9)
    _step(states, _grads(0))
    g = _grads(1)
    s = states[0]
    send = s.codec.encode(s.codec.layout(tuple(SHAPES), sparse=False), g[0].clone(), track=True, divide=N)
    assert all(send.direct)
    noted = torch.cat([p.values.reshape(-1) for p in send.parts])
    torch.testing.assert_close(noted, _u(s), rtol=0, atol=0)
    torch.testing.assert_close(send.payload, _u(s) / N, rtol=0, atol=0)


def test_a_non_finite_worker_fails_the_dense_step_for_everyone_and_loses_nothing():
    """Its payload carries NaN in element 0 (the sentinel): every worker's decode sees it in the sum
    without a pass over the bucket; the finite workers keep their undelivered payload in v, the
    non-finite one's state is untouched."""
    states = _states(momentum=0.9)
    _step(states, _grads(0))  # five-pass; v cleared and known zero from here
    u_before = [_u(s).clone() for s in states]
    grads = _grads(1)
    grads[1][5] = float("inf")  # worker 1 only, away from element 0
    sends = [s.codec.encode(s.codec.layout(tuple(SHAPES), sparse=False), g.clone(), divide=N)
             for s, g in zip(states, grads, strict=True)]
    assert not sends[1].finite and torch.isnan(sends[1].payload[0])
    total = sum(x.payload.clone() for x in sends)
    for s, x in zip(states, sends, strict=True):
        assert s.codec.decode(x, total.clone()) == "a worker"
        x.undo(s)
        s.end_step(failed=True)
    assert torch.equal(_u(states[1]), u_before[1]) and not _v(states[1]).any()
    for i in (0, 2):
        assert torch.equal(_v(states[i]), _u(states[i]))  # the payload waits in v, nothing lost
        assert not torch.equal(_u(states[i]), u_before[i])

"""The optimizer rules: momentum and weight decay are applied exactly once."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dgc


def _params():
    return [nn.Parameter(torch.zeros(4, 4))]


@pytest.mark.parametrize(
    ("opt", "cfg", "match"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), dgc.DGCConfig(), "momentum would be applied twice"),
        (lambda p: torch.optim.Adam(p), dgc.DGCConfig(), "momentum=0"),
        (
            lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-4),
            dgc.DGCConfig(weight_decay=1e-4),
            "weight decay would be applied twice",
        ),
    ],
)
def test_check_optimizer_rejects_double_application(opt, cfg, match):
    with pytest.raises(ValueError, match=match):
        dgc.check_optimizer(opt(_params()), cfg)


@pytest.mark.parametrize(
    ("opt", "cfg"),
    [
        (lambda p: dgc.DGCSGD(p, lr=0.1), dgc.DGCConfig()),
        (lambda p: dgc.DGCSGD(p, lr=0.1, weight_decay=1e-4), dgc.DGCConfig()),
        (lambda p: torch.optim.Adam(p), dgc.DGCConfig(momentum=0.0)),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), dgc.DGCConfig(momentum=0.0)),
    ],
)
def test_check_optimizer_accepts_valid(opt, cfg):
    dgc.check_optimizer(opt(_params()), cfg)


def test_dgcsgd_has_no_momentum():
    opt = dgc.DGCSGD(_params(), lr=0.1)
    assert opt.param_groups[0]["momentum"] == 0.0
    with pytest.raises(ValueError, match="momentum must be 0"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "momentum": 0.9})


def test_register_needs_ddp():
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        dgc.register(nn.Linear(2, 2), None)


# ---------------------------------------------------------------- weight decay placements
def _official_dgcsgd(p0, grads, lr, wd, m, nesterov=False):
    """The update of the official DGC code's optimizer (Lin et al., dgc/optim/sgd.py), transcribed:
    weight decay uncompressed, with its own momentum buffer; the gradient applied as is."""
    p, buf = p0.clone(), None
    for g in grads:
        d_p = wd * p
        if buf is None:
            buf = d_p
        else:
            buf = buf * m + d_p
        d_p = d_p + m * buf if nesterov else buf
        p = p - lr * (d_p + g)
    return p


def _run(opt_factory, p0, grads):
    p = nn.Parameter(p0.clone())
    opt = opt_factory([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("nesterov", [False, True])
def test_decay_momentum_is_the_official_placement_over_20_steps(nesterov):
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(64, 32, generator=gen)
    grads = [0.1 * torch.randn(64, 32, generator=gen) for _ in range(20)]
    lr, wd, m = 0.1, 5e-2, 0.9
    ours = _run(lambda ps: dgc.DGCSGD(ps, lr=lr, weight_decay=wd, decay_momentum=m,
                                      decay_nesterov=nesterov), p0, grads)
    official = _official_dgcsgd(p0, grads, lr, wd, m, nesterov)
    torch.testing.assert_close(ours, official, rtol=1e-6, atol=1e-6)
    # the placement without momentum is a different algorithm: its decay term is several times smaller
    plain = _run(lambda ps: dgc.DGCSGD(ps, lr=lr, weight_decay=wd), p0, grads)
    no_decay = _run(lambda ps: dgc.DGCSGD(ps, lr=lr), p0, grads)
    ratio = (official - no_decay).norm() / (plain - no_decay).norm()
    assert ratio > 3, ratio


def test_plain_weight_decay_is_torch_sgd_without_momentum():
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(16, 8, generator=gen)
    grads = [torch.randn(16, 8, generator=gen) for _ in range(5)]
    ours = _run(lambda ps: dgc.DGCSGD(ps, lr=0.1, weight_decay=1e-2), p0, grads)
    ref = _run(lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=1e-2), p0, grads)
    assert torch.equal(ours, ref)


def test_decay_buffer_is_checkpointed_and_per_group():
    gen = torch.Generator().manual_seed(2)
    w, b = nn.Parameter(torch.randn(8, 4, generator=gen)), nn.Parameter(torch.randn(4, generator=gen))
    grads = [(torch.randn(8, 4, generator=gen), torch.randn(4, generator=gen)) for _ in range(6)]

    def make(params):
        return dgc.DGCSGD([{"params": [params[0]]}, {"params": [params[1]], "weight_decay": 0.0}],
                          lr=0.1, weight_decay=1e-2, decay_momentum=0.9)

    def steps(opt, ps, gs):
        for gw, gb in gs:
            ps[0].grad, ps[1].grad = gw.clone(), gb.clone()
            opt.step()

    full = [nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())]
    steps(make(full), full, grads)
    half = [nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())]
    first = make(half)
    steps(first, half, grads[:3])
    assert set(first.state[half[0]]) == {"decay_buffer"} and "decay_buffer" not in first.state[half[1]]
    resumed = make(half)
    resumed.load_state_dict(first.state_dict())
    steps(resumed, half, grads[3:])
    assert torch.equal(half[0], full[0]) and torch.equal(half[1], full[1])
    # the bias group (weight_decay 0) took plain gradient steps
    torch.testing.assert_close(full[1].detach(), b - 0.1 * sum(g for _, g in grads))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay_momentum": 1.0}, "decay_momentum = 1.0 is invalid"),
        ({"decay_momentum": -0.1}, "decay_momentum = -0.1 is invalid"),
        ({"decay_momentum": True}, "decay_momentum = True is invalid"),
        ({"decay_nesterov": True}, "True needs decay_momentum > 0"),
    ],
)
def test_decay_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dgc.DGCSGD(_params(), lr=0.1, weight_decay=1e-4, **kwargs)

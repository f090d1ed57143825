"""dgc.reshard_state_dicts: N workers' DGC states -> M, what is owed to the model unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dgc
from tests._dist import run_distributed

CONFIG = dict(density=0.05, momentum=0.9, dense_steps=0, min_compress_numel=1)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _old_states(n: int, steps: int = 3, **cfg) -> list[dict]:
    """The state_dicts of ``n`` simulated workers after ``steps`` compression steps on different
    gradients (residuals and momenta differ per worker), labelled as ranks of an n-worker run."""
    config = dgc.DGCConfig(**{**CONFIG, **cfg})
    model = _model()
    states = [dgc.DGCState(config, model.named_parameters()) for _ in range(n)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for s in states:
            for name, p in model.named_parameters():
                grad = torch.randn(p.shape, generator=gen)
                if s.is_compressed(name):
                    s.compress(name, grad, param=p)
                else:
                    s.compress_dense(name, grad, param=p)
                    s.finish_dense(name, torch.float32)
            s.end_step()
    out = []
    for rank, s in enumerate(states):
        sd = s.state_dict()
        sd.update(world_size=n, rank=rank)
        out.append(sd)
    return out


def _mean(sds: list[dict], name: str, key: str) -> torch.Tensor:
    return sum(sd[name][key].double() for sd in sds) / len(sds)


def _params(sd: dict) -> list[str]:
    return [k for k, v in sd.items() if isinstance(v, dict) and "residual" in v]


@pytest.mark.parametrize("new", [1, 3])
def test_mean_residual_and_momentum_are_kept(new):
    old = _old_states(2)
    assert not torch.equal(old[0]["0.weight"]["residual"], old[1]["0.weight"]["residual"])
    resharded = dgc.reshard_state_dicts(old, new)
    assert [sd["rank"] for sd in resharded] == list(range(new))
    assert all(sd["world_size"] == new for sd in resharded)
    assert all(sd["step"] == old[0]["step"] == 3 for sd in resharded)
    assert all(sd["config"] == old[0]["config"] for sd in resharded)
    names = _params(old[0])
    assert _params(resharded[0]) == names
    for name in names:
        for key in ("residual", "momentum"):
            before, after = _mean(old, name, key), _mean(resharded, name, key)
            if key == "momentum" or name.endswith("weight"):  # dense biases send all they hold
                assert before.abs().sum() > 0, (name, key)
            torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-7)
            assert all(sd[name][key].dtype == torch.float32 for sd in resharded)
    # every new rank owns its tensors (loading one must not alias another)
    if new > 1:
        resharded[0]["0.weight"]["residual"].add_(1.0)
        assert not torch.equal(resharded[0]["0.weight"]["residual"],
                               resharded[1]["0.weight"]["residual"])


def test_two_to_one_loads_into_a_single_worker_state():
    old = _old_states(2)
    (sd,) = dgc.reshard_state_dicts(old, 1)
    state = dgc.DGCState(dgc.DGCConfig(**CONFIG), _model().named_parameters())
    state.load_state_dict(sd)
    assert state.step == 3
    for name in _params(old[0]):
        torch.testing.assert_close(state.memory[name].residual.double(),
                                   _mean(old, name, "residual").reshape(-1), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state.memory[name].momentum.double(),
                                   _mean(old, name, "momentum").reshape(-1), rtol=1e-6, atol=1e-7)


def _load_on_rank(rank: int, world_size: int, resharded: list[dict]) -> dict:
    state = dgc.DGCState(dgc.DGCConfig(**CONFIG), _model().named_parameters())
    state.load_state_dict(resharded[rank])
    return {"step": state.step, "residual": {n: m.residual.clone() for n, m in state.memory.items()},
            "momentum": {n: m.momentum.clone() for n, m in state.memory.items()}}


@pytest.mark.timeout(180)
def test_two_to_three_loads_on_a_real_three_rank_group():
    old = _old_states(2)
    resharded = dgc.reshard_state_dicts(old, 3)
    loaded = run_distributed(_load_on_rank, 3, resharded, timeout=150)
    for name in _params(old[0]):
        for key in ("residual", "momentum"):
            mean = sum(r[key][name].double() for r in loaded) / 3
            torch.testing.assert_close(mean, _mean(old, name, key).reshape(-1), rtol=1e-6, atol=1e-7)
    assert [r["step"] for r in loaded] == [3, 3, 3]


def test_masks_are_kept_and_must_agree():
    old = _old_states(2)
    mask = torch.rand(old[0]["0.weight"]["residual"].shape) > 0.5
    for sd in old:
        sd["0.weight"]["mask"] = mask.clone()
    new = dgc.reshard_state_dicts(old, 3)
    assert all(torch.equal(sd["0.weight"]["mask"], mask) for sd in new)
    old[1]["0.weight"]["mask"] = ~mask
    with pytest.raises(ValueError, match="mask of '0.weight' differs"):
        dgc.reshard_state_dicts(old, 3)


def test_momentum_off_is_kept_off():
    old = _old_states(2, momentum=0.0)
    (sd,) = dgc.reshard_state_dicts(old, 1)
    assert sd["0.weight"]["momentum"] is None
    torch.testing.assert_close(sd["0.weight"]["residual"].double(), _mean(old, "0.weight", "residual"))


def test_mixed_steps_are_refused():
    old = _old_states(2)
    old[1]["step"] = 2
    with pytest.raises(ValueError, match=r"disagree on step: rank 0 has 3, rank 1 has 2"):
        dgc.reshard_state_dicts(old, 1)


def test_mixed_configs_are_refused_naming_the_field():
    old = _old_states(2)
    old[1]["config"] = {**old[1]["config"], "density": 0.01}
    with pytest.raises(ValueError, match=r"disagree on config\.density: rank 0 has 0\.05, rank 1 has 0\.01"):
        dgc.reshard_state_dicts(old, 3)


def test_missing_ranks_are_refused():
    old = _old_states(3)
    with pytest.raises(ValueError, match="saved by a run of 3 workers but 2 states"):
        dgc.reshard_state_dicts(old[:2], 1)
    old[2]["rank"] = 5
    with pytest.raises(ValueError, match=r"ranks \[2\] of the 3-worker run are missing"):
        dgc.reshard_state_dicts(old, 1)


def test_duplicate_ranks_are_refused():
    old = _old_states(2)
    old[1]["rank"] = 0
    with pytest.raises(ValueError, match="rank 0 appears twice"):
        dgc.reshard_state_dicts(old, 2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_world_size_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="world_size = .* must be an integer >= 1"):
        dgc.reshard_state_dicts(_old_states(2, steps=1), bad)


@pytest.mark.parametrize("bad", [[], {}, [{"step": 0}]])
def test_not_state_dicts_are_refused(bad):
    with pytest.raises(ValueError, match="reshard_state_dicts: state_dicts"):
        dgc.reshard_state_dicts(bad, 1)


def test_different_models_are_refused():
    old = _old_states(2)
    del old[1]["2.bias"]
    with pytest.raises(ValueError, match="track different parameters"):
        dgc.reshard_state_dicts(old, 1)

"""DGCConfig validation and the density schedule."""

from __future__ import annotations

import math

import pytest
import torch

import dgc


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("density", 0.0),
        ("density", 1.5),
        ("density", -0.1),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("sample_ratio", 0.0),
        ("sample_ratio", 2.0),
        ("warmup_steps", -1),
        ("warmup_steps", 1.5),
        ("warmup_stages", 0),
        ("dense_steps", -1),
        ("clip_norm", 0.0),
        ("clip_norm", float("inf")),
        ("min_compress_numel", 0),
        ("weight_decay", -1e-4),
        ("value_dtype", "int4"),
        ("value_dtype", torch.float64),
        ("nonfinite", "ignore"),
        ("backend", "triton"),
        ("node_reduce", "nccl"),
        ("density", "0.1"),  # a string from a config file
        ("density", True),  # a bool is not a number here
        ("density", float("nan")),
        ("momentum", None),
        ("clip_norm", "1"),
        ("nesterov", "yes"),
        ("momentum_masking", None),
        ("check_finite", 1),
        ("seed", 1.5),
        ("log_every", "100"),
    ],
)
def test_invalid_field_names_itself(field, value):
    with pytest.raises(ValueError, match=rf"DGCConfig\.{field}"):
        dgc.DGCConfig(**{field: value})


def test_warmup_initial_density_checked_only_with_warmup():
    dgc.DGCConfig(density=0.5)  # no warm-up: the 0.25 default is irrelevant
    with pytest.raises(ValueError, match="warmup_initial_density"):
        dgc.DGCConfig(density=0.5, warmup_steps=10)


def test_defaults_are_the_papers():
    c = dgc.DGCConfig()
    assert (c.density, c.momentum, c.sample_ratio, c.momentum_masking) == (0.001, 0.9, 0.01, True)
    assert c.dense_steps >= 2
    assert c.wire_dtype == torch.float32
    assert dgc.DGCConfig(value_dtype=torch.bfloat16).value_dtype == "bfloat16"


def test_density_schedule_matches_paper_warmup():
    c = dgc.DGCConfig(density=0.001, warmup_steps=8, dense_steps=2)
    got = [c.density_at(s) for s in range(12)]
    assert got[:2] == [1.0, 1.0]
    stages = [0.25, 0.25 * 0.004**0.25, 0.25 * 0.004**0.5, 0.25 * 0.004**0.75]
    for i, want in enumerate(stages):
        assert got[2 + 2 * i] == pytest.approx(want) and got[3 + 2 * i] == pytest.approx(want)
    assert got[10:] == [0.001, 0.001]
    # The paper's list: 25%, 6.25%, 1.5625%, 0.4%, 0.1%
    assert [round(x, 3) for x in stages] == [0.25, 0.063, 0.016, 0.004]


def test_no_warmup_no_dense():
    c = dgc.DGCConfig(density=0.01, dense_steps=0)
    assert c.density_at(0) == 0.01


def test_k_is_ceil_of_density_times_live():
    st = dgc.DGCState(dgc.DGCConfig(density=0.001, dense_steps=0), [("w", torch.nn.Parameter(torch.zeros(300, 301)))])
    assert st.k_for("w") == math.ceil(0.001 * 300 * 301)


def test_node_hierarchy_without_nodes_is_refused_with_the_fix(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    params = [("w", torch.nn.Parameter(torch.zeros(4, 4)))]
    with pytest.raises(ValueError, match="node_groups"):
        dgc.DGCState(dgc.DGCConfig(hierarchy="node"), params)
    dgc.DGCState(dgc.DGCConfig(hierarchy="node"), params, node_groups=[[0]])  # explicit nodes: fine
    with pytest.raises(ValueError, match="policy"):
        dgc.DGCConfig(policy="fastest")
    with pytest.raises(ValueError, match="policy_interval"):
        dgc.DGCConfig(policy_interval=0)

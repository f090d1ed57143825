"""``policy="auto"``'s cost model in one process: the link fit, the choice, and its node-aware form
(``hierarchy="node"`` sends this rank's share of a group, so the prediction uses the share's message)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import dgc
from dgc.hierarchy import NodeTopology
from dgc.policy import LinkModel, predict

NAMES = ("l0.weight", "l1.weight", "l2.weight", "l3.weight")


class _World(dgc.DGCState):
    """A state that reports ``n`` workers to the cost model (no process group needed to predict)."""

    n = 8

    @property
    def world_size(self) -> int:
        return self.n


def _state(world: int = 8, density: float = 0.01) -> dgc.DGCState:
    state = _World(
        dgc.DGCConfig(dense_steps=0, min_compress_numel=1, density=density, policy="auto"),
        [(n, nn.Parameter(torch.zeros(256, 256))) for n in NAMES],
    )
    state.n = world
    return state


def _link(state: dgc.DGCState, bytes_per_s: float, latency_s: float = 1e-4) -> None:
    for size in (1e5, 1e6, 1e7):
        state.policy.link.observe(size, latency_s + size / bytes_per_s)


def test_link_fit_recovers_bandwidth_and_latency():
    link = LinkModel()
    for size in (1e4, 1e5, 1e6, 4e6):
        link.observe(size, 2e-4 + size / 1.25e8)
    bw, lat = link.fit()
    assert bw == pytest.approx(1.25e8, rel=1e-6) and lat == pytest.approx(2e-4, rel=1e-6)


def test_no_measurement_means_dense_and_says_so(caplog):
    state = _state()
    with caplog.at_level(logging.INFO, logger="dgc.policy"):
        choice = state.policy._choose(state, [NAMES])
    assert choice.tolist() == [0]
    assert "no link measurement yet" in caplog.text


def test_slow_link_goes_sparse_fast_link_goes_dense():
    for bw, sparse in ((1.25e8, True), (1e12, False)):  # 1 Gbit/s; a link faster than any codec
        state = _state()
        state.policy.codec_seconds[NAMES] = 1e-3
        _link(state, bw)
        assert bool(state.policy._choose(state, [NAMES])[0]) is sparse, bw


def _node_topology(world: int, local: int, two_stage: bool = False) -> NodeTopology:
    nodes = [list(range(s, s + local)) for s in range(0, world, local)]
    return NodeTopology(nodes=nodes, node=0, local_rank=0, two_stage=two_stage)


def test_node_hierarchy_predicts_with_the_widest_share():
    state = _state(world=8)
    layout = state.codec.layout(NAMES, sparse=True)
    flat_bytes = state.policy._sparse_terms(state, NAMES, layout, 1e8, 1e-4).message_bytes
    assert flat_bytes == layout.message_bytes
    state.policy.topology = _node_topology(8, 2)
    shares = state.policy.topology.plan(state, layout)
    node_bytes = state.policy._sparse_terms(state, NAMES, layout, 1e8, 1e-4).message_bytes
    assert node_bytes == max(s.message_bytes for s in shares)
    assert node_bytes <= 0.5 * flat_bytes + 16  # half the pairs each (a message's constants aside)


def test_node_hierarchy_can_turn_a_dense_choice_sparse():
    """At density 0.3 on 8 workers a whole message costs more than a ring allreduce of the group (7 M
    vs 1.75 B on the wire), half of it less: only the node-aware model sees that the share goes sparse."""
    for topology, sparse in ((None, False), (_node_topology(8, 2), True)):
        state = _state(world=8, density=0.3)
        state.policy.topology = topology
        layout = state.codec.layout(NAMES, sparse=True)
        mine = NAMES if topology is None else topology.plan(state, layout)[0].names
        sent = state.policy._sparse_terms(state, NAMES, layout, 1e8, 1e-4).message_bytes
        assert (7 * sent < 1.75 * 4 * sum(layout.numels)) is sparse  # the premise
        state.policy.codec_seconds[mine] = 1e-6
        _link(state, 1.25e8, 1e-6)
        assert bool(state.policy._choose(state, [NAMES])[0]) is sparse, topology


def _two_nodes_of_four():  # noqa: ANN202
    """8 workers in 2 nodes of 4 exchanging in two stages: the state, topology, group layout and the
    widest share message W."""
    state = _state(world=8, density=0.05)
    topo = _node_topology(8, 4, two_stage=True)
    state.policy.topology = topo
    layout = state.codec.layout(NAMES, sparse=True)
    return state, topo, layout, max(s.message_bytes for s in topo.plan(state, layout))


def test_node_prediction_is_the_cross_ring_plus_the_gather_inside():
    """8 workers, 2 nodes of 4: the share message W goes to the other node only ((n-1) W on the link),
    then the node gathers the n W each rank got, at the timed rate inside the node once measured (at
    the link's before: an upper bound)."""
    state, topo, layout, width = _two_nodes_of_four()
    bw, lat = 1.25e8, 1e-4
    terms = state.policy._sparse_terms(state, NAMES, layout, bw, lat)
    assert (terms.message_bytes, terms.peers) == (width, 2)
    assert terms.inside_s == pytest.approx(3 * (2 * width / bw + lat))  # unmeasured: the link's rate
    for size in (1e4, 1e5, 1e6):
        state.policy.observe_inside(size, 1e-5 + size / 1e10)
    terms = state.policy._sparse_terms(state, NAMES, layout, bw, lat)
    assert terms.inside_s == pytest.approx(3 * (2 * width / 1e10 + 1e-5))
    pred = predict(8, 1000, width, 0.0, bw, lat, terms.peers, terms.inside_s)
    assert pred.sparse == pytest.approx(width / bw + lat + terms.inside_s)
    topo.two_stage = False  # Horovod: one all-gather over all processes
    terms = state.policy._sparse_terms(state, NAMES, layout, bw, lat)
    assert (terms.peers, terms.inside_s) == (None, 0.0)


def test_a_fast_node_turns_the_node_choice_sparse():
    """The same group with the gather inside the node unmeasured (7 W at the link's rate: dense wins) and
    timed at 100x the link (W across, the rest nearly free: sparse wins); the codec time puts dense
    between the two."""
    choices = []
    for fast in (False, True):
        state, topo, layout, width = _two_nodes_of_four()
        bw, lat = 1.25e8, 1e-6
        _link(state, bw, lat)
        dense = predict(8, 4 * sum(layout.numels), width, 0.0, bw, lat).dense
        state.policy.codec_seconds[topo.plan(state, layout)[0].names] = dense - 4 * width / bw
        if fast:
            for size in (1e4, 1e5, 1e6):
                state.policy.observe_inside(size, size / (100 * bw))
        choices.append(bool(state.policy._choose(state, [NAMES])[0]))
    assert choices == [False, True]

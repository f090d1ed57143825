"""hierarchy="node" element shards (no processes): message-balanced contiguous cuts, pieces as views of
their parameter's state, and the migration when cuts change (a simulated node of threads)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn

import dgc
from dgc.bench import grad_shapes
from dgc.bench.bandwidth.scaling import _buckets
from dgc.hierarchy import NodeTopology, pack_share
from dgc.hierarchy_shards import MIN_PIECE

pytestmark = pytest.mark.timeout(120)


def _resnet50_state(index_format: str) -> tuple[dgc.DGCState, list[tuple[str, ...]]]:
    with torch.device("meta"):
        net = grad_shapes.build("resnet50")
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    cfg = dgc.DGCConfig(density=0.001, dense_steps=0, log_every=0, index_format=index_format)
    state = dgc.DGCState(cfg, params)
    return state, _buckets([(n, p.numel()) for n, p in params], 25 * 2**20)


def _topology(local: int, local_rank: int = 0) -> NodeTopology:
    return NodeTopology(nodes=[list(range(local))], node=0, local_rank=local_rank)


def _spans(shares: list) -> list[tuple[int, int]]:
    """Each share's (start, stop) in the bucket, after checking its tensors sit back to back."""
    out = []
    for s in shares:
        pairs = list(zip(s.offsets, s.numels, strict=True))
        for (o, n), (o2, _) in zip(pairs, pairs[1:], strict=False):
            assert o + n == o2, (s.names, s.offsets)
        out.append((pairs[0][0], pairs[-1][0] + pairs[-1][1]) if pairs else None)
    return out


@pytest.mark.parametrize("local", [2, 4, 8])
def test_resnet50_share_messages_are_one_lth_of_the_flat_message(local: int) -> None:
    # int32 positions: a message is its pairs and dense values plus 4-8 bytes, so the cut alone decides
    state, buckets = _resnet50_state("int32")
    topo = _topology(local)
    flat = widest = 0
    for names in buckets:
        layout = state.codec.layout(names, sparse=True)
        flat += layout.message_bytes
        widest += max(s.message_bytes for s in topo.plan(state, layout))
    assert widest / flat <= 1 / local + 0.002, widest / flat
    # whole tensors as shares gave 0.509, 0.262 and 0.175 (block16) here


@pytest.mark.parametrize("local", [2, 4, 8])
def test_resnet50_block16_shares_exceed_one_lth_only_by_their_block_counts(local: int) -> None:
    state, buckets = _resnet50_state("auto")
    topo = _topology(local)
    flat = widest = counts = 0
    for names in buckets:
        layout = state.codec.layout(names, sparse=True)
        flat += layout.message_bytes
        widest += max(s.message_bytes for s in topo.plan(state, layout))
        counts += 4 * layout.index_blocks + 8  # every share carries the bucket's block counts, padding
    assert widest <= flat / local + 0.002 * flat + counts, (widest, flat)


@pytest.mark.parametrize("local", [2, 4, 8])
def test_shares_are_contiguous_and_cover_the_bucket_once(local: int) -> None:
    state, buckets = _resnet50_state("auto")
    topo = _topology(local)
    for names in buckets:
        layout = state.codec.layout(names, sparse=True)
        shares = topo.plan(state, layout)
        spans = [s for s in _spans(shares) if s is not None]
        assert spans[0][0] == 0 and spans[-1][1] == sum(layout.numels)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        for share in shares:  # a piece of a sparse tensor is never a sliver
            for name, k, n in zip(share.names, share.ks, share.numels, strict=True):
                if k and state.piece_of(name) is not None:
                    assert n >= MIN_PIECE, name


class _OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(300, 200)


def _state(model: nn.Module, **cfg) -> dgc.DGCState:
    config = dgc.DGCConfig(**{"density": 0.01, "dense_steps": 0, "log_every": 0, **cfg})
    return dgc.DGCState(config, model.named_parameters())


def test_a_one_tensor_bucket_is_split_across_every_local_rank() -> None:
    torch.manual_seed(0)
    state = _state(_OneLinear())
    layout = state.codec.layout(("fc.weight",), sparse=True)
    for local in (2, 4, 8):
        shares = _topology(local).plan(state, layout)
        assert all(len(s.names) == 1 for s in shares)
        sizes = [s.numels[0] for s in shares]
        assert sum(sizes) == 60_000 and max(sizes) - min(sizes) <= 1
        assert [state.piece_of(s.names[0]).start for s in shares] == [s.offsets[0] for s in shares]
        assert max(s.message_bytes for s in shares) <= layout.message_bytes / local + 16
        buffer = torch.randn(60_000)
        for s in shares:  # contiguous: the share is a view of the bucket buffer
            packed = pack_share(s, buffer)
            assert packed.data_ptr() == buffer.data_ptr() + 4 * s.offsets[0]


def test_piece_memories_are_views_rebuilt_when_the_parent_changes() -> None:
    state = _state(_OneLinear())
    name = state.piece("fc.weight", 1000, 5000)
    assert name == "fc.weight[1000:5000]" and state.piece("fc.weight", 0, 60_000) == "fc.weight"
    mem = state.memory_of(name)
    mem.residual.fill_(2.0)
    parent = state.memory["fc.weight"]
    assert parent.residual[1000:5000].eq(2).all() and parent.residual.sum() == 8000
    assert state.k_for(name) == 40  # the density times the piece's elements
    mask = torch.ones(200, 300, dtype=torch.bool)
    mask.view(-1)[:3000] = False
    state.set_masks({"fc.weight": mask})
    piece = state.memory_of(name)
    assert piece is not mem and piece.live == 2000 and state.k_for(name) == 20
    assert piece.residual.data_ptr() == parent.residual.data_ptr() + 4 * 1000
    with pytest.raises(KeyError, match="no parameter or piece"):
        state.memory_of("fc.weight[0:10]")


def test_a_parameter_named_like_a_piece_is_never_taken_for_one() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4096, 2))
            self.register_parameter("w[0:2048]", nn.Parameter(torch.ones(3)))

    state = _state(Odd())
    assert state.memory_of("w[0:2048]").numel == 3 and state.piece_of("w[0:2048]") is None
    with pytest.raises(ValueError, match="rename"):
        state.piece("w", 0, 2048)


# ---------------------------------------------------------------------------------- migration
@dataclass
class _Node:
    """A node of ``size`` threads whose _node_sum adds every rank's tensor in rank order."""

    size: int
    slots: list = field(default_factory=list)
    barrier: threading.Barrier | None = None

    def __post_init__(self) -> None:
        self.slots = [None] * self.size
        self.barrier = threading.Barrier(self.size, timeout=30)


class _SimTopology(NodeTopology):
    def __init__(self, sim: _Node, local_rank: int) -> None:
        super().__init__(nodes=[list(range(sim.size))], node=0, local_rank=local_rank)
        self.sim = sim

    def _node_sum(self, t: torch.Tensor, name: str) -> None:
        self.sim.slots[self.local_rank] = t.clone()
        self.sim.barrier.wait()
        total = self.sim.slots[0].clone()
        for other in self.sim.slots[1:]:
            total += other
        self.sim.barrier.wait()
        t.copy_(total)


def _on_every_rank(fn, size: int) -> list:
    out, errors = [None] * size, []

    def run(r: int) -> None:
        try:
            out[r] = fn(r)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return out


class _Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(100, 80)
        self.b = nn.Linear(80, 60)


def _node_sums(states: list[dgc.DGCState]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name in states[0].memory:
        u = sum((s.memory[name].momentum for s in states[1:]), states[0].memory[name].momentum.clone())
        v = sum((s.memory[name].residual for s in states[1:]), states[0].memory[name].residual.clone())
        out[name] = (u, v)
    return out


def _check_owned(states: list[dgc.DGCState], topos: list[NodeTopology]) -> None:
    """Each element's state sits at its owner only."""
    for r, (state, topo) in enumerate(zip(states, topos, strict=True)):
        for name, ranges in topo.owner_of.items():
            mem = state.memory[name]
            for a, b, owner in ranges:
                if owner != r:
                    assert mem.residual[a:b].eq(0).all() and mem.momentum[a:b].eq(0).all(), (r, name, a, b)


@pytest.mark.parametrize("local", [2, 3])
def test_migration_and_a_checkpoint_across_another_cut_keep_the_node_sums(local: int) -> None:
    torch.manual_seed(0)
    model = _Two()
    names = tuple(n for n, _ in reversed(list(model.named_parameters())))
    states = [_state(model, min_compress_numel=16) for _ in range(local)]
    gen = torch.Generator().manual_seed(1)
    for state in states:  # anything anywhere: the first placement sums it all
        for mem in state.memory.values():
            mem.residual.copy_(torch.randn(mem.numel, generator=gen))
            mem.momentum.copy_(torch.randn(mem.numel, generator=gen))
    before = _node_sums(states)
    sim = _Node(local)
    topos = [_SimTopology(sim, r) for r in range(local)]

    def place(r: int, bucket: tuple[str, ...]) -> list:
        layout = states[r].codec.layout(bucket, sparse=True)
        return topos[r].shares(states[r], layout)

    shares = _on_every_rank(lambda r: place(r, names), local)
    assert any(states[0].piece_of(n) for s in shares[0] for n in s.names)  # a.weight is split
    after = _node_sums(states)
    for name, (u, v) in before.items():  # a + 0 (+ 0): the sums are exact
        assert torch.equal(after[name][0], u) and torch.equal(after[name][1], v), name
    _check_owned(states, topos)

    # another cut: the weights alone in one bucket, the biases in another
    _on_every_rank(lambda r: [place(r, ("b.weight", "a.weight")), place(r, ("b.bias", "a.bias"))], local)
    moved = _node_sums(states)
    for name, (u, v) in before.items():
        assert torch.equal(moved[name][0], u) and torch.equal(moved[name][1], v), name
    _check_owned(states, topos)

    # a checkpoint of this cut, loaded into fresh states and topologies that cut as at first
    saved = [s.state_dict() for s in states]
    states[:] = [_state(model, min_compress_numel=16) for _ in range(local)]
    for state, sd in zip(states, saved, strict=True):
        state.load_state_dict(sd)
    topos[:] = [_SimTopology(sim, r) for r in range(local)]
    loaded = _node_sums(states)
    _on_every_rank(lambda r: place(r, names), local)
    resumed = _node_sums(states)
    for name, (u, v) in loaded.items():
        assert torch.equal(resumed[name][0], u) and torch.equal(resumed[name][1], v), name
    _check_owned(states, topos)


def test_a_load_places_the_state_again() -> None:
    torch.manual_seed(0)
    model = _Two()
    names = tuple(n for n, _ in reversed(list(model.named_parameters())))
    sim = _Node(1)
    topo = _SimTopology(sim, 0)
    state = _state(model, min_compress_numel=16)
    topo.shares(state, state.codec.layout(names, sparse=True))
    assert topo.owner_of and topo.loads == 0
    state.load_state_dict(state.state_dict())
    calls = []
    topo._node_sum = lambda t, name: calls.append(name)  # type: ignore[method-assign]
    topo.shares(state, state.codec.layout(names, sparse=True))
    assert calls and topo.loads == 1


def test_pieces_survive_pickling_as_views_of_the_unpickled_parent() -> None:
    import pickle

    state = _state(_OneLinear())
    name = state.piece("fc.weight", 2000, 6000)
    state.memory_of(name).residual.fill_(1.0)
    copy = pickle.loads(pickle.dumps(state))
    mem, parent = copy.memory_of(name), copy.memory["fc.weight"]
    assert mem.residual.data_ptr() == parent.residual.data_ptr() + 4 * 2000
    assert parent.residual.sum() == 4000


@pytest.mark.parametrize("sparse", [True, False])
def test_what_a_piece_sent_is_noted_as_its_parameter_elements(sparse: bool) -> None:
    # the DDP session gives back per parameter what reached no parameter: a piece's pairs must map
    # back to the parameter's own elements (the piece sits at bucket position 1000, element 2000)
    state = _state(_OneLinear())
    name = state.piece("fc.weight", 2000, 6000)
    layout = state.codec.layout((name,), sparse=sparse, offsets=(1000,), span=60_000)
    buffer = torch.zeros(60_000)
    buffer[1000:5000] = torch.linspace(-1, 1, 4000)
    send = state.codec.encode(layout, buffer, track=True, whole=not sparse)
    part, = send.parts
    assert part.name == "fc.weight"
    idx = part.positions.long() - part.offset
    assert idx.min() >= 2000 and idx.max() < 6000
    before = state.memory["fc.weight"].residual.clone()
    state.restore(part.name, idx, part.values)
    after = state.memory["fc.weight"].residual
    assert torch.equal((after - before)[idx], part.values.float())
    if sparse:  # 40 pairs, the largest |g| among them: the piece's two ends
        assert idx.numel() == 40 and {2000, 5999} <= set(idx.tolist())
    else:  # the whole piece, element by element
        assert torch.equal(idx, torch.arange(2000, 6000))

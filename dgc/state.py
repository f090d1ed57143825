"""``DGCState``: everything one worker keeps between steps, keyed by parameter name."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import compressor
from .checkpoint_layout import STATE_META, checked_entries, layout_of
from .codec import MAX_INDEX, Codec
from .compressor import CompressedTensor, TensorMemory
from .config import DGCConfig
from .pieces import Piece, Pieces
from .policy import Policy
from .stats import CompressionStats

__all__ = ["STATE_META", "DGCState"]

log = logging.getLogger(__name__)


class DGCState:
    """Hyperparameters and internal state of DGC for one worker (the DDP hook's ``state`` argument).

    Hyperparameters the user tunes: ``config`` (:class:`DGCConfig`) and ``process_group`` (None = the
    default group).  Internal state: per-parameter momentum and residual (float32, whatever the gradient
    dtype), keyed by parameter *name*, never by bucket index (DDP rebuilds its buckets after the first
    step); the communication ``step``; ``stats`` of the last completed step.

    ``named_parameters`` are those of the model DDP wraps (``ddp_model.module.named_parameters()``); only
    parameters that require gradients are tracked.  Pickling drops the process group and the parameter
    references: call :meth:`bind` after unpickling (``dgc.register`` does).  Prefer :meth:`state_dict`
    for checkpoints.
    """

    def __init__(
        self,
        config: DGCConfig | None = None,
        named_parameters: Iterable[tuple[str, Tensor]] = (),
        process_group: dist.ProcessGroup | None = None,
        *,
        node_groups: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if config is None:
            config = DGCConfig()
        if not isinstance(config, DGCConfig):
            raise TypeError(f"config must be a dgc.DGCConfig, got {type(config).__name__}")
        # Hyperparameters.
        self.config = config
        self.process_group = process_group
        self.node_groups = None if node_groups is None else [list(g) for g in node_groups]
        """``hierarchy="node"``: the ranks of each node (None: from torchrun's ``LOCAL_WORLD_SIZE``)."""
        if config.hierarchy == "node" and node_groups is None and "LOCAL_WORLD_SIZE" not in os.environ:
            raise ValueError(
                "DGCConfig.hierarchy='node' needs to know the nodes: run under torchrun (it sets "
                "LOCAL_WORLD_SIZE) or pass DGCState(..., node_groups=[[0, 1], [2, 3], ...])."
            )
        # Internal state.
        self.step = 0
        self.stats = CompressionStats()
        self.policy = Policy(config.policy, config.policy_interval)
        """Which groups go sparse (``DGCConfig.policy``; decisions and measurements of ``"auto"``)."""
        self.memory: dict[str, TensorMemory] = {}
        self._pieces = Pieces()
        """Element ranges of parameters that go through DGC on their own (``hierarchy="node"``'s
        shares, see :mod:`dgc.pieces`); their memories are views of the parameters'."""
        self.loads = 0
        """How many times :meth:`load_state_dict` ran: a transport that placed the state by its own
        rules (the node hierarchy's shares) places it again after a load."""
        self._pending = CompressionStats()
        self._params: dict[int, tuple[str, Tensor]] = {}
        self._by_name: dict[str, Tensor] = {}
        self._codec: Codec | None = None
        self.agreed = False
        """The ranks compared their settings (:mod:`dgc.agreement`) since the last load."""
        self.transport: Any = None
        """The bookkeeping of the transport that drives this state (the DDP hook's session); not pickled."""
        self.track_sent = True
        """Remember what each tensor sent this step, so that the DDP hook can give back what was sent for
        a parameter that then got no gradient (DDP with ``find_unused_parameters`` or ``static_graph``).
        Costs a copy of dense-allreduce buckets; False turns it off for models where every parameter is
        always used.  ``dgc.register`` sets it from the DDP model (on only with ``find_unused_parameters``
        or ``static_graph``)."""
        self._rng = random.Random(config.seed * 1_000_003 + self.rank)
        params = list(named_parameters)
        if not params:
            raise ValueError(
                "DGCState needs the model's parameters: pass named_parameters="
                "ddp_model.module.named_parameters() (got none)."
            )
        for name, p in params:
            if not p.requires_grad:
                continue
            if name in self.memory:
                raise ValueError(f"parameter name {name!r} appears twice in named_parameters")
            if p.numel() > MAX_INDEX:
                raise ValueError(
                    f"parameter {name!r} has {p.numel()} elements; DGC indices are int32, so a tensor "
                    f"may have at most {MAX_INDEX}. Split the parameter."
                )
            compressed = p.dim() > 1 and p.numel() >= config.min_compress_numel
            self.memory[name] = TensorMemory(
                name=name,
                shape=p.shape,
                compressed=compressed,
                residual=torch.zeros(p.numel(), dtype=torch.float32, device=p.device),
                momentum=(
                    torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                    if config.momentum > 0
                    else None
                ),
                live=p.numel(),
            )
        self.bind(params)

    # ------------------------------------------------------------------ topology
    @property
    def world_size(self) -> int:
        if not dist.is_available() or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.process_group)

    @property
    def rank(self) -> int:
        if not dist.is_available() or not dist.is_initialized():
            return 0
        return dist.get_rank(self.process_group)

    def bind(self, named_parameters: Iterable[tuple[str, Tensor]]) -> None:
        """Attach the live parameter tensors (after construction or unpickling), checking names/shapes."""
        self._params = {}
        for name, p in named_parameters:
            if name not in self.memory:
                continue
            mem = self.memory[name]
            if tuple(p.shape) != tuple(mem.shape):
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(p.shape)} but the DGC state holds "
                    f"{tuple(mem.shape)}: the state belongs to another model."
                )
            self._params[id(p)] = (name, p)
        self._by_name = {n: p for n, p in self._params.values()}
        missing = set(self.memory) - {n for n, _ in self._params.values()}
        if missing:
            raise ValueError(
                f"DGC state tracks parameters the model lacks: {sorted(missing)[:5]}; "
                "pass the same model's named_parameters()."
            )

    def name_of(self, param: Tensor) -> str:
        entry = self._params.get(id(param))
        if entry is None:
            if not self._params:
                raise RuntimeError(
                    "this DGCState has no parameters bound (it was unpickled): call "
                    "state.bind(model.named_parameters()) or dgc.register(...) before training."
                )
            raise KeyError(
                f"a parameter of shape {tuple(param.shape)} reached the DGC hook but is not in the "
                "DGCState: build the state from ddp_model.module.named_parameters()."
            )
        return entry[0]

    def name_or_none(self, param: Tensor) -> str | None:
        """The name of a tracked parameter, or None."""
        entry = self._params.get(id(param))
        return None if entry is None else entry[0]

    def param_of(self, name: str) -> Tensor | None:
        return self._by_name.get(name)

    # ------------------------------------------------------------------ pieces
    def memory_of(self, name: str) -> TensorMemory:
        """The memory of a parameter, or of a piece registered with :meth:`piece` (views of its
        parameter's).  A parameter's own name always means the parameter."""
        mem = self.memory.get(name)
        return mem if mem is not None else self._pieces.memory(self.memory, name)

    def piece(self, parent: str, start: int, stop: int) -> str:
        """The name of elements ``start:stop`` of parameter ``parent`` (flattened) as a tensor of its
        own for the codec: ``"parent[start:stop]"``, or ``parent`` itself for all of it."""
        return self._pieces.add(self.memory, parent, start, stop)

    def piece_of(self, name: str) -> Piece | None:
        """The piece ``name`` names, or None for a parameter."""
        return None if name in self.memory else self._pieces.get(name)

    # ------------------------------------------------------------------ masks
    def set_masks(self, masks: Mapping[str, Tensor | None]) -> None:
        """Register static pruning masks (True = live) by parameter name; None removes a mask.

        Masked coordinates are never selected or sent, their gradient is ignored, and their momentum
        and residual are zeroed now and stay zero.  The density then counts live entries only.  Masks
        must be identical on every rank (the message sizes depend on them).
        """
        for name, mask in masks.items():
            if name not in self.memory:
                raise KeyError(f"set_masks: no parameter named {name!r} in the DGC state")
            mem = self.memory[name]
            if mask is None:
                mem.mask, mem.live = None, mem.numel
                continue
            if mask.numel() != mem.numel:
                raise ValueError(
                    f"set_masks: mask for {name!r} has {mask.numel()} elements, parameter has {mem.numel}"
                )
            flat = mask.detach().reshape(-1).to(device=mem.residual.device, dtype=torch.bool)
            mem.mask = flat.clone()
            mem.live = int(flat.sum())
            mem.residual.mul_(flat)
            if mem.momentum is not None:
                mem.momentum.mul_(flat)
        self.codec.invalidate()

    # ------------------------------------------------------------------ per-tensor API
    @property
    def density(self) -> float:
        """Target density of the current step (1 during dense steps, then the warm-up)."""
        return self.config.density_at(self.step)

    def is_compressed(self, name: str) -> bool:
        """Whether tensor ``name`` goes sparse at the current step."""
        mem = self.memory_of(name)
        return mem.compressed and self.step >= self.config.dense_steps and mem.live > 0

    def k_for(self, name: str) -> int:
        """Pairs tensor ``name`` sends at the current step (0 = dense)."""
        return self.memory_of(name).k_at(self.density) if self.is_compressed(name) else 0

    def sample_offset(self) -> int:
        stride = max(1, round(1.0 / self.config.sample_ratio))
        return self._rng.randrange(stride)

    def kernels_for(self, tensor: Tensor):
        from .kernels import backend_for

        return backend_for(tensor.device, self.config.backend)

    def compress(
        self,
        name: str,
        grad: Tensor,
        *,
        param: Tensor | None = None,
        out_indices: Tensor | None = None,
        out_values: Tensor | None = None,
    ) -> CompressedTensor:
        """Compress the local gradient of ``name`` (may modify ``grad`` in place).

        Runs weight decay and clipping, momentum correction, accumulation, selection, packing and
        masking; returns exactly :meth:`k_for` pairs.  ``param`` is needed when weight decay is on
        (defaults to the bound parameter).
        """
        k = self.k_for(name)
        if k == 0:
            raise ValueError(f"tensor {name!r} goes dense at step {self.step}: use compress_dense()")
        mem = self._memory_on(name, grad.device)
        compressor.preprocess(grad, self._param_for(name, param), self.config, self.world_size,
                              self._fraction(name))
        return compressor.compress(
            mem,
            grad,
            k,
            self.config,
            self.kernels_for(mem.residual),
            offset=self.sample_offset(),
            out_indices=out_indices,
            out_values=out_values,
        )

    def compress_dense(
        self, name: str, grad: Tensor, *, param: Tensor | None = None, out: Tensor | None = None
    ) -> Tensor:
        """Momentum-corrected, accumulated payload of a dense-path tensor (``out`` may alias ``grad``;
        default: a new tensor of the wire dtype).  Call :meth:`finish_dense` once the collective is done."""
        mem = self._memory_on(name, grad.device)
        compressor.preprocess(grad, self._param_for(name, param), self.config, self.world_size,
                              self._fraction(name))
        if out is None:
            out = torch.empty(mem.numel, dtype=self.config.wire_dtype, device=mem.residual.device)
        return compressor.compress_dense(mem, grad, self.config, out)

    def compress_dense_in_place(self, name: str, grad: Tensor, divide: int = 1) -> bool:
        """:meth:`compress_dense` into ``grad`` itself, divided by ``divide`` (the transport then sums).
        Returns True when it took the direct path (v known zero: two passes, v untouched, nothing for
        :meth:`finish_dense` to do; a failed step calls :meth:`undo_dense_direct`)."""
        mem = self._memory_on(name, grad.device)
        if self.config.hierarchy == "flat" and compressor.direct_dense_ok(mem, grad, self.config):
            compressor.preprocess(grad, self._param_for(name, None), self.config, self.world_size)
            compressor.compress_dense_direct(mem, grad, self.config, divide, self.kernels_for(grad))
            return True
        self.compress_dense(name, grad, out=grad)
        if divide != 1:
            grad.div_(divide)
        return False

    def compress_dense_group(self, parts: Sequence[tuple[str, Tensor]], divide: int = 1) -> tuple[bool, ...]:
        """:meth:`compress_dense_in_place` for every ``(name, grad)`` of a group (e.g. a dense bucket), with
        the same results: the tensors that take the direct path go through one
        ``kernels.dense_momentum_many`` call instead of one Python call chain per tensor.  Returns, per
        tensor, whether it took the direct path."""
        config, direct = self.config, []
        grads: list[Tensor] = []
        momenta: list[Tensor] = []
        step0 = config.weight_decay or config.clip_norm is not None
        world = self.world_size if step0 else 1
        for name, grad in parts:
            mem = self._memory_on(name, grad.device)
            if config.hierarchy == "flat" and compressor.direct_dense_ok(mem, grad, config):
                if step0:
                    compressor.preprocess(grad, self._param_for(name, None), config, world)
                grads.append(grad.reshape(-1))
                momenta.append(mem.momentum)
                direct.append(True)
            else:
                self.compress_dense_in_place(name, grad, divide)
                direct.append(False)
        if grads:
            compressor.compress_dense_direct_many(grads, momenta, config, divide, self.kernels_for(grads[0]))
        return tuple(direct)

    def undo_dense_direct(self, name: str) -> None:
        """A failed step: the payload of :meth:`compress_dense_in_place`'s direct path back into v."""
        compressor.undo_direct(self.memory_of(name))

    def finish_dense(self, name: str, sent_dtype: torch.dtype, delivered: bool = True) -> None:
        """Second half of :meth:`compress_dense`: clear what was delivered from the residual."""
        compressor.finish_dense(self.memory_of(name), sent_dtype, delivered)

    def decompress(self, name: str, indices: Tensor, values: Tensor, world_size: int) -> Tensor:
        """Average of ``world_size`` workers' pairs for tensor ``name`` (concatenated by rank), float32
        with the parameter's shape."""
        mem = self.memory_of(name)
        out = torch.empty(mem.numel, dtype=torch.float32, device=mem.residual.device)
        self.kernels_for(out).scatter_unpack(out, indices, values, world_size)
        return out.view(mem.shape)

    def restore(self, name: str, indices: Tensor | None, sent: Tensor) -> None:
        """Put values that were packed but never delivered back into the residual (indices None: all)."""
        mem = self.memory_of(name)
        v = mem.residual
        if indices is None and sent.numel() == v.numel():
            v.add_(sent.reshape(-1).float())
        elif indices is None:  # a pruned tensor's dense payload: its live entries only
            v.index_add_(0, torch.nonzero(mem.mask).reshape(-1), sent.reshape(-1).float())
        else:
            v.index_add_(0, indices.long(), sent.float())

    def optimizer_stepped(self) -> None:
        """Tell the DDP hook that the parameters were updated, for loops that apply ``p.grad`` by hand
        instead of with a ``torch.optim`` optimizer (one passed to ``dgc.register`` tells it itself)."""
        if self.transport is not None:
            self.transport.optimizer_stepped()

    def end_step(self, failed: bool = False) -> None:
        """Close the communication step: publish its stats, advance the density schedule.  A ``failed``
        step (a non-finite gradient somewhere: nothing applied) is not counted: it will be retried."""
        if failed:
            self._pending = CompressionStats()
            return
        self._pending.step = self.step
        self._pending.density = self.density
        self.stats = self._pending
        self._pending = CompressionStats()
        self.step += 1
        if self.rank != 0:
            return
        if self.step == self.config.dense_steps and self.config.dense_steps:
            log.info("DGC: %d dense steps done, sparse from now on", self.step)
        every = self.config.log_every
        if every and self.step % every == 0:
            s = self.stats
            log.info(
                "DGC step %d: density %.4g (achieved %.4g), sent %d B of %d B dense (%.1fx), "
                "received %d B, %d sparse + %d dense buckets",
                s.step,
                s.density,
                s.achieved_density,
                s.bytes_sent,
                s.dense_bytes,
                s.compression_ratio,
                s.bytes_received,
                s.sparse_buckets,
                s.dense_buckets,
            )

    def record_received(self, nbytes: int) -> None:
        """Add ``nbytes`` more received bytes to the current step's stats (a collective beside the codec's
        own, e.g. ``hierarchy="node"``'s exchange across the nodes before the gather inside)."""
        self._pending.bytes_received += int(nbytes)

    def record(self, *, sparse: bool, **figures: int) -> None:
        """Add a bucket's traffic to the current step's stats (``sparse``: it went through allgather)."""
        self._pending.add(**figures)
        if sparse:
            self._pending.sparse_buckets += 1
        else:
            self._pending.dense_buckets += 1

    def _memory_on(self, name: str, device: torch.device) -> TensorMemory:
        """The tensor's memory, moved once to ``device`` if the model moved after the state was built
        (a piece: its parameter's, then new views)."""
        piece = self.piece_of(name)
        mem = self.memory[name if piece is None else piece.parent]
        if mem.residual.device != device:
            mem.residual = mem.residual.to(device)
            mem.momentum = None if mem.momentum is None else mem.momentum.to(device)
            mem.mask = None if mem.mask is None else mem.mask.to(device)
            self.codec.invalidate()
        return mem if piece is None else self.memory_of(name)

    def _param_for(self, name: str, param: Tensor | None) -> Tensor | None:
        if param is not None or not self.config.weight_decay:
            return param
        piece = self.piece_of(name)
        if piece is None:
            return self.param_of(name)
        whole = self.param_of(piece.parent)
        return None if whole is None else whole.detach().reshape(-1)[piece.start : piece.stop]

    def _fraction(self, name: str) -> float:
        """The share of its parameter's elements that ``name`` holds (1: a parameter): local clipping
        holds a piece to the parameter's limit times the square root of it."""
        piece = self.piece_of(name)
        return 1.0 if piece is None else piece.numel / self.memory[piece.parent].numel

    # ------------------------------------------------------------------ transports
    @property
    def codec(self) -> Codec:
        """The :class:`~dgc.codec.Codec` that encodes and decodes this worker's groups (built on first use)."""
        if self._codec is None:
            self._codec = Codec(self)
        return self._codec

    def finite(self, t: Tensor) -> bool:
        """Whether ``t`` has no NaN/Inf (always True with ``check_finite=False``).  A float32 sum is finite
        iff every element is (barring overflow past 3e38), and ~10x cheaper than isfinite().all() on a CPU."""
        return not self.config.check_finite or bool(torch.isfinite(t.sum(dtype=torch.float32)))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Per parameter name, ``{"momentum": u, "residual": v, "mask": m}`` (parameter-shaped; u and v
        float32, u None when m = 0, mask None unless pruning set one), plus :data:`STATE_META` keys:
        ``step``, ``world_size``, ``rank`` and ``config`` (a dict).  Loadable with
        ``torch.load(weights_only=True)``.  Each rank saves its own: residuals differ between ranks
        (:func:`dgc.reshard_state_dicts` turns N ranks' states into M).

        >>> sd = state.state_dict(); sd["fc.weight"]["residual"].shape, sd["step"]
        """
        out = layout_of(self.memory)
        out.update(step=self.step, world_size=self.world_size, rank=self.rank, config=self.config.to_dict())
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` exactly; raises ``ValueError`` naming any mismatch (parameter
        names or shapes, world size, rank, momentum on/off).  Also reads the layout of dgc <= 0.1, whose
        per-parameter entries sat under a ``"params"`` key."""
        saved = checked_entries(
            state, self.memory, self.world_size, self.rank, self.config.momentum, self.config.hierarchy
        )
        for name, entry in saved.items():
            mem = self.memory[name]
            mem.residual.copy_(entry["residual"].reshape(-1))
            if mem.momentum is not None:
                mem.momentum.copy_(entry["momentum"].reshape(-1))
            mask = entry.get("mask")
            mem.mask = None if mask is None else mask.reshape(-1).to(mem.residual.device).clone()
            mem.live = mem.numel if mem.mask is None else int(mem.mask.sum())
        self.step = int(state["step"])
        self.loads += 1  # the transport places what was loaded again (see ``loads``)
        self.agreed = False  # compare with the other ranks again at the next step
        self.policy = Policy(self.config.policy, self.config.policy_interval)  # decide afresh
        self.codec.invalidate()

    def __getstate__(self) -> dict[str, Any]:
        # Like PowerSGDState: a process group cannot be pickled; neither can id()-keyed caches.
        state = dict(self.__dict__)
        state["process_group"] = None
        state["_params"] = {}
        state["_by_name"] = {}
        state["_codec"] = None
        state["transport"] = None
        state["agreed"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("_pieces", Pieces())  # pickled before pieces existed
        state.setdefault("loads", 0)
        self.__dict__.update(state)

    def __repr__(self) -> str:
        n = sum(m.numel for m in self.memory.values())
        return f"DGCState(step={self.step}, tensors={len(self.memory)}, elements={n}, config={self.config})"


"""Horovod worker for tests/test_horovod_hierarchy.py: ``hierarchy="node"``'s two-stage exchange of the
share messages, watched from outside (every all-gather of bytes the library issues, every decode).
``horovodrun --gloo -np 4 python node_exchange.py SCENARIO OUT``, 2 simulated nodes of 2 processes.

* ``two_stage`` (dynamic process sets: dgc adds the cross sets): per step, the bytes each rank hands to
  all-gathers that span nodes (the spy's count and the topology's ``sent_across``) against (n - 1) W per
  sparse bucket, the process sets the messages went over, every decoded bucket against one all-gather
  of the same padded messages over all processes (same rows, same decoded bits), and the parameters
  against a run forced to one stage;
* ``one_stage`` (only the node sets registered at ``hvd.init``): the cross sets are missing, so one
  all-gather over all processes, (N - 1) W per sparse bucket, and rank 0 logs why once.
"""

from __future__ import annotations

import logging

import horovod.torch as hvd
import torch
from hierarchy import NODES, batches, make_model, optimizer
from hvd_main import main_with_node_sets
from worker import loss_fn, max_over_ranks  # this file's folder is on sys.path (run as a script)

import dgc

CONFIG = dict(density=0.05, momentum=0.9, dense_steps=1, min_compress_numel=128, hierarchy="node")


class ByteGathers:
    """Replaces ``hvd.allgather_async`` (what dgc calls) with a spy recording, for every all-gather of
    bytes (the share messages), its process set's global ranks and the bytes this rank put in."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], int]] = []
        self._real = hvd.allgather_async

        def spy(tensor, name=None, process_set=hvd.global_process_set):  # noqa: ANN001, ANN202
            if tensor.dtype == torch.uint8:
                ranks = process_set.ranks if process_set is not hvd.global_process_set else None
                self.calls.append((list(ranks or range(hvd.size())), tensor.numel()))
            return self._real(tensor, name=name, process_set=process_set)

        hvd.allgather_async = spy

    def stop(self) -> None:
        hvd.allgather_async = self._real

    def across(self) -> int:
        """Bytes handed to all-gathers spanning nodes: (g - 1) x the input for a set of g ranks."""
        node_of = {r: i for i, g in enumerate(NODES) for r in g}
        return sum((len(ranks) - 1) * size for ranks, size in self.calls
                   if len({node_of[r] for r in ranks}) > 1)


def capture(topo) -> list[tuple]:  # noqa: ANN001
    """Record every decode of the step: (its padded message, the gathered rows, the rows' order, width,
    the shares, the decoded bucket), in bucket order (the optimizer decodes on this thread)."""
    captured: list[tuple] = []
    real_decode, real_padded = topo.decode, topo.padded
    sent: dict[int, torch.Tensor] = {}  # by the bucket buffer's address

    def padded(state, send, width):  # noqa: ANN001, ANN202
        message = real_padded(state, send, width)
        sent[send.buffer.data_ptr()] = message.clone()
        return message

    def decode(state, shares, gathered, width, out, rows_of=None):  # noqa: ANN001, ANN202
        failed = real_decode(state, shares, gathered, width, out, rows_of)
        captured.append((sent.pop(out.data_ptr()), gathered.clone(), rows_of, width, shares, out.clone()))
        return failed

    topo.padded, topo.decode = padded, decode
    return captured


def one_stage_equal(state: dgc.DGCState, topo, captured: list[tuple]) -> tuple[bool, bool]:  # noqa: ANN001
    """Every captured bucket against one all-gather over all processes of the same padded messages: the
    same message in every row, and the same decoded bits (a step without sparse buckets: True)."""
    rows_ok = decoded_ok = True
    for i, (message, gathered, rows_of, width, shares, decoded) in enumerate(captured):
        one = hvd.allgather(message, name=f"check.one_stage.{i}")
        two = gathered.view(-1, width)
        rows_ok &= rows_of is not None and all(
            torch.equal(two[rows_of[r]], one.view(-1, width)[r]) for r in range(hvd.size()))
        again = torch.zeros_like(decoded)
        failed = type(topo).decode(topo, state, shares, one, width, again)  # rank order, no rows_of
        decoded_ok &= failed is None and torch.equal(again, decoded)
    return rows_ok, decoded_ok


def train(steps: int, one_stage: bool = False) -> dict:
    """Sparse node DGC for ``steps``, watched per step; ``one_stage``: forced to the one all-gather."""
    model = make_model()
    opt = optimizer(model, dgc.DGCConfig(**CONFIG))
    topo, state = opt._nodes.topo, opt.dgc_state
    two_stage = topo.two_stage
    topo.two_stage = two_stage and not one_stage
    captured = capture(topo)
    out: dict = {"two_stage": two_stage, "across": [], "counter": [], "expected": [], "buckets": [],
                 "set_sizes": [], "rows_equal": [], "decoded_equal": []}
    for x, y in batches(steps):
        captured.clear()
        spy = ByteGathers()
        before = topo.sent_across
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        spy.stop()
        out["across"].append(spy.across())
        out["counter"].append(topo.sent_across - before)
        out["expected"].append(sum((topo.n_nodes - 1) * c[3] for c in captured))
        out["buckets"].append(len(captured))
        out["set_sizes"].append(sorted({len(r) for r, _ in spy.calls}))
        rows, decoded = one_stage_equal(state, topo, captured)
        out["rows_equal"].append(rows)
        out["decoded_equal"].append(decoded)
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def everywhere(flags: list[bool]) -> bool:
    """Whether every flag holds on every rank."""
    return bool(hvd.allreduce(torch.tensor([int(all(flags))]), op=hvd.Min).item())


def scenario_two_stage(steps: int = 4) -> dict:
    two = train(steps)
    one = train(steps, one_stage=True)
    diff = max((two["params"][n] - p).abs().max().item() for n, p in one["params"].items())
    return {
        "two_stage": everywhere([two["two_stage"]]),
        "across": two["across"], "counter": two["counter"], "expected": two["expected"],
        "buckets": two["buckets"], "set_sizes": two["set_sizes"],
        "rows_equal": everywhere(two["rows_equal"]), "decoded_equal": everywhere(two["decoded_equal"]),
        "one_stage_across": one["across"], "one_stage_expected": one["expected"],
        "one_stage_set_sizes": one["set_sizes"],
        "max_diff_one_stage": max_over_ranks(diff),
    }


class Said(logging.Handler):
    """Keeps what dgc's Horovod node topology logs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        logging.getLogger("dgc.hierarchy_horovod").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def scenario_one_stage(steps: int = 3) -> dict:
    said = Said()
    run = train(steps)
    train(1)  # a second optimizer: the reason is not logged again
    return {
        "two_stage": run["two_stage"], "across": run["across"], "counter": run["counter"],
        "expected": run["expected"], "buckets": run["buckets"], "set_sizes": run["set_sizes"],
        "said": said.messages,
    }


SCENARIOS = {"two_stage": scenario_two_stage, "one_stage": scenario_one_stage}


def main() -> None:
    main_with_node_sets(SCENARIOS, "one_stage", NODES)


if __name__ == "__main__":
    main()

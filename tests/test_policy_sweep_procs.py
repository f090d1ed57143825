"""The policy sweep's processes-per-node dimension (``policy-sweep --more-procs``): the plan, the goals
that must keep reading the main runs, and the bytes figure with one line per count."""

from __future__ import annotations

from pathlib import Path

import pytest

from dgc.bench.bandwidth.cli import parser
from dgc.bench.bandwidth.policy_report import _bytes_plot, _find, bytes_series, goals
from dgc.bench.bandwidth.policy_sweep import PolicySweepOptions, plan


def test_more_procs_adds_flat_vs_node_runs_at_the_first_node_count() -> None:
    runs = plan(PolicySweepOptions(nodes=(2, 4), procs_per_node=2, more_procs=(4,)))
    extra = runs[-1]
    assert extra.name == "resnet50-n2x4-1gbit"
    assert (extra.nodes, extra.procs_per_node, extra.processes) == (2, 4, 8)
    assert set(extra.methods) == {"dgc", "dgc-node"}
    assert len(runs) == len(plan(PolicySweepOptions(nodes=(2, 4), procs_per_node=2))) + 1


@pytest.mark.parametrize("bad", [(1,), (2,)])
def test_more_procs_refuses_counts_that_add_nothing(bad: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="--more-procs"):
        plan(PolicySweepOptions(procs_per_node=2, more_procs=bad))


def test_command_line_default_sweeps_four_processes_per_node() -> None:
    args = parser().parse_args(["policy-sweep"])
    assert args.more_procs == "4"


def _row(procs: int, method: str, step: float, tx: float, rate: str = "1gbit") -> dict:
    return {"nodes": 2, "procs_per_node": procs, "rate": rate, "method": method, "step_s": step,
            "tx_bytes": tx, "tag": ""}


def test_goals_read_the_main_processes_per_node_not_the_extra_run() -> None:
    # the 4-per-node run comes first in the list: the goals must still use the 2-per-node rows
    rows = [_row(4, "dgc", 1.0, 8.0), _row(4, "dgc-node", 1.0, 2.0),
            _row(2, "dgc", 1.0, 4.0), _row(2, "dgc-node", 1.2, 2.2)]
    assert _find(rows, 2, "1gbit", "dgc-node")["tx_bytes"] == 2.2
    assert _find(rows, 2, "1gbit", "dgc-node", procs=4)["tx_bytes"] == 2.0
    by_goal = {g["goal"]: g for g in goals(rows)}
    assert by_goal["1gbit: hierarchy=node inter-node bytes <= half of flat"]["value"] == pytest.approx(0.55)
    assert by_goal["1gbit: hierarchy=node at least as fast as flat"]["value"] == pytest.approx(1.2)


def test_bytes_figure_has_a_line_per_method_and_count(tmp_path: Path) -> None:
    rows = [_row(2, "dgc", 1.0, 4e6), _row(2, "dgc-node", 1.0, 2e6), _row(4, "dgc", 1.0, 8e6),
            _row(4, "dgc-node", 1.0, 2e6), {**_row(2, "dgc", 1.0, 9e6), "nodes": 4},
            _row(2, "dense", 1.0, 1e8, rate="unlimited"), _row(2, "dgc", 1.0, 5e6, rate="10gbit")]
    assert bytes_series(rows) == {
        "flat DGC, 2 per node": [(2, 4.0), (4, 9.0)], "hierarchy=node, 2 per node": [(2, 2.0)],
        "flat DGC, 4 per node": [(2, 8.0)], "hierarchy=node, 4 per node": [(2, 2.0)],
    }
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _bytes_plot(rows, tmp_path, plt)
    assert (tmp_path / "internode_bytes_vs_nodes.png").stat().st_size > 1000

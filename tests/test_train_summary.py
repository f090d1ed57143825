"""The end-of-run summary: the collapse warning, and docs/training.md's generated example block."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from dgc.training.summary import (
    COLLAPSE_POINTS,
    KNOWN_DENSE,
    KnownDense,
    collapse_warning,
    format_summary,
)

ROOT = Path(__file__).resolve().parents[1]


def _doc_summary():
    spec = importlib.util.spec_from_file_location("doc_summary", ROOT / "launch" / "doc_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(**over) -> dict:
    """A summary record of the main job's shape (the keys Trainer.finish writes)."""
    record = {
        "event": "summary", "step": 310, "epochs_done": 5.0, "world_size": 2, "backend": "gloo",
        "device": "cpu", "precision": "32", "compiled": False, "model": "CNN",
        "parameters": 421642, "data": "mnist-5k", "compress": "dgc",
        "compression": "DGC: density 0.001", "test_loss": 0.1291, "test_accuracy": 96.2,
        "step_time_s": 0.0835, "train_seconds": 25.9, "bytes_sent_per_step": 57800.0,
        "bytes_received_per_step": 105000.0, "dense_bytes_per_step": 1686568.0,
        "compression_ratio": 29.2, "achieved_density": 0.02541, "out_dir": "outputs/x",
        "last_step_bytes_sent": 4664, "last_step_compression_ratio": 361.6,
        "last_step_density": 0.002241,
    }
    record.update(over)
    return record


def _mnist() -> KnownDense:
    return next(k for k in KNOWN_DENSE if k.model == "CNN" and k.data == "mnist-5k")


def test_known_dense_figures_match_the_parity_table():
    """The MNIST figure is docs/parity.md's dense row (and the README's copy of it)."""
    row = re.search(r"^\| mnist \| dense \| ([\d.]+)% \|", (ROOT / "docs" / "parity.md").read_text(),
                    re.M)
    assert row is not None and float(row.group(1)) == _mnist().accuracy
    for k in KNOWN_DENSE:
        assert 50.0 < k.accuracy <= 100.0 and k.epochs > 0, k


def test_collapsed_run_warns_and_a_healthy_one_does_not():
    ref = _mnist().accuracy
    collapsed = _record(test_accuracy=63.2)
    warning = collapse_warning(collapsed)
    assert warning is not None
    assert "63.20%" in warning and f"{ref - 63.2:.1f} points below" in warning
    assert f"{ref:.2f}%" in warning and "mnist-5k" in warning
    assert "WARNING      " + warning in format_summary(collapsed)
    # DGC alone at the default 5 epochs (96.20%) and a run just inside the margin: no warning.
    for acc in (96.2, ref - COLLAPSE_POINTS + 0.01):
        healthy = _record(test_accuracy=acc)
        assert collapse_warning(healthy) is None
        assert "WARNING" not in format_summary(healthy)
    assert collapse_warning(_record(test_accuracy=ref - COLLAPSE_POINTS - 0.01)) is not None


def test_no_warning_without_a_reference_or_for_short_runs():
    assert collapse_warning(_record(test_accuracy=10.0, data="synthetic-3x32x32")) is None
    assert collapse_warning(_record(test_accuracy=10.0, model="ResNet")) is None
    assert collapse_warning(_record(test_accuracy=10.0, epochs_done=0.1)) is None  # max_steps
    lm = _record(data="mnist-5k")
    del lm["test_accuracy"]
    assert collapse_warning(lm) is None
    custom = (KnownDense(model="CNN", data="mnist-5k", accuracy=99.0, epochs=1, source="t"),)
    assert collapse_warning(_record(test_accuracy=96.2), points=1.0, known=custom) is not None
    assert collapse_warning(_record(test_accuracy=96.2), points=5.0, known=custom) is None


def test_training_md_has_the_generated_block_in_the_summary_format():
    doc = _doc_summary()
    text = (ROOT / "docs" / "training.md").read_text()
    assert text.count(doc.BEGIN) == 1 and text.count(doc.END) == 1
    block = text[text.index(doc.BEGIN) + len(doc.BEGIN):text.index(doc.END)]
    fenced = re.search(r"```\n(.*?)\n```", block, re.S)
    assert fenced is not None
    # The doc's block has the lines format_summary writes for a DGC run, in the same order.
    labels = [line.split(" ", 1)[0] for line in fenced.group(1).splitlines()]
    expected = [line.split(" ", 1)[0] for line in format_summary(_record()).splitlines()]
    assert labels == expected
    assert "launch/train.py +compress=dgc" in block


def test_render_and_replace_keep_the_rest_of_the_document():
    doc = _doc_summary()
    record = _record()
    block = doc.render_block(record, wall_s=46.0, commit="abc1234", torch_version="2.13.0")
    assert format_summary(record) in block
    words = " ".join(block.split())
    assert "46 s" in words and "abc1234" in words and "4.66 kB per step instead of 1.69 MB" in words
    # A run folder inside the checkout is shown relative to it.
    inside = doc.render_block(_record(out_dir=str(ROOT / "outputs" / "doc_summary")), wall_s=1,
                              commit="c", torch_version="t")
    assert "output       outputs/doc_summary\n" in inside
    text = f"# head\n\n{doc.BEGIN}\nold stuff\n{doc.END}\n\ntail\n"
    new = doc.replace_block(text, block)
    assert new.startswith(f"# head\n\n{doc.BEGIN}\n") and new.endswith(f"{doc.END}\n\ntail\n")
    assert "old stuff" not in new and block in new
    assert doc.replace_block(new, block) == new  # idempotent
    with pytest.raises(ValueError, match="markers"):
        doc.replace_block("# no markers\n", block)


def test_summary_record_is_the_last_summary(tmp_path):
    doc = _doc_summary()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"event": "epoch", "epoch": 1}\n{"event": "summary", "step": 3}\n')
    assert doc.summary_record(metrics)["step"] == 3
    metrics.write_text('{"event": "epoch", "epoch": 1}\n')
    with pytest.raises(ValueError, match="no 'summary'"):
        doc.summary_record(metrics)

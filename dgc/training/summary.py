"""Human-readable lines for the console: one saying what runs, one per epoch, one block at the end.

The end block warns when a run's test accuracy collapsed: more than ``COLLAPSE_POINTS`` points
below the known accuracy of dense training of the same model on the same data
(``KNOWN_DENSE``, figures measured with the commands their ``source`` gives).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["COLLAPSE_POINTS", "KNOWN_DENSE", "KnownDense", "RunDescription", "collapse_warning",
           "format_banner", "format_bytes", "format_epoch", "format_summary"]


def format_bytes(n: float) -> str:
    """``1234567`` -> ``'1.23 MB'`` (decimal units)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


@dataclass(kw_only=True, slots=True)
class RunDescription:
    """What a run trains, for the first console line."""

    model: str
    parameters: int
    data: str
    train_samples: int
    test_samples: int
    compression: str
    world_size: int
    backend: str
    device: str
    precision: str
    compiled: bool
    epochs: int
    steps_per_epoch: int
    batch_size: int
    config_file: str


def format_banner(d: RunDescription) -> str:
    """The one line the console starts with."""
    precision = {"32": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + loss scaling"}
    return (
        f"training {d.model} ({d.parameters:,} parameters) on {d.data} ({d.train_samples:,} train / "
        f"{d.test_samples:,} test) | {d.world_size} ranks ({d.backend}, {d.device}) | "
        f"{precision.get(d.precision, d.precision)}{', compiled' if d.compiled else ''} | "
        f"gradients: {d.compression} | {d.epochs} epochs x {d.steps_per_epoch} steps, batch "
        f"{d.batch_size} per rank | config: {d.config_file}"
    )


def _task(record: dict[str, Any], prefix: str) -> str:
    parts = [f"loss {record[f'{prefix}_loss']:.4f}"]
    if f"{prefix}_perplexity" in record:
        parts.append(f"ppl {record[f'{prefix}_perplexity']:.3f}")
    parts.append(f"acc {record[f'{prefix}_accuracy']:.2f}%")
    return " ".join(parts)


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    """One console line for an ``epoch`` record."""
    return (
        f"epoch {record['epoch']}/{epochs} step {record['step']} | train {_task(record, 'train')} | "
        f"test {_task(record, 'test')} | {record['step_time_s'] * 1e3:.1f} ms/step | "
        f"sent {format_bytes(record['bytes_sent_per_step'])}/step of "
        f"{format_bytes(record['dense_bytes_per_step'])} ({record['compression_ratio']:.1f}x), "
        f"density {100 * record['achieved_density']:.3g}%"
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class KnownDense:
    """The test accuracy dense training (plain allreduce, no pruning) reaches on one task."""

    model: str
    """The summary's ``model`` (class name), e.g. ``"CNN"``."""
    data: str
    """The summary's ``data`` (data set name), e.g. ``"mnist-5k"``."""
    accuracy: float
    """Test accuracy in percent."""
    epochs: float
    """Epochs the figure was trained for (a much shorter run may trail it without a fault)."""
    source: str
    """Where the figure comes from (a doc, or the command that measured it)."""


KNOWN_DENSE: tuple[KnownDense, ...] = (
    KnownDense(model="CNN", data="mnist-5k", accuracy=98.50, epochs=10,
               source="docs/parity.md: experiment=parity_mnist, 4 ranks"),
    KnownDense(model="CNN", data="sklearn-digits", accuracy=98.05, epochs=10,
               source="torchrun --nproc_per_node=2 launch/train.py experiment=digits"),
)
"""Dense test accuracy per model and data set; runs of other tasks get no collapse check."""

COLLAPSE_POINTS = 10.0
"""A run warns when its test accuracy ends more than this many points below ``KNOWN_DENSE``
(DGC at density 0.001 ends within 0.3-2.5 points on MNIST; a broken setting, e.g. pruning the
first convolution to 1 weight in 9, ends tens of points below)."""

MIN_EPOCHS = 1.0
"""Runs shorter than this (``train.max_steps`` checks) are not compared."""


def collapse_warning(record: dict[str, Any], *, points: float = COLLAPSE_POINTS,
                     known: tuple[KnownDense, ...] = KNOWN_DENSE) -> str | None:
    """The warning for a ``summary`` record whose accuracy collapsed, else None.

    None as well for tasks without a known dense figure, records without ``test_accuracy``
    (language models) and runs of under ``MIN_EPOCHS`` epochs.
    """
    acc = record.get("test_accuracy")
    if acc is None or record.get("epochs_done", 0.0) < MIN_EPOCHS:
        return None
    ref = next((k for k in known if k.model == record.get("model") and k.data == record.get("data")),
               None)
    if ref is None or ref.accuracy - acc <= points:
        return None
    return (f"test accuracy {acc:.2f}% after {record['epochs_done']:.3g} epochs is "
            f"{ref.accuracy - acc:.1f} points below dense training's {ref.accuracy:.2f}% for "
            f"{ref.model} on {ref.data} ({ref.epochs:g} epochs, {ref.source}): unless the run is "
            f"just short, its compression, pruning or activation settings broke training")


def format_summary(record: dict[str, Any]) -> str:
    """The block ``launch/train.py`` prints at the end of a run."""
    lines = [
        "=" * 72,
        "dgc training summary",
        "=" * 72,
        f"model        {record['model']} ({record['parameters']:,} parameters) on {record['data']}",
        f"processes    {record['world_size']} x {record['backend']} ({record['device']})"
        + (f", precision {record['precision']}" if "precision" in record else "")
        + (", compiled" if record.get("compiled") else ""),
        f"gradients    {record['compression']}",
        f"steps        {record['step']} ({record['epochs_done']:.2f} epochs), "
        f"{record['step_time_s'] * 1e3:.1f} ms/step, {record['train_seconds']:.1f} s training",
        f"test         {_task(record, 'test')}",
        f"traffic      per worker and step: sent {format_bytes(record['bytes_sent_per_step'])}, "
        f"received {format_bytes(record['bytes_received_per_step'])}; "
        f"dense gradients {format_bytes(record['dense_bytes_per_step'])}",
        f"compression  {record['compression_ratio']:.1f}x fewer bytes sent, achieved density "
        f"{100 * record['achieved_density']:.4g}% (whole run, warm-up included)",
    ]
    if "last_step_bytes_sent" in record:
        lines.append(
            f"last step    sent {format_bytes(record['last_step_bytes_sent'])}: "
            f"{record['last_step_compression_ratio']:.1f}x, achieved density "
            f"{100 * record['last_step_density']:.4g}%"
        )
    if record.get("skipped_steps"):
        lines.append(f"loss scale   {record['loss_scale']:g} at the end; skipped steps (float16 "
                     f"overflow, not applied): {record['skipped_steps']}")
    lines += [
        f"output       {record['out_dir']}",
    ]
    if "sparsity_report" in record:
        lines.append(f"sparsity     {record['sparsity_report']}")
    warning = collapse_warning(record)
    if warning is not None:
        lines.append(f"WARNING      {warning}")
    lines.append("=" * 72)
    return "\n".join(lines)

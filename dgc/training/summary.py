"""Human-readable lines for the console: one saying what runs, one per epoch, one block at the end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["RunDescription", "format_banner", "format_bytes", "format_epoch", "format_summary"]


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
    lines.append("=" * 72)
    return "\n".join(lines)

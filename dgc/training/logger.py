"""Where metrics go: a JSONL file always (rank 0), Weights & Biases with ``logger=wandb``.

Human-readable lines go through :mod:`logging` (the loop logs them on rank 0); this class keeps
the machine-readable records.  Each record is a flat dict with an ``event`` key: ``step``
(every ``log_every`` steps), ``epoch`` (after each epoch's evaluation), ``summary`` (once, at the
end).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = ["MetricsLogger", "Progress", "WandbConfig", "progress"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class WandbConfig:
    """Weights & Biases run settings (``logger=wandb``)."""

    project: str = "dgc"
    """Project name."""
    entity: str | None = None
    """Team or user; None = wandb's default."""
    name: str | None = None
    """Run name; None = wandb picks one."""
    group: str | None = None
    """Group runs together (e.g. one parity study)."""
    tags: list[str] = field(default_factory=list)
    """Run tags."""
    mode: str = "offline"
    """"offline" (default: writes under ``dir``, upload later with ``wandb sync``), "online"
    (needs ``WANDB_API_KEY`` or ``wandb login``), or "disabled"."""
    dir: str | None = None
    """Where wandb writes; None = the run's output folder."""


class MetricsLogger:
    """JSONL (+ wandb) sink of metric records; does nothing on ranks other than 0.

    Args:
        jsonl: file name of the JSONL log inside the run's output folder.
        log_every: steps between ``step`` records (and the loss all-reduce that feeds them).
        progress: show progress on rank 0: a tqdm bar on a terminal; when the output is captured
            (stderr is not a TTY) a plain log line at most every ``progress_interval_s`` instead.
        progress_interval_s: seconds between those plain progress lines.
        wandb: :class:`WandbConfig` fields, or None for no wandb.
    """

    def __init__(self, *, jsonl: str = "metrics.jsonl", log_every: int = 10, progress: bool = True,
                 progress_interval_s: float = 60.0,
                 wandb: WandbConfig | dict[str, Any] | None = None) -> None:
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"logger.log_every = {log_every!r} is invalid: it must be an integer >= 1.")
        if not progress_interval_s > 0:
            raise ValueError(f"logger.progress_interval_s = {progress_interval_s!r} is invalid: it "
                             "must be > 0 (seconds).")
        if not jsonl or "/" in jsonl:
            raise ValueError(f"logger.jsonl = {jsonl!r} is invalid: give a file name (no folder); "
                             "it is written in the run's output folder.")
        if isinstance(wandb, dict):
            wandb = WandbConfig(**wandb)
        if wandb is not None:
            if wandb.mode not in ("offline", "online", "disabled"):
                raise ValueError(f"logger.wandb.mode = {wandb.mode!r} is invalid: use offline, "
                                 "online or disabled.")
            try:
                import wandb as _  # noqa: F401
            except ImportError as e:
                raise ValueError("logger=wandb needs the wandb package: pip install -e .[wandb] "
                                 "(or use the default logger=jsonl).") from e
        self.jsonl = jsonl
        self.log_every = log_every
        self.progress = progress
        self.progress_interval_s = progress_interval_s
        self.wandb_config = wandb
        self.path: Path | None = None
        self._file: IO[str] | None = None
        self._run: Any = None

    def open(self, out_dir: str | Path, *, enabled: bool, config: dict[str, Any] | None = None,
             append: bool = False) -> None:
        """Start writing (rank 0 only: ``enabled``).  ``append`` continues a resumed run's file."""
        if not enabled:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / self.jsonl
        cut = append and self.path.exists() and not self.path.read_bytes().endswith(b"\n")
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115
        if cut and self.path.stat().st_size:  # a line cut off by a crash must not swallow the next
            self._file.write("\n")
        if self.wandb_config is not None:
            import wandb

            c = self.wandb_config
            self._run = wandb.init(project=c.project, entity=c.entity, name=c.name, group=c.group,
                                   tags=list(c.tags), mode=c.mode, dir=c.dir or str(out),
                                   config=config, resume="allow" if append else None)

    def log(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(_plain(record)) + "\n")
            self._file.flush()
        if self._run is not None:
            data = {f"{record['event']}/{k}": v for k, v in record.items()
                    if k not in ("event", "step") and isinstance(v, int | float)}
            self._run.log(data, step=int(record.get("step", 0)))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._run is not None:
            self._run.finish()
            self._run = None


class Progress:
    """Progress through an epoch, readable on a terminal and in a captured log.

    On a terminal: a tqdm bar (log lines printed above it).  Otherwise (output captured to a file,
    a job scheduler): no carriage-return animation, but one ``logging`` line at most every
    ``interval_s`` seconds.  Disabled (other ranks, ``logger.progress=false``): nothing.
    """

    def __init__(self, *, enabled: bool, interval_s: float = 60.0, tty: bool | None = None) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.interval_s = interval_s
        self.total = self.n = 0
        self.description = ""
        self.postfix = ""
        self._last = time.monotonic()
        self._bar: Any = None
        self._redirect = contextlib.ExitStack()
        if enabled and self.tty:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=0, dynamic_ncols=True, leave=False)
            self._redirect.enter_context(logging_redirect_tqdm())  # log lines above the bar

    def start(self, description: str, total: int, done: int = 0) -> None:
        """A new epoch of ``total`` steps, ``done`` of them already (a resumed run)."""
        self.description, self.total, self.n, self.postfix = description, total, done, ""
        if self._bar is not None:
            self._bar.reset(total=total)
            self._bar.update(done)
            self._bar.set_description(description)

    def update(self, **postfix: str) -> None:
        """One more step; ``postfix``: the latest figures (loss, bytes sent)."""
        self.n += 1
        if postfix:
            self.postfix = ", ".join(f"{k} {v}" for k, v in postfix.items())
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)
        elif self.enabled and time.monotonic() - self._last >= self.interval_s:
            self._last = time.monotonic()
            log.info("%s: step %d/%d%s", self.description, self.n, self.total,
                     f" | {self.postfix}" if self.postfix else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._redirect.close()


def progress(enabled: bool, interval_s: float = 60.0) -> Progress:
    """The :class:`Progress` of a run (``enabled``: rank 0 with ``logger.progress``)."""
    return Progress(enabled=enabled, interval_s=interval_s)


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy: NaN/inf become None."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}

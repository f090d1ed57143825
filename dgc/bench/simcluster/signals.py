"""SIGINT/SIGTERM/SIGHUP unwind through ``finally`` (as :class:`Interrupted`); a teardown in
progress is not interrupted: signals that arrive during it are raised once it is done."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from .errors import Interrupted

__all__ = ["handle_signals", "signals_deferred"]

_deferred: list[int] | None = None
_HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _on_signal(signum: int, frame: object) -> None:
    if _deferred is not None:
        _deferred.append(signum)  # during teardown: finish cleaning up first
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Turn SIGINT/SIGTERM/SIGHUP into :class:`Interrupted` in the main thread, for the block."""
    previous = {s: signal.getsignal(s) for s in _HANDLED}
    for s in previous:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold the signals :func:`handle_signals` catches until the block is done (nestable)."""
    global _deferred
    if _deferred is not None:  # nested
        yield
        return
    _deferred = []
    try:
        yield
    finally:
        pending, _deferred = _deferred, None
        if pending:
            raise Interrupted(pending[0])

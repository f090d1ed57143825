"""The one error the simulated cluster raises, and the exception a signal turns into."""

from __future__ import annotations

import signal

__all__ = ["Interrupted", "SimClusterError"]


class SimClusterError(RuntimeError):
    """The cluster cannot be set up, checked or torn down; the message says why and how to fix."""


class Interrupted(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM/SIGHUP while :func:`signals.handle_signals`
    is active (a ``BaseException``: it unwinds through ``finally`` blocks, which clean up)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

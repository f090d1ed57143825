"""One communication step's outcome across all its buckets: commit everything, or undo everything.

DDP runs one hook per bucket and each bucket's callback on its own, in any order.  A non-finite
gradient shows up in one bucket's messages, but the step as a whole must then leave every residual as
it was (nothing applied, nothing lost), including the buckets that were delivered fine.  So the
callbacks do not clear residuals themselves; they register what to do on success (``commit``: clear the
delivered dense payloads) and on failure (``undo``: put this worker's sent pairs back), and the *last*
callback of the step settles it: it runs the commits, or the undos and then raises.  Raising from the
last callback also means that when ``backward()`` raises, every bucket has been settled: the state can be
inspected or checkpointed right away.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["StepLedger"]


@dataclass(kw_only=True)
class StepLedger:
    """The buckets of one step: how many were launched, how many settled, and what failed."""

    step: int
    launched: int = 0
    total: int | None = None
    """Buckets of the step, known once the last one is launched."""
    done: int = 0
    failures: list[str] = field(default_factory=list)
    """Who sent non-finite gradients, one entry per failed bucket."""
    on_success: list[Callable[[], None]] = field(default_factory=list)
    on_failure: list[Callable[[], None]] = field(default_factory=list)
    settled: bool = False
    """Every bucket of the step has settled."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def launch(self, last: bool) -> None:
        """A bucket's collective was launched (``last``: ``GradBucket.is_last()``)."""
        with self._lock:
            self.launched += 1
            if last:
                self.total = self.launched

    def settle(
        self,
        *,
        failed: str | None,
        commit: Callable[[], None] | None = None,
        undo: Callable[[], None] | None = None,
    ) -> list[str] | None:
        """A bucket's callback is done.  Returns None, or, from the callback that settles a failed step
        (after every undo ran), the failures to report."""
        with self._lock:
            if failed is not None:
                self.failures.append(failed)
            if commit is not None:
                self.on_success.append(commit)
            if undo is not None:
                self.on_failure.append(undo)
            self.done += 1
            if self.total is None or self.done < self.total:
                return None
            self.settled = True
            actions = self.on_failure if self.failures else self.on_success
            for act in actions:
                act()
            self.on_success.clear()
            self.on_failure.clear()
            return list(self.failures) if self.failures else None

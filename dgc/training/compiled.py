"""``train.compile=true``: ``torch.compile`` of the wrapped (DDP) model.

Dynamo splits the graph at DDP's bucket boundaries (``torch._dynamo.config.optimize_ddp``), and the
gradients still reach DDP's reducer, so the comm hook (DGC's included) runs exactly as in eager
mode.  Compilation happens at the first forward pass; a backend that cannot work here fails early
where that can be known (inductor on a CPU without a C++ compiler), and otherwise at that first
step, with an error naming ``train.compile``.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from torch._dynamo.exc import BackendCompilerFailed

__all__ = ["CompileError", "check_compile", "compile_model", "explain"]

log = logging.getLogger(__name__)


class CompileError(RuntimeError):
    """``torch.compile`` failed for ``train.compile=true``."""


def check_compile(backend: str) -> None:
    """Raise ``ValueError`` if ``backend`` cannot run on this machine (called before any process
    group starts): inductor on CPUs compiles C++ and needs a compiler."""
    if backend != "inductor" or torch.cuda.is_available():
        return
    compilers = [os.environ.get("CXX") or "", "g++", "c++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        raise ValueError("train.compile=true with train.compile_backend=inductor needs a C++ compiler "
                         "on CPUs (none of $CXX, g++, c++, clang++ is on PATH): install g++, or set "
                         "train.compile_backend=aot_eager, or train.compile=false.")


def compile_model(model: nn.Module, backend: str) -> nn.Module:
    """``torch.compile(model, backend=backend)`` (an ``OptimizedModule`` sharing ``model``'s
    parameters)."""
    log.info("train.compile: torch.compile(backend=%s); the first step compiles", backend)
    return torch.compile(model, backend=backend)


def explain(error: BackendCompilerFailed, backend: str) -> CompileError:
    """A compile failure, as an error that names the setting and the ways out."""
    cause = error.inner_exception
    first = (str(cause).strip().splitlines() or [""])[0]
    return CompileError(f"train.compile=true: torch.compile(backend={backend!r}) failed: "
                        f"{type(cause).__name__}: {first}. Set train.compile_backend=aot_eager "
                        "(no code generation) or train.compile=false.")

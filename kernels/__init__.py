"""Selection, packing and unpacking kernels: CuPy (CUDA C) on GPUs, compiled C++ on CPUs, pure-torch
twins everywhere.

Installed as ``dgc.kernels``.  :func:`backend_for` picks the implementation for a tensor: under ``"auto"``
the CuPy module for CUDA tensors when CuPy imports, the compiled CPU module (:mod:`.cpu_fused`) for CPU
tensors when it builds, else :mod:`.reference` (the torch twins, also what ``"torch"`` asks for).  All
expose the same functions with the same semantics (``select_topk``, ``compress_step``,
``scatter_unpack``, ``block_absmax``, ``dense_momentum``); :mod:`.plain` holds the unfused steps 0-5, the test oracle.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Literal

import torch

from . import reference

__all__ = ["Backend", "backend_for", "cpu_fused_available", "cupy_available", "reference"]

Backend = Literal["auto", "torch", "cupy"]


@functools.cache
def _cupy_module() -> ModuleType | None:
    try:
        from . import cupy_backend
    except ImportError:  # CuPy not installed, or no CUDA driver: the torch twins serve.
        return None
    return cupy_backend if cupy_backend.is_available() else None


def cupy_available() -> bool:
    """True when the CuPy kernels can run here (CuPy imports and a CUDA device is visible)."""
    return _cupy_module() is not None


def cpu_fused_available() -> bool:
    """True when the compiled CPU kernels run here (a C++ compiler built them; see :mod:`.cpu_fused`)."""
    from . import cpu_fused

    return cpu_fused.is_available()


def backend_for(device: torch.device, preference: Backend = "auto") -> ModuleType:
    """The kernel module for tensors on ``device``.

    ``"auto"``: CuPy kernels for CUDA tensors and compiled kernels for CPU tensors when available, the
    torch twins otherwise.  ``"torch"``: always the torch twins.  ``"cupy"``: the CuPy kernels; raises
    when they cannot run.
    """
    if preference not in ("auto", "torch", "cupy"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'cupy', got {preference!r}")
    if preference == "auto" and device.type == "cpu" and cpu_fused_available():
        from . import cpu_fused

        return cpu_fused
    if preference == "torch" or (preference == "auto" and device.type != "cuda"):
        return reference
    module = _cupy_module()
    if module is None or device.type != "cuda":
        if preference == "cupy":
            raise RuntimeError(
                "backend='cupy' needs CUDA tensors and CuPy (pip install 'dgc[cuda]'); "
                f"got a {device.type} tensor{'' if module else ' and CuPy is unavailable'}. "
                "Use backend='auto' to fall back to the torch twins."
            )
        return reference
    return module

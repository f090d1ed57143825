"""Compiling a kernel's C++ source into a cached shared library, shared by the compiled CPU passes
(:mod:`.cpu_fused`, :mod:`.quant_fused`).

``g++`` (or ``$CXX``) compiles the source once per source text, flags, compiler version and CPU into
``$DGC_KERNEL_CACHE`` (default ``~/.cache/dgc/kernels``); several ranks may build at once (each writes a
temporary file and renames it into place).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["FLAGS", "cache_dir", "compile_cached", "cpu_flags"]

FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC")
"""``-ffp-contract=off``: no fused multiply-add except where the source asks for one (bit-compatibility)."""


def cache_dir() -> Path:
    """Where built libraries are kept: ``$DGC_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/dgc/kernels``."""
    if os.environ.get("DGC_KERNEL_CACHE"):
        return Path(os.environ["DGC_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dgc" / "kernels"


def cpu_flags() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags (a shared cache never hands a build to
    a CPU without the instructions it uses)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def compile_cached(source: Path, stem: str, flags: Sequence[str] = FLAGS) -> Path:
    """Compile ``source`` (once; cached as ``<stem>-<key>.so``) and return the shared library's path.

    Raises ``RuntimeError`` when no compiler is found or the compilation fails.
    """
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'g++')} not on PATH; set CXX)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(
        "\0".join([source.read_text(), " ".join(flags), version, platform.machine(), cpu_flags()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"{stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)  # several ranks may build at once
    os.close(fd)
    try:
        done = subprocess.run([cxx, *flags, "-o", tmp, str(source)], capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"{cxx} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target

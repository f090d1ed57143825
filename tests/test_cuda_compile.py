"""The CUDA sources compile with nvcc for sm_75, sm_80 and sm_90, without a single warning (no GPU needed).

``launch/compile_kernels.sh`` holds the flags (``--Werror all-warnings``, and ptxas errors on double-
precision instructions, spills and local memory); these tests run it on the package's sources, on the
exact text CuPy hands to NVRTC, and on a deliberately bad file (so a broken check cannot pass).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "compile_kernels.sh"
KERNELS = ROOT / "kernels"

needs_nvcc = pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="nvcc is not on the PATH (no CUDA toolkit)"
)


def _compile(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, files)], capture_output=True, text=True, timeout=280
    )


def test_compile_script_is_executable():
    # .ci/run calls it only when it is executable: a lost mode bit would silently drop the check.
    assert SCRIPT.is_file() and os.access(SCRIPT, os.X_OK)


@needs_nvcc
@pytest.mark.timeout(300)
def test_every_source_compiles_for_sm75_sm80_and_sm90():
    res = _compile()  # every file for both archs, plus all of them in one translation unit
    assert res.returncode == 0, res.stdout + res.stderr
    sources = sorted(KERNELS.glob("*.cu"))
    assert sources, "no CUDA sources found"
    for src in sources:
        for arch in ("75", "80", "90"):
            assert re.search(rf"^ok\s+sm_{arch}\s+kernels/{src.name}$", res.stdout, re.M), res.stdout
    for arch in ("75", "90"):  # NVRTC compiles them as one module for the device at hand
        assert re.search(rf"^ok\s+sm_{arch}\s+\(all kernels in one translation unit\)$", res.stdout, re.M)


@needs_nvcc
@pytest.mark.timeout(300)
def test_source_given_to_nvrtc_compiles(tmp_path):
    cupy_backend = pytest.importorskip(
        "dgc.kernels.cupy_backend", reason="CuPy is not installed", exc_type=ImportError
    )
    src = tmp_path / "nvrtc_input.cu"
    src.write_text(cupy_backend.kernel_source())
    res = _compile(src)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"^ok\s+sm_80\s+.*nvrtc_input\.cu$", res.stdout, re.M), res.stdout


@needs_nvcc
@pytest.mark.timeout(300)
def test_a_warning_fails_the_check(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text(f'#include "{KERNELS / "dgc_common.cuh"}"\n'
                   'extern "C" __global__ void bad(float* p) { int unused = 1; p[0] = 2.0f; }\n')  # fmt: skip
    res = _compile(bad)
    assert res.returncode != 0
    assert "FAIL" in res.stdout and "unused" in res.stdout

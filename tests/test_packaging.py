"""The package installs as a wheel with ``kernels/`` mapped to ``dgc.kernels``, and the README example runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(240)
def test_wheel_contains_kernels_and_imports(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("dgc-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import dgc, dgc.kernels, pathlib; "
        "assert 'site' in dgc.kernels.__file__, dgc.kernels.__file__; "
        "from dgc.kernels import reference; "
        "print(sorted(p.name for p in pathlib.Path(dgc.kernels.__file__).parent.glob('*.cu')))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    sources = sorted(p.name for p in (ROOT / "kernels").glob("*.cu"))
    assert out.stdout.strip() == str(sources), "every CUDA source must ship in the wheel"


@pytest.mark.timeout(180)
def test_readme_ddp_example_runs_on_two_processes(tmp_path):
    readme = (ROOT / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "class ToyModel" in b)
    assert "ddp_model.register_comm_hook(state, dgc.ddp_comm_hook)" in example  # the one line
    script = tmp_path / "toy.py"
    script.write_text(example)
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
        capture_output=True,
        text=True,
        timeout=170,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    match = re.search(r"loss ([0-9.]+), sent (\d+) B of (\d+) B", out.stdout)
    assert match, out.stdout
    assert int(match.group(2)) < int(match.group(3))  # really compressed

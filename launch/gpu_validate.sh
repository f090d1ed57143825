#!/usr/bin/env bash
# One prepared GPU check of dgc.kernels (issue 4): install what is missing, run the GPU tests and the
# kernel benchmark, and leave everything in one folder to report.
#
#   bash launch/gpu_validate.sh                 # results in ./gpu_validation (or OUT=/some/dir)
#   SKIP_INSTALL=1 bash launch/gpu_validate.sh  # the environment is ready: no pip at all
#   QUICK=1 bash launch/gpu_validate.sh         # skip the 100M-element cases (a short device lease)
#
# Writes: device.txt (nvidia-smi, torch/CuPy versions, compute capability), pytest_gpu.log and
# pytest_gpu.xml (`pytest -m gpu`), bench_kernels.log and bench_kernels.json (CuPy kernels vs the torch
# twin on the same GPU vs torch.topk vs x.clone(), GB/s and fraction of peak), summary.txt.
# Exits non-zero when a GPU test failed or the benchmark did not run; the benchmark runs either way.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_validation}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
log() { echo "gpu_validate: $*" | tee -a "$OUT/summary.txt"; }
: >"$OUT/summary.txt"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    log "no NVIDIA GPU visible (nvidia-smi): nothing to validate here"
    exit 2
fi

# 1. What is missing: torch with CUDA, CuPy for the installed CUDA major, the project with its test extra.
if [ -z "${SKIP_INSTALL:-}" ]; then
    if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        log "installing a CUDA build of torch"
        "$PY" -m pip install -q torch || { log "could not install torch"; exit 1; }
    fi
    cuda_major=$("$PY" -c 'import torch; print((torch.version.cuda or "12").split(".")[0])')
    if ! "$PY" -c 'import cupy' 2>/dev/null; then
        log "installing cupy-cuda${cuda_major}x"
        "$PY" -m pip install -q "cupy-cuda${cuda_major}x" || log "could not install CuPy: the kernel tests will skip"
    fi
    if ! "$PY" -c 'import dgc, pytest, hypothesis, pytest_timeout' 2>/dev/null; then
        log "installing dgc with its test extra"
        "$PY" -m pip install -q -e '.[test]' || { log "could not install dgc[test]"; exit 1; }
    fi
fi

# 2. The device, as the figures will be reported.
{
    nvidia-smi
    "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
p = torch.cuda.get_device_properties(0)
print(f"device {p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
      f"{p.total_memory / 2**30:.1f} GiB")
try:
    import cupy
    from dgc.kernels import cupy_available
    print("cupy", cupy.__version__, "kernels available:", cupy_available())
except Exception as exc:  # reported, the tests then skip and say why
    print("cupy unavailable:", exc)
EOF
} >"$OUT/device.txt" 2>&1
log "$(grep -m1 '^device' "$OUT/device.txt")"

# 3. The GPU tests: kernels vs twins (1 element to 100M, every wire dtype), dispatch, the NCCL hook.
select=()
[ -n "${QUICK:-}" ] && select=(-k "not 100000000")
"$PY" -m pytest -m gpu -q -p no:cacheprovider -rs --junitxml="$OUT/pytest_gpu.xml" "${select[@]}" tests \
    >"$OUT/pytest_gpu.log" 2>&1
tests_rc=$?
log "pytest -m gpu: $(tail -1 "$OUT/pytest_gpu.log") (rc=$tests_rc)"
if grep -q "skipped" "$OUT/pytest_gpu.log" && ! grep -q " passed" "$OUT/pytest_gpu.log"; then
    log "every GPU test skipped: see the reasons in pytest_gpu.log"
    tests_rc=1
fi

# 4. The kernel benchmark on 25M float32 elements at density 0.001, then the other wire dtypes.
bench_rc=0
"$PY" launch/bench_kernels.py --device cuda --json "$OUT/bench_kernels.json" >"$OUT/bench_kernels.log" 2>&1 \
    || bench_rc=$?
for wire in float16 bfloat16; do
    "$PY" launch/bench_kernels.py --device cuda --wire "$wire" --repeats 10 >>"$OUT/bench_kernels.log" 2>&1 \
        || bench_rc=$?
done
log "bench_kernels: rc=$bench_rc (bench_kernels.log)"
grep -iE "peak|compress_step|fused" "$OUT/bench_kernels.log" | head -20 | tee -a "$OUT/summary.txt"

[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

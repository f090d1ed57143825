#!/usr/bin/env bash
# Build and install Horovod 0.28.1 with PyTorch support into the *current* Python environment.
#
# Why a script: Horovod 0.28.1 (the last release) does not build against PyTorch 2.x as shipped,
# because its CMakeLists ask for C++14 while PyTorch's headers need C++17. We fetch the sdist from
# the package index, change `set(CMAKE_CXX_STANDARD 14)` to 17, and build it against the installed
# torch (no build isolation, so it links the torch you already have).
#
#   * Gloo is always built (no MPI needed): run with `horovodrun --gloo -np 2 ...`.
#   * NCCL (HOROVOD_GPU_OPERATIONS=NCCL) only where torch is a CUDA build and nvcc is found.
#   * CMake: Horovod's bundled gloo needs CMake < 4 (CMake 4 refuses its old
#     cmake_minimum_required). We use the first cmake < 4 found (PATH, then /usr/bin, /usr/local/bin)
#     and put it first on PATH; set HOROVOD_CMAKE=/path/to/cmake to choose one.
#   * Idempotent: exits 0 at once when Horovod $HOROVOD_VERSION is installed with its PyTorch
#     extension and Gloo (and NCCL where this script would build it); otherwise says why and builds.
#
# Usage (from the repo root, inside the venv you train with):
#   source .venv/bin/activate && bash launch/install_horovod.sh
# Environment knobs: HOROVOD_VERSION (default 0.28.1), HOROVOD_CMAKE, HOROVOD_GPU_OPERATIONS
# (overrides the NCCL detection; set to "" for a CPU-only build), MAX_JOBS (parallel compile jobs,
# default: number of cores), FORCE=1 (rebuild even if Horovod already works).
set -euo pipefail

HOROVOD_VERSION="${HOROVOD_VERSION:-0.28.1}"
PYTHON="${PYTHON:-python}"

die() { echo "install_horovod: ERROR: $*" >&2; exit 1; }
say() { echo "install_horovod: $*"; }

command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found; activate your virtualenv first."
say "python: $(command -v "$PYTHON") ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])'))"

# --- 0. Already installed? ----------------------------------------------------------------------
# Usable = Horovod $HOROVOD_VERSION, its PyTorch extension imports, Gloo is built in, and NCCL too
# where step 2 would build it (torch is a CUDA build and nvcc is found, or HOROVOD_GPU_OPERATIONS=NCCL).
# Prints one line: what is installed, or why it is not usable.
check_horovod() {
  local nvcc=0
  command -v nvcc >/dev/null 2>&1 && nvcc=1
  HVD_WANT_VERSION="$HOROVOD_VERSION" HVD_NVCC="$nvcc" HVD_OPS_SET="${HOROVOD_GPU_OPERATIONS+1}" \
    HVD_OPS="${HOROVOD_GPU_OPERATIONS:-}" "$PYTHON" - <<'EOF' 2>&1 | tail -n1
import os
import sys

try:
    import horovod
    import horovod.torch as hvd
    from horovod.common.util import extension_available
except Exception as e:  # noqa: BLE001
    sys.exit(f"horovod.torch does not import ({type(e).__name__}: {e})".splitlines()[0])
import torch

want = os.environ["HVD_WANT_VERSION"]
if os.environ["HVD_OPS_SET"]:
    want_nccl = os.environ["HVD_OPS"] == "NCCL"
else:
    want_nccl = bool(torch.version.cuda) and os.environ["HVD_NVCC"] == "1"
gloo, nccl = bool(hvd.gloo_built()), bool(hvd.nccl_built())
problems = []
if horovod.__version__ != want:
    problems.append(f"version {horovod.__version__}, not HOROVOD_VERSION={want}")
if not extension_available("torch"):
    problems.append("built without PyTorch")
if not gloo:
    problems.append("built without Gloo")
if want_nccl and not nccl:
    problems.append("built without NCCL, which this script builds here (CUDA torch + nvcc, or HOROVOD_GPU_OPERATIONS=NCCL)")
if problems:
    sys.exit(f"horovod {horovod.__version__} is installed but " + "; ".join(problems))
print(f"horovod {horovod.__version__}: torch extension OK, gloo={gloo}, nccl={nccl}")
EOF
}
if [[ "${FORCE:-0}" == "1" ]]; then
  say "FORCE=1: rebuilding"
elif out="$(check_horovod)"; then
  say "already installed: $out"
  exit 0
else
  say "${out:-no usable Horovod}: building horovod==$HOROVOD_VERSION"
fi

# --- 1. Prerequisites ---------------------------------------------------------------------------
"$PYTHON" -c 'import torch' 2>/dev/null \
  || die "PyTorch is not importable from $PYTHON; install torch first (pip install torch==2.13.0)."

cmake_major() { "$1" --version 2>/dev/null | head -n1 | sed -E 's/[^0-9]*([0-9]+)\..*/\1/'; }
CMAKE_BIN=""
candidates=()
[[ -n "${HOROVOD_CMAKE:-}" ]] && candidates+=("$HOROVOD_CMAKE")
while IFS= read -r c; do candidates+=("$c"); done < <(type -ap cmake 2>/dev/null || true)
candidates+=(/usr/bin/cmake /usr/local/bin/cmake)
seen_new=""
for c in "${candidates[@]}"; do
  [[ -x "$c" ]] || continue
  major="$(cmake_major "$c")"
  [[ -n "$major" ]] || continue
  if (( major < 4 )); then CMAKE_BIN="$c"; break; fi
  seen_new="$seen_new $c($("$c" --version | head -n1 | awk '{print $3}'))"
done
if [[ -z "$CMAKE_BIN" ]]; then
  if [[ -n "$seen_new" ]]; then
    die "only CMake >= 4 found:$seen_new. Horovod's bundled gloo needs CMake 3.x:" \
        "install it (apt-get install cmake, or pip install 'cmake<4') and/or set HOROVOD_CMAKE."
  fi
  die "cmake not found. Install CMake 3.x (apt-get install cmake, or pip install 'cmake<4')."
fi
say "cmake: $CMAKE_BIN ($("$CMAKE_BIN" --version | head -n1))"
CXX_BIN="${CXX:-}"
if [[ -z "$CXX_BIN" ]]; then
  for c in g++ c++ clang++; do command -v "$c" >/dev/null 2>&1 && { CXX_BIN="$(command -v "$c")"; break; }; done
fi
[[ -n "$CXX_BIN" ]] || die "no C++ compiler found (g++/c++/clang++). Install one (apt-get install g++)."
command -v "${CC:-gcc}" >/dev/null 2>&1 || command -v cc >/dev/null 2>&1 \
  || die "no C compiler found (gcc/cc). Install one (apt-get install gcc)."
command -v make >/dev/null 2>&1 || die "make not found. Install it (apt-get install make)."
say "c++: $CXX_BIN ($("$CXX_BIN" --version | head -n1))"

# Python packages Horovod's setup.py and runtime need (it is installed with --no-deps,
# but without build isolation the build-time ones must already be present).
say "installing build/runtime helpers (cloudpickle psutil pyyaml packaging wheel setuptools)"
"$PYTHON" -m pip install --quiet cloudpickle psutil pyyaml packaging wheel setuptools

# --- 2. GPU operations --------------------------------------------------------------------------
if [[ -z "${HOROVOD_GPU_OPERATIONS+set}" ]]; then
  torch_cuda="$("$PYTHON" -W ignore -c 'import torch; print(torch.version.cuda or "")')"
  if [[ -n "$torch_cuda" ]] && command -v nvcc >/dev/null 2>&1; then
    export HOROVOD_GPU_OPERATIONS=NCCL
    # pip's torch ships NCCL as the nvidia-nccl-cu* wheel; point Horovod at it if present.
    nccl_home="$("$PYTHON" -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__) if nvidia.nccl.__file__ else list(nvidia.nccl.__path__)[0])' 2>/dev/null || true)"
    if [[ -n "$nccl_home" && -z "${HOROVOD_NCCL_HOME:-}" ]]; then
      export HOROVOD_NCCL_HOME="$nccl_home"
      libs=("$nccl_home"/lib/libnccl.so.*)
      [[ -e "$nccl_home/lib/libnccl.so" || ! -e "${libs[0]}" ]] \
        || ln -sf "${libs[0]}" "$nccl_home/lib/libnccl.so" 2>/dev/null || true
    fi
    say "torch CUDA $torch_cuda + nvcc found: building with NCCL (HOROVOD_NCCL_HOME=${HOROVOD_NCCL_HOME:-system})"
  elif [[ -n "$torch_cuda" ]]; then
    echo "install_horovod: WARNING: torch is a CUDA $torch_cuda build but nvcc is not on PATH:" \
         "building Horovod WITHOUT NCCL (Gloo only; GPU tensors are staged through host memory)." \
         "Put the CUDA toolkit's bin/ on PATH and rerun with FORCE=1 for NCCL." >&2
  else
    say "torch is a CPU build: CPU-only build (Gloo)"
  fi
else
  say "HOROVOD_GPU_OPERATIONS='${HOROVOD_GPU_OPERATIONS}' (from environment)"
  [[ -n "$HOROVOD_GPU_OPERATIONS" ]] || unset HOROVOD_GPU_OPERATIONS
fi

# --- 3. Fetch, patch, build ---------------------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)
say "downloading horovod==$HOROVOD_VERSION sdist into $WORK"
# --no-build-isolation: pip reads the sdist's metadata with the packages installed above instead
# of fetching a separate build environment.
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
  -d "$WORK" "horovod==$HOROVOD_VERSION" \
  || die "pip download horovod==$HOROVOD_VERSION failed (pip's output above): check HOROVOD_VERSION" \
         "and that the package index is reachable."
sdists=("$WORK"/horovod-*.tar.gz)  # the pattern itself when nothing matched
[[ -f "${sdists[0]}" ]] || die "pip download gave no horovod-$HOROVOD_VERSION sdist (.tar.gz) in" \
  "$WORK (it holds: $(cd "$WORK" && echo *)); the index must serve the source distribution."
sdist="${sdists[0]}"
tar -xzf "$sdist" -C "$WORK"
SRC="$WORK/horovod-$HOROVOD_VERSION"
[[ -d "$SRC" ]] || die "unexpected sdist layout: $(ls "$WORK")"

for f in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
  [[ -f "$f" ]] || die "missing $f in the sdist; is HOROVOD_VERSION=$HOROVOD_VERSION right?"
  if grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f"; then
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
    say "patched C++14 -> C++17 in ${f#"$SRC"/}"
  elif ! grep -q 'set(CMAKE_CXX_STANDARD 17)' "$f"; then
    say "warning: no CMAKE_CXX_STANDARD line in ${f#"$SRC"/}; building unpatched"
  fi
done

# The system cmake must win over a PyPI cmake>=4 that may sit in the venv's bin/.
PATH="$(dirname "$CMAKE_BIN"):$PATH"
export PATH
export HOROVOD_CMAKE="$CMAKE_BIN"
export CXX="$CXX_BIN"
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1
export HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export CMAKE_BUILD_PARALLEL_LEVEL="$MAX_JOBS" MAKEFLAGS="-j$MAX_JOBS"
say "building (this takes ~6 minutes on 2 cores)"
(cd "$SRC" && "$PYTHON" -m pip install --no-build-isolation --no-deps --no-cache-dir -v . \
  > "$WORK/build.log" 2>&1) || { tail -n 60 "$WORK/build.log" >&2; die "build failed (log tail above)"; }
end=$(date +%s)

# --- 4. Verify ----------------------------------------------------------------------------------
out="$(check_horovod)" || die "installed, but not usable: $out"
say "$out"
say "built in $((end - start)) s"
HVDRUN="$(dirname "$(command -v "$PYTHON")")/horovodrun"
[[ -x "$HVDRUN" ]] || HVDRUN="horovodrun"
if "$HVDRUN" -np 2 --gloo "$PYTHON" -c \
  'import horovod.torch as hvd, torch; hvd.init(); s = hvd.allreduce(torch.ones(1), op=hvd.Sum); assert s.item() == hvd.size() == 2' \
  >"$WORK/run.log" 2>&1; then
  say "horovodrun -np 2 --gloo: OK"
else
  cat "$WORK/run.log" >&2
  die "horovodrun -np 2 --gloo smoke test failed (output above)"
fi

#!/usr/bin/env bash
# Compile every CUDA source of dgc.kernels (kernels/*.cu) with nvcc for sm_75 (T4; bfloat16 casts in integer arithmetic), sm_80 (A100) and sm_90 (H100):
# each file on its own, and all of them in one translation unit (as NVRTC gets them from
# cupy_backend.kernel_source()).  Fails on any error or warning, ptxas included (double-precision
# instructions, register spills, local memory).  Needs nvcc, not a GPU.
#
#   bash launch/compile_kernels.sh                # NVCC=/path/to/nvcc and JOBS=N are honoured
#   bash launch/compile_kernels.sh a.cu b.cu      # those files instead of kernels/*.cu
#   PTX_DIR=out bash launch/compile_kernels.sh    # also keep the PTX of each file for each arch
set -euo pipefail
given=()
for src in "$@"; do given+=("$(cd "$(dirname "$src")" && pwd)/$(basename "$src")"); done  # before the cd
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
ARCHS=(75 80 90)
FLAGS=(-std=c++17 --Werror all-warnings
       -Xptxas --warn-on-double-precision-use,--warn-on-spills,--warn-on-local-memory-usage)

if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "compile_kernels: '$NVCC' not found: install the CUDA toolkit or set NVCC=/path/to/nvcc" >&2
    exit 1
fi
shopt -s nullglob
if [ ${#given[@]} -gt 0 ]; then
    sources=("${given[@]}")
else
    sources=(kernels/*.cu)
fi
if [ ${#sources[@]} -eq 0 ]; then
    echo "compile_kernels: no kernels/*.cu found" >&2
    exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
all="$tmp/all_kernels.cu"
for src in "${sources[@]}"; do
    case $src in /*) printf '#include "%s"\n' "$src" ;; *) printf '#include "%s"\n' "$PWD/$src" ;; esac
done >"$all"

# One job per (source, arch); a job passes when nvcc succeeds and prints nothing.
jobs_list=()
units=("${sources[@]}")
[ ${#sources[@]} -gt 1 ] && units+=("$all")
for src in "${units[@]}"; do
    for arch in "${ARCHS[@]}"; do jobs_list+=("$src|$arch"); done
done

run_one() {  # $1 = source, $2 = arch, $3 = job id
    local src=$1 arch=$2 id=$3 log="$tmp/$3.log"
    if [ -n "${PTX_DIR:-}" ] && [ "$src" != "$all" ]; then
        mkdir -p "$PTX_DIR"
        "$NVCC" -ptx -arch="sm_$arch" "${FLAGS[@]}" -o "$PTX_DIR/$(basename "$src" .cu).sm_$arch.ptx" "$src" >>"$log" 2>&1 || true
    fi
    if "$NVCC" -cubin -arch="sm_$arch" "${FLAGS[@]}" -o "$tmp/$id.cubin" "$src" >>"$log" 2>&1 \
        && [ ! -s "$log" ]; then
        echo ok >"$tmp/$id.status"
    else
        echo FAIL >"$tmp/$id.status"
    fi
}

id=0
running=0
for job in "${jobs_list[@]}"; do
    run_one "${job%|*}" "${job#*|}" "$id" &
    id=$((id + 1))
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait

status=0
id=0
for job in "${jobs_list[@]}"; do
    src=${job%|*}
    [ "$src" = "$all" ] && src="(all kernels in one translation unit)"
    result=$(cat "$tmp/$id.status" 2>/dev/null || echo FAIL)
    printf '%-4s  sm_%s  %s\n' "$result" "${job#*|}" "$src"
    if [ "$result" != ok ]; then
        sed 's/^/      /' "$tmp/$id.log" 2>/dev/null || true
        status=1
    fi
    id=$((id + 1))
done
if [ "$status" -eq 0 ]; then
    echo "compile_kernels: ${#sources[@]} sources x ${#ARCHS[@]} archs compiled without warnings ($("$NVCC" --version | tail -1))"
fi
exit "$status"

"""Run the CUDA kernels of ``dgc.kernels`` on the CPU, through the real CuPy backend code.

No GPU is needed: the exact source ``cupy_backend.kernel_source()`` hands to NVRTC is compiled with g++
against a tiny CUDA shim in which every CUDA thread is an OS thread and the 32 lanes of a warp meet at a
barrier in each ``__ballot_sync`` / ``__shfl_xor_sync`` (so a warp-divergent collective deadlocks here as
it would misbehave on a GPU).  A stand-in ``cupy`` module (memoize, RawModule, from_dlpack, streams) lets
``kernels/cupy_backend.py`` itself run unmodified on CPU tensors; every kernel argument is checked
against the C signature (pointer dtypes, int vs long long vs float) before the launch.

What this cannot show: performance, memory coalescing, and races that the shim's scheduling hides
(``DGC_EMULATOR_SANITIZE=thread`` looks for those).  ``test_kernels.py`` runs its semantic tests through
:func:`emulated_backend`; the tests at the end of this file check the emulator itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import dgc.kernels
import numpy as np
import pytest
import torch

KERNEL_DIR = Path(dgc.kernels.__file__).resolve().parent

SHIM = r"""
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline

struct dim3 { unsigned int x = 1, y = 1, z = 1; };
static dim3 gridDim, blockDim;
static thread_local dim3 threadIdx, blockIdx;

struct EmuWarp {
    std::barrier<> bar{32};
    unsigned int u[32];
    float f[32];
};
static thread_local EmuWarp* emu_warp = nullptr;

static void emu_full(unsigned int mask) {
    if (mask != 0xffffffffu) { std::fprintf(stderr, "emulator: partial warp mask\n"); std::abort(); }
}
static unsigned int __ballot_sync(unsigned int mask, int pred) {
    emu_full(mask);
    const unsigned lane = threadIdx.x % 32;
    emu_warp->u[lane] = pred ? 1u : 0u;
    emu_warp->bar.arrive_and_wait();
    unsigned int r = 0;
    for (unsigned i = 0; i < 32; ++i) r |= emu_warp->u[i] << i;
    emu_warp->bar.arrive_and_wait();
    return r;
}
static float __shfl_xor_sync(unsigned int mask, float v, int lane_mask) {
    emu_full(mask);
    const unsigned lane = threadIdx.x % 32;
    emu_warp->f[lane] = v;
    emu_warp->bar.arrive_and_wait();
    const float r = emu_warp->f[(lane ^ static_cast<unsigned>(lane_mask)) % 32];
    emu_warp->bar.arrive_and_wait();
    return r;
}
static int __popc(unsigned int x) { return __builtin_popcount(x); }
static float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

// PTX cvt instructions (the source's asm statements are rewritten into these calls).
static float dgc_emu_cvt_f32_f16(unsigned short h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
static unsigned short dgc_emu_cvt_rn_f16_f32(float f) {
    _Float16 x = (_Float16)f; unsigned short h; std::memcpy(&h, &x, 2); return h;
}
static unsigned short dgc_emu_cvt_rn_bf16_f32(float f) {
    unsigned int u; std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);                       // round to nearest even
    return static_cast<unsigned short>(u >> 16);
}

static void dgc_emu_run(unsigned grid, unsigned block, const std::function<void()>& body) {
    if (grid == 0 || block == 0 || block % 32) { std::fprintf(stderr, "emulator: bad launch\n"); std::abort(); }
    gridDim = dim3{grid, 1, 1};
    blockDim = dim3{block, 1, 1};
    const unsigned total = grid * block;
    std::vector<std::unique_ptr<EmuWarp>> warps;
    for (unsigned w = 0; w < total / 32; ++w) warps.emplace_back(new EmuWarp());
    std::vector<std::thread> threads;
    threads.reserve(total);
    for (unsigned b = 0; b < grid; ++b) {
        for (unsigned t = 0; t < block; ++t) {
            EmuWarp* w = warps[(b * block + t) / 32].get();
            threads.emplace_back([=, &body] {
                blockIdx = dim3{b, 1, 1};
                threadIdx = dim3{t, 1, 1};
                emu_warp = w;
                body();
            });
        }
    }
    for (auto& th : threads) th.join();
}
"""

_ASM = re.compile(r'asm\("cvt\.([\w.]+) %0, %1;" : "=\w"\((\w+)\) : "\w"\((\w+)\)\);')
_KERNEL = re.compile(r'extern "C" __global__ void (\w+)\((.*?)\)\s*\{', re.S)

_POINTEE = {  # C pointee type -> tensor dtypes the backend may pass
    "void": None,
    "float": {torch.float32},
    "int": {torch.int32},
    "long long": {torch.int64},
    "unsigned char": {torch.uint8},
}
_SCALAR = {"int": (np.int32, ctypes.c_int), "long long": (np.int64, ctypes.c_longlong), "float": (np.float32, ctypes.c_float)}


def _parse(code: str) -> dict[str, list[tuple[str, bool]]]:
    """Kernel name -> [(base C type, is_pointer)] from the ``extern "C" __global__`` signatures."""
    kernels = {}
    for name, params in _KERNEL.findall(code):
        sig = []
        for p in params.split(","):
            words = p.replace("*", " * ").split()[:-1]  # drop the parameter name
            words = [w for w in words if w not in ("const", "__restrict__")]
            pointer = "*" in words
            sig.append((" ".join(w for w in words if w != "*"), pointer))
        kernels[name] = sig
    return kernels


def _translate(code: str) -> str:
    code = _ASM.sub(lambda m: f"{m[2]} = dgc_emu_cvt_{m[1].replace('.', '_')}({m[3]});", code)
    if "asm(" in code:
        raise AssertionError("emulator: an asm statement it does not know; extend tests/test_kernels_emulator.py")
    return code


@functools.cache
def _build(code: str) -> tuple[ctypes.CDLL, dict]:
    kernels = _parse(code)
    wrappers = []
    for name, sig in kernels.items():
        params = ", ".join(f"{t}{'*' if p else ''} a{i}" for i, (t, p) in enumerate(sig))
        args = ", ".join(f"a{i}" for i in range(len(sig)))
        wrappers.append(
            f'extern "C" void launch_{name}(unsigned grid, unsigned block, {params}) '
            f"{{ dgc_emu_run(grid, block, [=] {{ {name}({args}); }}); }}"
        )
    source = SHIM + _translate(code) + "\n" + "\n".join(wrappers) + "\n"
    digest = hashlib.sha256((source + " ".join(_sanitize())).encode()).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / "dgc-cuda-emulator"
    out_dir.mkdir(exist_ok=True)
    lib = out_dir / f"kernels-{digest}.so"
    if not lib.exists():
        src = out_dir / f"kernels-{digest}.cpp"
        src.write_text(source)
        tmp = lib.with_suffix(f".{id(source)}.tmp")
        cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Werror",
               "-Wno-unused-function", "-Wno-unknown-pragmas", *_sanitize(), "-o", str(tmp), str(src)]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        tmp.replace(lib)
    return ctypes.CDLL(str(lib)), kernels


def _sanitize() -> list[str]:
    """``DGC_EMULATOR_SANITIZE=address`` (or ``thread``) builds the kernels with that sanitizer; run
    pytest with ``LD_PRELOAD=$(g++ -print-file-name=libasan.so)`` (``libtsan.so``) and, for ASan,
    ``ASAN_OPTIONS=detect_leaks=0``.  Torch's CPU tensors come from malloc, so an out-of-bounds access
    by a kernel hits a red zone."""
    kind = os.environ.get("DGC_EMULATOR_SANITIZE", "")
    return [f"-fsanitize={kind}", "-fno-omit-frame-pointer", "-g"] if kind else []


def available() -> str | None:
    """None when the emulator can run here, else why not."""
    if shutil.which("g++") is None:
        return "g++ not found (the CUDA emulator compiles the kernels with it)"
    return None


class _Array:
    """What ``cupy.from_dlpack`` returns here: the tensor (kept alive), its dtype and address."""

    def __init__(self, t: torch.Tensor) -> None:
        if not t.is_contiguous():
            raise AssertionError("emulator: the backend passed a non-contiguous tensor to a kernel")
        self.tensor = t
        self.dtype = t.dtype
        self.ptr = t.data_ptr()


class _Kernel:
    def __init__(self, lib: ctypes.CDLL, name: str, sig: list[tuple[str, bool]], launches: list) -> None:
        self.fn = getattr(lib, f"launch_{name}")
        self.fn.restype = None
        self.name, self.sig, self.launches = name, sig, launches

    def __call__(self, grid: tuple, block: tuple, args: tuple, **kwargs) -> None:
        if len(args) != len(self.sig):
            raise TypeError(f"{self.name}: {len(args)} arguments for {len(self.sig)} parameters")
        c_args = []
        for i, (arg, (ctype, pointer)) in enumerate(zip(args, self.sig, strict=True)):
            where = f"{self.name} argument {i} ({ctype}{'*' if pointer else ''})"
            if pointer:
                if isinstance(arg, np.uint64) and int(arg) == 0:
                    c_args.append(ctypes.c_void_p(0))
                    continue
                if not isinstance(arg, _Array):
                    raise TypeError(f"{where}: got {type(arg).__name__}")
                allowed = _POINTEE[ctype]
                if allowed is not None and arg.dtype not in allowed:
                    raise TypeError(f"{where}: got a {arg.dtype} array")
                c_args.append(ctypes.c_void_p(arg.ptr))
            else:
                np_type, c_type = _SCALAR[ctype]
                if type(arg) is not np_type:
                    raise TypeError(f"{where}: got {type(arg).__name__}, want {np_type.__name__}")
                c_args.append(c_type(arg.item()))
        self.launches.append((self.name, grid[0], block[0]))
        self.fn(ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), *c_args)


def _fake_cupy(launches: list) -> types.ModuleType:
    cupy = types.ModuleType("cupy")

    class RawModule:
        def __init__(self, code: str, options: tuple = ()) -> None:
            self.lib, self.kernels = _build(code)
            self.options = options

        def get_function(self, name: str) -> _Kernel:
            return _Kernel(self.lib, name, self.kernels[name], launches)

    def memoize(for_each_device: bool = False):
        return functools.cache

    cupy.RawModule = RawModule
    cupy.RawKernel = _Kernel
    cupy.ndarray = _Array
    cupy.memoize = memoize
    cupy.from_dlpack = _Array
    cupy.cuda = types.SimpleNamespace(
        Device=lambda index: contextlib.nullcontext(),
        ExternalStream=lambda handle, index=-1: contextlib.nullcontext(),
        is_available=lambda: True,
    )
    return cupy


def emulated_backend(
    threads: int = 64, ctas_per_sm: int = 2, define: tuple[str, ...] = ()
) -> tuple[types.ModuleType, list]:
    """A private copy of ``dgc.kernels.cupy_backend`` whose kernels run on the CPU emulator.

    Returns the module and the list that records every launch (name, grid, block).  Small launches
    (``threads`` per CTA, ``ctas_per_sm`` CTAs on one "SM") make the grid-stride loops iterate.
    ``define`` names preprocessor macros put in front of the source (e.g. ``DGC_SOFT_BF16``: the
    bfloat16 cast that devices below sm_80 compile).
    """
    launches: list = []
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = _fake_cupy(launches)
    try:
        spec = importlib.util.spec_from_file_location(
            "dgc.kernels._cupy_backend_emulated", KERNEL_DIR / "cupy_backend.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = saved
    if define:
        source = module.kernel_source
        module.kernel_source = lambda: "".join(f"#define {d} 1\n" for d in define) + source()
    original_need_cuda = module._need_cuda

    def need_cpu(name, t, device=None):  # the CPU plays the GPU
        if not isinstance(t, torch.Tensor):
            return original_need_cuda(name, t, device)
        if device is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the data is on {device}")

    module._need_cuda = need_cpu
    module._on_torch_stream = lambda device: contextlib.nullcontext(0)
    module._sm_count = lambda index: 1
    module._THREADS = threads
    module._CTAS_PER_SM = ctas_per_sm
    return module, launches


# ------------------------------------------------------------------------------- the emulator's own tests

@pytest.fixture(scope="module")
def backend():
    why = available()
    if why:
        pytest.skip(why)
    return emulated_backend()


def test_every_kernel_is_parsed_and_translated(backend):
    module, _ = backend
    code = module.kernel_source()
    kernels = _parse(code)
    assert set(kernels) == {
        "dgc_fused_update", "dgc_block_absmax", "dgc_count_above", "dgc_compact_above", "dgc_pack",
        "dgc_scatter_add",
    }  # fmt: skip
    assert "asm(" not in _translate(code)
    assert kernels["dgc_fused_update"][0] == ("void", True)  # const void* grad
    assert kernels["dgc_fused_update"][8] == ("long long", False)  # n


def test_launch_arguments_are_checked_against_the_signature(backend):
    module, launches = backend
    x = torch.randn(100)
    out = torch.empty(2)
    good = (module._arr(x), np.int32(0), module._NULL, np.int32(0), module._arr(out), np.int64(100))
    module._warp_blocks("dgc_block_absmax", 0, 100, good)
    assert launches[-1][0] == "dgc_block_absmax"
    assert torch.equal(out, torch.stack((x[:64].abs().max(), x[64:].abs().max())))
    wrong_int = good[:5] + (np.int32(100),)  # n is long long
    with pytest.raises(TypeError, match="argument 5"):
        module._warp_blocks("dgc_block_absmax", 0, 100, wrong_int)
    wrong_ptr = good[:4] + (module._arr(out.double()), np.int64(100))
    with pytest.raises(TypeError, match="float64"):
        module._warp_blocks("dgc_block_absmax", 0, 100, wrong_ptr)
    with pytest.raises(TypeError, match="5 arguments"):
        module._warp_blocks("dgc_block_absmax", 0, 100, good[:5])


def test_grid_stride_loops_are_exercised(backend):
    module, launches = backend
    x = torch.randn(5000)  # 79 blocks for 2 CTAs x 2 warps: each warp loops ~20 times
    module.block_absmax(x)
    name, grid, block = launches[-1]
    assert (name, grid, block) == ("dgc_block_absmax", 2, 64)

"""The fast kernels' instruction choice (simd.flavour) against the CPU's own feature list, the
block dot products' integer lanes of every flavour against NumPy, sdot in the aarch64 code, and
the integer dot-product kernels against the NumPy reference in the fast mode.

On x86 CI these check the x86 choice (AVX2, VNNI, AVX-512); under scripts/aarch64-check
(QEMU_CPU=cortex-a76: dotprod, cortex-a72: none) they check the aarch64 ones.
"""

import ctypes
import os
import platform
import struct

import numpy as np
import pytest
from childpytest import pytest_child, python_child
from llvmlite import ir

from edgellm.runtime import encodings, kernels
from edgellm.runtime.kernels import reference as ref
from edgellm.runtime.kernels import simd
from edgellm.runtime.reader import Matrix

needs_jit = pytest.mark.skipif(not simd.AVAILABLE, reason="the SIMD kernels need the JIT "
                               "(NUMBA_DISABLE_JIT=1)")
ARM = platform.machine().lower() in ("aarch64", "arm64")
X86 = platform.machine().lower() in ("x86_64", "amd64")


def numba_target_features():
    """The features Numba's JIT compiles for (its code generator's own record)."""
    from numba.core.registry import cpu_target

    return set(cpu_target.target_context.codegen().magic_tuple()[2].split(","))


def cpuinfo_flags():
    """x86: the flags line of /proc/cpuinfo (the kernel's list)."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def arm_hwcap():
    """aarch64 Linux: AT_HWCAP from /proc/self/auxv (pairs of 64-bit type, value), else
    getauxval. Bit 20 is HWCAP_ASIMDDP, /proc/cpuinfo's "asimddp"."""
    try:
        with open("/proc/self/auxv", "rb") as f:
            data = f.read()
        for k in range(0, len(data) - 15, 16):
            key, val = struct.unpack("<QQ", data[k:k + 16])
            if key == 16:
                return val
    except OSError:
        pass
    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    return getauxval(16)


def off(name):
    return os.environ.get(name, "") == "1"


@needs_jit
def test_flavour_matches_the_cpu():
    """The fast kernels use the best dot-product instructions the CPU lists, no others."""
    import numba

    if numba.config.CPU_NAME not in (None, "host") or (X86 and numba.config.CPU_FEATURES
                                                        is not None):
        pytest.skip("NUMBA_CPU_NAME / NUMBA_CPU_FEATURES name the CPU Numba compiles for")
    if X86:
        flags = cpuinfo_flags()
        avx2 = "avx2" in flags
        vnni = avx2 and not off("EDGELLM_NO_VNNI") and (
            "avx_vnni" in flags or {"avx512_vnni", "avx512vl"} <= flags)
        avx512 = vnni and not off("EDGELLM_NO_AVX512") and {"avx512bw", "avx512_vnni",
                                                              "avx512f"} <= flags
        expected = ("x86 AVX-512 VNNI" if avx512 else "x86 AVX2 VNNI" if vnni
                    else "x86 AVX2" if avx2 else "generic")
        assert simd.flavour() == expected
        assert not simd.HAVE_DOTPROD
    elif ARM:
        dotprod = bool(arm_hwcap() & (1 << 20)) and not off("EDGELLM_NO_DOTPROD")
        if dotprod and "+dotprod" not in numba_target_features():
            assert "set NUMBA_CPU_FEATURES" in simd.flavour()
            pytest.skip("the CPU has dotprod but LLVM did not see it (qemu-user before 8.1 shows "
                        "the host's /proc/cpuinfo): scripts/aarch64-check sets NUMBA_CPU_FEATURES")
        assert simd.flavour() == ("aarch64 NEON sdot" if dotprod else "aarch64 NEON generic")
        assert simd.HAVE_DOTPROD == dotprod and not simd.HAVE_AVX2
    else:
        assert simd.flavour() == "generic"


def test_flavour_in_stats(capsys):
    """`edgellm run --stats` / `edgellm bench` name the kernels' mode and instructions."""
    from edgellm.cli import print_stats

    stats = {"prompt_tokens": 3, "prefill_s": 0.01, "decode_tokens": 2, "decode_s": 0.02,
             "finish_reason": "length", "parts_s": {}}
    print_stats(stats, 0.1)
    line = [s for s in capsys.readouterr().err.splitlines() if s.startswith("kernels")]
    want = kernels.MODE + (f" ({simd.flavour()})" if kernels.MODE == "fast" else "")
    assert line == [f"kernels    {want}"]


# ---------------------------------------------------------------------------------------------
# integer lanes of the block products, each flavour: the same sums as NumPy's


def _lanes_kernel(kind, fast):
    """An njit function (buf int8[128], out int32[8]) -> out = the <8 x i32> of simd._block_dot
    (w = buf[:32], x = buf[32:64]) or simd._pair_dot (lo, hi, xlo, xhi: 32 bytes each)."""
    from numba import njit, types
    from numba.extending import intrinsic

    @intrinsic
    def lanes(typingctx, buf, out):
        def codegen(context, builder, sig, args):
            b = simd._base(context, builder, sig.args[0], args[0])
            o = simd._base(context, builder, sig.args[1], args[1])
            v = [simd._at(builder, b, ir.Constant(simd.I64, 32 * k), simd._v(simd.I8, 32))
                 for k in range(4)]
            r = (simd._block_dot(builder, v[0], v[1], fast) if kind == "block"
                 else simd._pair_dot(builder, *v, fast))
            simd._store_at(builder, o, ir.Constant(simd.I64, 0), r, align=4)
            return context.get_dummy_value()

        return types.void(buf, out), codegen

    @njit
    def run(buf, out):
        lanes(buf, out)

    return run


def lane_inputs(rng, kind):
    if kind == "block":  # |w| <= 128, |x| <= 127, extremes included
        w = rng.integers(-128, 128, 32)
        w[:4] = -128
        x = rng.integers(-127, 128, 32)
        x[:2], x[2:4] = 127, -127
        return [w, x, np.zeros(32, int), np.zeros(32, int)]
    lo, hi = rng.integers(0, 16, 32), rng.integers(0, 16, 32)
    lo[:4] = hi[:4] = 15
    xlo, xhi = rng.integers(-127, 128, 32), rng.integers(-127, 128, 32)
    xlo[:4], xhi[:4] = -127, 127
    return [lo, hi, xlo, xhi]


@needs_jit
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "generic"])
@pytest.mark.parametrize("kind", ["block", "pair"])
def test_dot_lanes(kind, fast):
    """Lane k of the block product sums bytes 4k..4k+3 (the fast flavour: vpdpbusd, vpmaddubsw
    + vpmaddwd and sdot group alike, sparse_simd relies on it) or k, k+8, k+16, k+24 (the
    generic block product); the pair product (int4) sums 4k..4k+3 in every flavour."""
    run = _lanes_kernel(kind, fast)
    rng = np.random.default_rng(3)
    for _ in range(20):
        parts = lane_inputs(rng, kind)
        buf = np.concatenate(parts).astype(np.int8)
        out = np.zeros(8, np.int32)
        run(buf, out)
        a = parts[0] * parts[1] if kind == "block" else parts[0] * parts[2] + parts[1] * parts[3]
        if kind == "block" and not (fast and (simd.HAVE_AVX2 or simd.HAVE_DOTPROD)):
            expected = a.reshape(4, 8).sum(axis=0)
        else:
            expected = a.reshape(8, 4).sum(axis=1)
        assert np.array_equal(out, expected)


# ---------------------------------------------------------------------------------------------
# sdot in the code LLVM makes for aarch64 (runs on any host whose llvmlite has the AArch64 target)


def _aarch64_asm(monkeypatch, features, fast):
    from targetasm import assembly

    # the choice as on an aarch64 CPU with (features) dotprod
    monkeypatch.setattr(simd, "HAVE_DOTPROD", "+dotprod" in features)
    for flag in ("HAVE_AVX2", "HAVE_VNNI", "HAVE_AVX512"):
        monkeypatch.setattr(simd, flag, False)
    mod = ir.Module("dots")
    v32, v8 = simd._v(simd.I8, 32), simd._v(simd.I32, 8)
    for kind in ("block", "pair"):
        fn = ir.Function(mod, ir.FunctionType(v8, [v32] * 4), kind)
        builder = ir.IRBuilder(fn.append_basic_block())
        a = fn.args
        builder.ret(simd._block_dot(builder, a[0], a[1], fast) if kind == "block"
                    else simd._pair_dot(builder, *a, fast))
    return assembly(mod, "aarch64-unknown-linux-gnu", "generic", features)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "generic"])
def test_sdot_in_aarch64_code(fast, monkeypatch):
    """With dotprod the fast flavour's block product is two sdot (32 bytes: two 128-bit halves),
    the pair product four; the generic flavour, and any flavour without dotprod, none."""
    asm = _aarch64_asm(monkeypatch, "+neon,+dotprod", fast)
    sdots = [line for line in asm.splitlines() if line.strip().startswith("sdot")]
    assert len(sdots) == (6 if fast else 0), asm
    assert "sdot" not in _aarch64_asm(monkeypatch, "+neon", fast)


# ---------------------------------------------------------------------------------------------
# the dot-product kernels against the NumPy reference in the fast mode (what the flavour runs)


def exact_bound(m, x):
    """|out - exact| allowed: float32 summation (2e-5 of sum |w x|, as tests/test_kernels.py) and
    the int8 quantization of x per block of 32 (half a step per value, in full)."""
    w = m.dequantize().astype(np.float64)
    xd = x.astype(np.float64)
    allowed = 2e-5 * (np.abs(xd) @ np.abs(w).T)
    d = x.shape[-1]
    nb = -(-d // 32)
    xp = np.zeros((x.shape[0], nb * 32))
    xp[:, :d] = np.abs(xd)
    half = np.repeat(xp.reshape(x.shape[0], nb, 32).max(axis=-1) / 127.0 / 2, 32, axis=-1)
    return xd @ w.T, allowed + half[:, :d] @ np.abs(w).T * 1.001 + 1e-30


@needs_jit
@pytest.mark.parametrize("enc,g,d", [("int8", 32, 96), ("int8", 32, 100), ("int4", 32, 224),
                                     ("int4", 32, 256), ("int4", 64, 256), ("q8_0", 32, 160),
                                     ("q4_1", 32, 96), ("q4_1", 32, 128)])
def test_dot_kernels_match_numpy(enc, g, d, monkeypatch):
    """Decode (one token) of each integer encoding that meets int8 activations, odd and even
    block counts, in the fast mode: within the stated bound of the exact product, and the same
    bound holds for the NumPy reference."""
    monkeypatch.setattr(kernels, "MODE", "fast")
    rng = np.random.default_rng(d + g)
    c = encodings.codec(enc, g if enc == "int4" else None)
    q, s = c.quantize(rng.standard_normal((37, d)).astype(np.float32))
    q.flags.writeable = s.flags.writeable = False  # as read from the mmap
    m = Matrix(q, s, c, (37, d))
    x = rng.standard_normal((1, d)).astype(np.float32)
    assert kernels.quantizes_activations(m, 1)
    exact, allowed = exact_bound(m, x)
    out = kernels.linear(m, x)
    assert out.dtype == np.float32 and out.shape == (1, 37)
    assert np.all(np.abs(out - exact) <= allowed), np.max(np.abs(out - exact) - allowed)
    assert np.all(np.abs(ref.linear(m, x) - exact) <= allowed)


# ---------------------------------------------------------------------------------------------
# a CPU without AVX-512 (an AVX2 x86, as aarch64): Numba told so in a child with its own cache

AVX2_ONLY = "+avx,+avx2,+fma,+f16c,+popcnt,+sse4.2,+bmi,+bmi2"


@needs_jit
@pytest.mark.slow
def test_cpu_without_avx512(tmp_path):
    """Numba compiling for an AVX2 CPU without AVX-512 (NUMBA_CPU_NAME=haswell and its features):
    the fast flavour is "x86 AVX2", and the int8 sparse kernels, whose AVX-512-only code Numba
    compiles into sparse.int8_row on every CPU (the callers never run it without), compile and
    match NumPy (that code aborted LLVM on such CPUs and on aarch64, in `edgellm demo` too)."""
    if not X86:
        pytest.skip("an x86 target")
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache"), "NUMBA_CPU_NAME": "haswell",
           "NUMBA_CPU_FEATURES": AVX2_ONLY}
    r = python_child("from edgellm.runtime.kernels import simd; print(simd.flavour())", **env)
    assert r.stdout.strip() == "x86 AVX2", r.stderr[-2000:]
    assert pytest_child("test_prune.py", "test_linear_sparse_int8_simd and sp24-fast",
                        timeout=600, **env) == 1

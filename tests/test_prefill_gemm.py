"""The prefill integer GEMM (runtime/kernels/qgemm.py) against a NumPy statement of the same
arithmetic, and the model's prefill through it against the float path.

Reference: the activations quantized per block of 32 as decode's quantizer states it (scale
max|x| / 127 in float32, values x * (1 / scale) rounded half to even), integer sums per block
computed exactly (int64), then the block's weight scale times the activation scale, summed in
float64. The kernel's integer sums are exact too (per 4-byte lane of a block); only its float32
sums of lanes differ: |out - ref| <= 2e-6 * the sum of the lanes' magnitudes (at most
sum |w code| |x code| per block, plus 16 sum |x code| for 4-bit codes, whose lanes also carry
the 8 * sum(x) correction or the min term), times the scales: a few lane values per 8- or 16-lane
accumulator over <= 64 loads, then a tree, each rounding 2^-24 relative.
"""

import numpy as np
import pytest

from edgellm.runtime import encodings, kernels
from edgellm.runtime.kernels import qgemm, simd
from edgellm.runtime.reader import Matrix

import tiny

needs_gemm = pytest.mark.skipif(not qgemm.TILES, reason="the integer GEMM needs the JIT and "
                                "AVX2 + F16C, AVX-512 VNNI or aarch64's dot product")

RTOL = 2e-6


def quantize_acts(x):
    """x f32[T, d] -> (codes int64 [T, nb, 32], scales f64 [T, nb]) as simd.quantize_q8."""
    T, d = x.shape
    b = x.reshape(T, d // 32, 32)
    sc = (np.abs(b).max(axis=2) / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(sc > 0, np.float32(1.0) / sc, np.float32(0.0)).astype(np.float32)
    codes = np.rint((b * inv[:, :, None]).astype(np.float32)).astype(np.int64)
    return codes, sc.astype(np.float64)


def weight_blocks(m):
    """The matrix as integer codes [n, nb, 32] and per-block (scale, offset) f64 [n, nb]:
    value = code * scale + offset (offset 0 but for q4_1)."""
    n, d = m.shape
    nb = d // 32
    name = m.codec.name
    zero = np.zeros((n, nb))
    if name == "int8":
        return (m.q.astype(np.int64).reshape(n, nb, 32),
                np.repeat(m.s.astype(np.float64)[:, None], nb, axis=1), zero)
    if name == "q8_0":
        return m.q.astype(np.int64).reshape(n, nb, 32), m.s.astype(np.float64), zero
    codes = encodings.unpack_nibbles(m.q).astype(np.int64).reshape(n, nb, 32)
    if name == "int4":
        s = np.repeat(m.s.astype(np.float64), m.codec.group_size // 32, axis=1)
        return codes - 8, s, zero
    sm = m.s.astype(np.float64).reshape(n, nb, 2)  # q4_1: (step, min) per block
    return codes, sm[:, :, 0], sm[:, :, 1]


def reference(m, x):
    """(out, bound) f64[T, n]: the quantized product and the allowed float32 summation error."""
    xc, xs = quantize_acts(x)
    wc, ws, wo = weight_blocks(m)
    dots = np.einsum("tbk,nbk->tnb", xc, wc)  # exact integer sums per block
    sums = xc.sum(axis=2)  # [T, nb]
    terms = (dots * ws[None] + sums[:, None, :] * wo[None]) * xs[:, None, :]
    absx = np.abs(xc)
    mags = np.einsum("tbk,nbk->tnb", absx, np.abs(wc))
    if m.codec.name in ("int4", "q4_1"):
        mags = mags + 16 * absx.sum(axis=2)[:, None, :]
    lanes = (mags * np.abs(ws)[None] + np.abs(sums)[:, None, :] * np.abs(wo)[None]) \
        * xs[:, None, :]
    return terms.sum(axis=2), RTOL * lanes.sum(axis=2) + 1e-30


def make_matrix(rng, enc, n, d, g=32):
    c = encodings.codec(enc, g if enc == "int4" else None)
    w = rng.standard_normal((n, d)).astype(np.float32)
    q, s = c.quantize(w)
    return Matrix(q, s, c, (n, d))


CASES = [("int8", 4, 64, 32), ("int8", 37, 192, 32), ("int8", 130, 2048, 32),
         ("q8_0", 9, 128, 32), ("q8_0", 66, 1536, 32),
         ("int4", 4, 128, 32), ("int4", 33, 256, 32), ("int4", 130, 2048, 32),
         ("int4", 21, 512, 64), ("int4", 17, 1024, 256),
         ("int4", 5, 64, 32), ("int4", 40, 576, 32), ("int4", 9, 576, 64),  # a half step last
         ("q4_1", 7, 128, 32), ("q4_1", 70, 1536, 32), ("q4_1", 6, 64, 32), ("q4_1", 30, 576, 32)]


@needs_gemm
@pytest.mark.parametrize("enc,n,d,g", CASES)
@pytest.mark.parametrize("T", [2, 5, 16])
def test_matmul_matches_numpy(enc, n, d, g, T):
    rng = np.random.default_rng(n * 31 + d + T)
    m = make_matrix(rng, enc, n, d, g)
    x = rng.standard_normal((T, d)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (scale 0)
    assert qgemm.use_gemm(enc, g, n, d, T) == qgemm.FASTER  # AVX2 without VNNI: tested, not taken
    out = qgemm.matmul(m, qgemm.Activations(x))[:T]
    expected, bound = reference(m, x)
    err = np.abs(out - expected)
    assert np.all(err <= bound), f"max excess {(err - bound).max()}"


# ---------------------------------------------------------------------------------------------
# the model's prefill through the GEMM


def _model(quant, down):
    """tiny llama_relu (d 128, d_ff 256: every projection suits the GEMM at int8 and int4) with
    the down projection in the bundles or as a matrix of its own."""
    return tiny.converted("llama_relu", quant, ffn_down=down)


def _prefill(rt, ids):
    rt.reset()
    return rt.forward(ids, all_logits=True)


@needs_gemm
@pytest.mark.parametrize("down", ["bundle", "matrix"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_model_prefill_against_float_path_and_decode(quant, down, monkeypatch):
    """Prefill through the GEMM against the float path (EDGELLM_NO_GEMM's switch) and against
    token-by-token decode.

    Tolerance: decode's kernels quantize every product's input to the same int8 blocks, so
    decode's distance from the float prefill is what activation quantization does to this model
    (measured ~1-2% of the logit scale here). The GEMM quantizes the same inputs of the same
    layers (not the head: a prefill's head takes float activations), so its distance from the
    float path may be at most that (1.5x for the rounding of different inputs) and its
    distance from decode smaller still (measured: GEMM-float 1.9-2.0%, decode-float 2.0-2.2%,
    GEMM-decode 0.6%). Top-1 agrees at nearly every position."""
    import edgellm

    monkeypatch.setattr(qgemm, "FASTER", True)  # AVX2 without VNNI: the tiles are not taken
    rt = edgellm.load(_model(quant, down), kv="f32").runtime
    ids = tiny.token_ids("llama_relu", 24)
    calls = []

    def counting(real):
        def counted(*a):
            calls.append(a[0])
            return real(*a)
        return counted

    # int4 loaded into memory is packed for decode (kernels/rows16.py): its prefill unpacks
    # each group for the same tiles (gemm_packed)
    monkeypatch.setattr(qgemm, "gemm", counting(qgemm.gemm))
    monkeypatch.setattr(qgemm, "gemm_packed", counting(qgemm.gemm_packed))
    gemm = _prefill(rt, ids)
    assert calls, "the integer GEMM did not run"
    monkeypatch.setattr(qgemm, "ENABLED", False)
    n = len(calls)
    flt = _prefill(rt, ids)
    assert len(calls) == n  # the switch keeps the float path
    monkeypatch.setattr(qgemm, "ENABLED", True)
    rt.reset()
    dec = np.concatenate([rt.forward([t], all_logits=True) for t in ids])
    scale = np.abs(flt).max()
    e_dec = np.abs(dec - flt).max() / scale
    e_gemm = np.abs(gemm - flt).max() / scale
    assert 0 < e_gemm <= 1.5 * e_dec, (e_gemm, e_dec)
    assert np.abs(gemm - dec).max() / scale <= e_dec
    # a random tiny model: its logits have near-ties (int4: 22 of 24 measured)
    assert np.mean(gemm.argmax(-1) == flt.argmax(-1)) >= 0.8


@pytest.mark.parametrize("enc", ["int8", "int4", "q8_0", "q4_1"])
def test_float_path_where_the_gemm_cannot_run_tiny(enc):
    """Without the JIT (or on a CPU where qgemm.FASTER is False) the rule sends prefill to the
    float tiles: float32 activations, so linear() equals the float64 product of the decoded
    weights up to float32 summation (2e-5 of sum |w x|, as tests/test_kernels.py)."""
    rng = np.random.default_rng(7)
    m = make_matrix(rng, enc, 9, 128)
    x = rng.standard_normal((5, 128)).astype(np.float32)
    runs = qgemm.use_gemm(enc, 32, 9, 128, 5)
    assert runs == (qgemm.FASTER and qgemm.ENABLED)
    assert kernels.quantizes_activations(m, 5) == (runs and kernels.MODE == "fast")
    if not runs:
        w = m.dequantize().astype(np.float64)
        exact = x.astype(np.float64) @ w.T
        err = np.abs(kernels.linear(m, x) - exact)
        assert np.all(err <= 2e-5 * (np.abs(x) @ np.abs(w).T) + 1e-30)


@pytest.mark.skipif(not simd.AVAILABLE, reason="already without the JIT")
def test_no_jit_and_switch_off():
    """The test above in child processes: kernels as plain Python (NUMBA_DISABLE_JIT=1), and
    with EDGELLM_NO_GEMM=1."""
    from childpytest import no_jit, pytest_child

    assert no_jit(__file__, "where_the_gemm_cannot_run_tiny") == 4
    assert pytest_child(__file__, "where_the_gemm_cannot_run_tiny", EDGELLM_NO_GEMM="1") == 4


# ---------------------------------------------------------------------------------------------
# the 256-bit tiles: CPUs without AVX-512 (AVX2, AVX-VNNI) and aarch64's dot product

AVX2_ONLY = "+avx,+avx2,+fma,+f16c,+popcnt,+sse4.2,+bmi,+bmi2"  # as tests/test_arm.py


@pytest.mark.slow
@pytest.mark.skipif(not (simd.AVAILABLE and simd.HAVE_AVX512),
                    reason="the 512-bit tiles do not run here: the tests above already check "
                           "this CPU's own tiles")
@pytest.mark.parametrize("env,flavour", [
    # vpmaddubsw + vpmaddwd, Numba compiling for an AVX2 CPU (no AVX-512 instruction can slip in)
    ({"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": AVX2_ONLY}, "x86 AVX2"),
    # 256-bit vpdpbusd (a CPU with AVX-VNNI, or AVX-512 VL with the 512-bit tiles off)
    ({"EDGELLM_NO_AVX512": "1"}, "x86 AVX2 VNNI")], ids=["avx2", "avx-vnni-256"])
def test_256_bit_tiles(env, flavour, tmp_path):
    """The GEMM's tests above again in a child whose CPU choice gives the 256-bit tiles (its own
    Numba cache: this process's cached code has the 512-bit ones). Not the model's prefill test:
    it would compile every decode kernel again (2 minutes a child); the tiles are the part that
    changes."""
    from childpytest import pytest_child, python_child

    env = dict(env, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    r = python_child("from edgellm.runtime.kernels import qgemm, simd; "
                     "print(simd.flavour(), qgemm.WIDTH, qgemm.TILES, qgemm.FASTER)", **env)
    assert r.stdout.strip() == f"{flavour} 32 True {flavour != 'x86 AVX2'}", r.stderr[-2000:]
    assert pytest_child(__file__, "matmul_matches_numpy", timeout=900, **env) == len(CASES) * 3


def tile_asm(monkeypatch, enc, triple, cpu, features, flags):
    """qgemm.tile_ir of encoding enc (256-bit tiles, RM x RN 2 x 4) compiled by LLVM for
    (triple, cpu, features) as on a CPU where simd's flags are `flags` -> its assembly."""
    from llvmlite import ir
    from targetasm import assembly

    for flag in ("HAVE_AVX2", "HAVE_VNNI", "HAVE_AVX512", "HAVE_DOTPROD", "HAVE_F16"):
        monkeypatch.setattr(simd, flag, flag in flags)
    i8p, i64 = simd.I8.as_pointer(), simd.I64
    mod = ir.Module("tile")
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i8p, i64, i64, i8p, i64, i64, i64,
                                                         i64] + [i8p] * 4 + [i64] * 4
                                          + [i8p, i64, i64, i64]), "tile")
    a = list(fn.args)
    builder = ir.IRBuilder(fn.append_basic_block())
    xrows = [[builder.mul(stride, ir.Constant(i64, j)) for j in range(4)] for stride in a[12:16]]
    qgemm.tile_ir(builder, enc, 32, 2, 4, *a[:8], a[8:12], xrows, *a[16:])
    builder.ret_void()
    return assembly(mod, triple, cpu, features)


def instructions(asm, name):
    return [ln for ln in asm.splitlines() if ln.strip().split(" ")[0].split("\t")[0] == name]


@pytest.mark.parametrize("enc", [qgemm.INT8, qgemm.INT4, qgemm.Q8_0, qgemm.Q4_1])
def test_tile_instructions(enc, monkeypatch):
    """The 256-bit tiles' code for CPUs this host is not (LLVM targets; runs on any host): aarch64
    with dotprod multiplies with sdot (two a 32-byte product: a 2 x 4 tile's step has 2 * 4 of
    them per 32 bytes of 8-bit codes, 2 * 2 * 4 for 4-bit codes: at least that many in the loop
    bodies); AVX2 with vpmaddubsw and AVX-VNNI with 256-bit vpdpbusd, neither with a 512-bit
    register."""
    four_bit = enc in (qgemm.INT4, qgemm.Q4_1)
    arm = tile_asm(monkeypatch, enc, "aarch64-unknown-linux-gnu", "cortex-a76",
                   "+neon,+dotprod,+fullfp16", {"HAVE_DOTPROD", "HAVE_F16"})
    assert len(instructions(arm, "sdot")) >= 8 * (2 if four_bit else 1), arm
    avx2 = tile_asm(monkeypatch, enc, "x86_64-unknown-linux-gnu", "haswell", AVX2_ONLY,
                    {"HAVE_AVX2", "HAVE_F16"})
    assert len(instructions(avx2, "vpmaddubsw")) >= 8 * (2 if four_bit else 1)
    assert "zmm" not in avx2 and "vpdpbusd" not in avx2
    vnni = tile_asm(monkeypatch, enc, "x86_64-unknown-linux-gnu", "alderlake",
                    AVX2_ONLY + ",+avxvnni", {"HAVE_AVX2", "HAVE_VNNI", "HAVE_F16"})
    assert len(instructions(vnni, "{vex}") + instructions(vnni, "vpdpbusd")) >= 8 * (
        2 if four_bit else 1), vnni
    assert "zmm" not in vnni and "vpmaddubsw" not in vnni

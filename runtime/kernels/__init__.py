"""Kernel API (docs/INTERNALS.md, "Kernel API"): everything float32 in, float32 out.

    linear(m, x)                          Matrix [n, d], x [T, d] -> [T, n]
    rmsnorm(x, w, eps), layernorm(x, w, b, eps)
    rope_tables(head_dim, max_pos, theta, scaling) -> (cos, sin) [max_pos, head_dim // 2]
    apply_rope(x, cos, sin, positions)    x [T, H, hd] -> rotated copy
    attention(q, k_cache, v_cache, start_pos, k_scale=None, v_scale=None)
    ffn(x, bundles, layout, d, activation, gated, up_bias)

Decode (T == 1) runs Numba matrix-vector kernels on the weights as stored; prefill (T > 1)
dequantizes blocks of rows into a reused float32 tile and multiplies with BLAS. Each kernel's
definition is its NumPy twin in reference.py.

Decode kernels come in three modes, chosen at import (MODE; tests set each in turn):
    "fast"      SIMD intrinsics (simd.py) with AVX2 integer dot products / native float16
                conversion where the CPU has them; int8/int4 weights meet int8 activations
    "generic"   the same kernels with target-independent IR (what a non-x86 CPU runs)
    "portable"  plain Numba with float32 activations: no intrinsics, runs without the JIT
A shape the SIMD kernels do not take (an int4 group size that is not 32 * 2^k, a non-contiguous
matrix) goes to the portable kernels. Quantizing activations (blocks of 32, as llama.cpp's Q8_0)
adds a bounded error to int8/int4 decode: quantizes_activations() says when, and
tests/test_kernels.py states and checks the bound.

ffn() computes straight from row-column bundles: decode reads each row once (gate and up dot
products, then the down column added into a per-thread partial sum); prefill dequantizes tiles.
"""

import os
import threading

import numba
import numpy as np

from .. import encodings
from ..errors import EdgeLLMError
from . import attention as _attention
from . import ffn as _ffn
from . import matvec as _mv
from . import norms as _norms
from . import qgemm as _qgemm
from . import qmatvec as _qmv
from . import rope as _rope
from . import rows16 as _rows16
from . import simd as _simd
from . import sparse as _sparse
from . import tiles as _tiles
from .halfs import F16_TO_F32 as _LUT
from .reference import rope_tables  # noqa: F401  (NumPy, once per model)

__all__ = ["linear", "rmsnorm", "layernorm", "rope_tables", "apply_rope", "attention", "ffn"]

# OpenMP workers that spin while they wait starve a core shared with another busy process: next
# to one such process the 154 parallel matvecs of a token took 1.2 s instead of 42 ms on 2
# threads (benchmarks/kernels.py). Read when Numba starts its threads (the first parallel call);
# a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TILE_BYTES = 1 << 22  # prefill tile (all parts): 4 MiB; smaller tiles made BLAS slower (measured)

_local = threading.local()

MODE = "fast" if _simd.AVAILABLE else "portable"
INT_ENCODINGS = ("int8", "int4", "q8_0", "q4_1")  # decoded against int8 activations (SIMD)


def _tile(rows, d):
    """A reused float32 scratch tile of at least rows x d (one per thread)."""
    buf = getattr(_local, "tile", None)
    if buf is None or buf.size < rows * d:
        buf = np.empty(max(rows * d, TILE_BYTES // 4), dtype=np.float32)
        _local.tile = buf
    return buf[:rows * d].reshape(rows, d)


def _rows_per_tile(d, parts=1):
    return max(16, TILE_BYTES // (4 * d * parts))


def _as_rows(x, d, what):
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != d:
        raise EdgeLLMError(f"{what}: expected input of shape [T, {d}], got {list(x.shape)}")
    return x


# ---------------------------------------------------------------------------------------------
# linear


def _packed(m):
    """(values, scales) of a matrix packed for decode (reader.PackedMatrix; rows16.py) where
    this MODE reads them (not the portable kernels), else None."""
    p = getattr(m, "packed", None)
    return None if MODE == "portable" else p


def _simd_ok(m):
    """True when linear(m, x) with one row runs the SIMD kernels."""
    if _packed(m) is not None:
        return True
    if MODE == "portable" or not m.q.flags.c_contiguous:
        return False
    name = m.codec.name
    if name == "int4":
        g = m.codec.group_size
        return g % 32 == 0 and (g // 32) & (g // 32 - 1) == 0 and m.s.flags.c_contiguous
    if name in ("q8_0", "q4_1"):
        return m.s.flags.c_contiguous
    return name in ("int8", "f16")


def _matvec(m, x, out):
    name = m.codec.name
    if name in encodings.SPARSE_NAMES:
        return _sparse.matvec_matrix(m, x, _LUT, out)
    if _packed(m) is not None:
        pv, ps = m.packed
        _rows16.matvec(pv, ps, _qmv.group_shift(m.codec.group_size), x, _LUT, out,
                       MODE == "fast")
        return out
    if _simd_ok(m):
        fast = MODE == "fast"
        if name == "int4":
            _qmv.matvec_int4(m.q, m.s.view(np.uint16), m.codec.group_size, x, _LUT, out, fast)
        elif name == "int8":
            _qmv.matvec_int8(m.q, m.s, x, out, fast)
        elif name == "q4_1":
            _qmv.matvec_q4_1(m.q, m.s.view(np.uint16), x, _LUT, out, fast)
        elif name == "q8_0":
            _qmv.matvec_q8_0(m.q, m.s.view(np.uint16), x, _LUT, out, fast)
        else:
            _qmv.matvec_f16(m.q.view(np.uint16), x, _LUT, out, fast)
        return out
    if name == "f16":
        _mv.matvec_f16(m.q.view(np.uint16), x, _LUT, out)
    elif name == "int8":
        _mv.matvec_int8(m.q, m.s, x, out)
    elif name == "int4":
        _mv.matvec_int4(m.q, m.s.view(np.uint16), m.codec.group_size, x, _LUT, out)
    elif name == "int3":
        _mv.matvec_int3(m.q, m.s.view(np.uint16), m.codec.group_size, x, _LUT, out)
    elif name == "q4_1":
        _mv.matvec_q4_1(m.q, m.s.view(np.uint16), x, _LUT, out)
    elif name == "q8_0":
        _mv.matvec_q8_0(m.q, m.s.view(np.uint16), x, _LUT, out)
    else:
        raise EdgeLLMError(f"linear: unsupported encoding {name!r}")
    return out


def _dequant_rows(m, r0, r1, out):
    name = m.codec.name
    if name in encodings.SPARSE_NAMES:
        return _sparse.dequant_matrix(m, r0, r1, _LUT, out)
    if _simd_ok(m):
        if name == "int4":
            _tiles.dequant_int4_simd(m.q, m.s.view(np.uint16), _qmv.group_shift(m.codec.group_size),
                                     r0, r1, _LUT, out)
        elif name == "int8":
            _tiles.dequant_int8_simd(m.q, m.s, r0, r1, out)
        elif name == "q4_1":
            _tiles.dequant_q4_1_simd(m.q, m.s.view(np.uint16), r0, r1, _LUT, out)
        elif name == "q8_0":
            _tiles.dequant_q8_0_simd(m.q, m.s.view(np.uint16), r0, r1, _LUT, out)
        else:
            _tiles.dequant_f16_simd(m.q.view(np.uint16), r0, r1, _LUT, out, MODE == "fast")
        return out
    if name == "f16":
        _tiles.dequant_f16(m.q.view(np.uint16), r0, r1, _LUT, out)
    elif name == "int8":
        _tiles.dequant_int8(m.q, m.s, r0, r1, out)
    elif name == "int4":
        _tiles.dequant_int4(m.q, m.s.view(np.uint16), m.codec.group_size, r0, r1, _LUT, out)
    elif name == "int3":
        _tiles.dequant_int3(m.q, m.s.view(np.uint16), m.codec.group_size, r0, r1, _LUT, out)
    elif name == "q4_1":
        _tiles.dequant_q4_1(m.q, m.s.view(np.uint16), r0, r1, _LUT, out)
    elif name == "q8_0":
        _tiles.dequant_q8_0(m.q, m.s.view(np.uint16), r0, r1, _LUT, out)
    else:
        raise EdgeLLMError(f"linear: unsupported encoding {name!r}")
    return out


def _check_matrix(m):
    """The arrays of m agree with its codec (the kernels index them directly). Remembered per
    Matrix while it holds the same arrays (a decode token passes ~150 matrices through here)."""
    n, d = m.shape
    c = m.codec
    packed = getattr(m, "packed", None)
    if packed is not None:
        if packed[0].shape != (n // _rows16.R, 8 * d) or packed[1].shape != (
                n // _rows16.R, _rows16.R * d // c.group_size):
            raise EdgeLLMError(f"linear: packed int4 matrix of shape {list(m.shape)} has "
                               f"values {list(packed[0].shape)} and scales "
                               f"{list(packed[1].shape)}")
        return
    seen = m.__dict__.get("_kernels_checked")
    if seen is not None and seen[0] is m.q and seen[1] is m.s and seen[2] == m.shape:
        return
    if (m.q.shape != c.data_shape(n, d) or m.q.dtype != c.data_dtype()
            or (m.s is None) != (c.scale_shape(n, d) is None)
            or (m.s is not None and (m.s.shape != c.scale_shape(n, d)
                                     or m.s.dtype != c.scale_dtype()))):
        raise EdgeLLMError(f"linear: {c.name} matrix of shape {list(m.shape)} has values "
                           f"{m.q.dtype} {list(m.q.shape)} and scales "
                           f"{None if m.s is None else (m.s.dtype, list(m.s.shape))}")
    m.__dict__["_kernels_checked"] = (m.q, m.s, m.shape)


_NO_SCALES = np.zeros(1, dtype=np.uint16)


def linear_many(ms, x, biases=None):
    """[linear(m, x) (+ bias) for m in ms]. Decode of three matrices of one encoding (q, k, v)
    runs as one call with the activations quantized once (qmatvec.matvec3); same results as
    three linear calls."""
    biases = biases or [None] * len(ms)
    x = np.ascontiguousarray(x, dtype=np.float32)
    names = {(m.codec.name, m.codec.group_size, m.shape[1]) for m in ms}
    packed = [_packed(m) is not None for m in ms]
    if x.ndim == 2 and x.shape[0] > 1 and all(_gemm_ok(m, x.shape[0]) for m in ms):
        outs = _gemm_many(ms, x)  # prefill: x quantized once for all (qgemm.py)
    elif any(packed) and not (all(packed) and len(ms) == 3 and len(names) == 1
                              and x.ndim == 2 and x.shape == (1, ms[0].shape[1])):
        outs = [linear(m, x) for m in ms]
    elif any(packed):
        for m in ms:
            _check_matrix(m)
        outs = [np.empty((1, m.shape[0]), dtype=np.float32) for m in ms]
        (p1, s1), (p2, s2), (p3, s3) = (m.packed for m in ms)
        _rows16.matvec3(_qmv.group_shift(ms[0].codec.group_size), p1, s1, p2, s2, p3, s3, x[0],
                        _LUT, outs[0][0], outs[1][0], outs[2][0], MODE == "fast")
    elif (len(ms) != 3 or x.ndim != 2 or x.shape[0] != 1 or len(names) != 1
            or ms[0].codec.name == "f32" or x.shape[1] != ms[0].shape[1]
            or x.shape[1] % 32 or not all(_simd_ok(m) for m in ms)):
        outs = [linear(m, x) for m in ms]
    else:
        for m in ms:
            _check_matrix(m)
        m0 = ms[0]
        enc = _ffn.ENC_CODES[m0.codec.name]
        gshift = _qmv.group_shift(m0.codec.group_size) if m0.codec.name == "int4" else 0
        # Numba takes no float16 arrays: f16 values and scales go as their bits
        q = [m.q.view(np.uint16) if m.q.dtype == np.float16 else m.q for m in ms]
        s = [_NO_SCALES if m.s is None else
             m.s.view(np.uint16) if m.s.dtype == np.float16 else m.s for m in ms]
        srow = 0 if m0.s is None else m0.s.strides[0]
        outs = [np.empty((1, m.shape[0]), dtype=np.float32) for m in ms]
        _qmv.matvec3(enc, gshift, m0.q.strides[0], srow, q[0], s[0], q[1], s[1], q[2], s[2],
                     x[0], _LUT, outs[0][0], outs[1][0], outs[2][0], MODE == "fast")
    for y, b in zip(outs, biases):
        if b is not None:
            y += b
    return outs


def _gemm_ok(m, T):
    """True when linear(m, x) with T rows runs the integer GEMM (qgemm.use_gemm: the rule)."""
    return (MODE == "fast" and m.codec.name in _qgemm.CODES and _simd_ok(m)
            and _qgemm.use_gemm(m.codec.name, m.codec.group_size, m.shape[0], m.shape[1], T))


def _gemm_many(ms, x):
    """Prefill products of x f32[T, d] with matrices that _gemm_ok took, x quantized once."""
    for m in ms:
        x = _as_rows(x, m.shape[1], "linear")
        _check_matrix(m)
    act = _qgemm.Activations(x)
    outs = []
    for m in ms:
        y = _qgemm.matmul_packed(m, act) if _packed(m) is not None else _qgemm.matmul(m, act)
        outs.append(y[:x.shape[0]])
    return outs


def linear(m, x, float_act=False):
    """x f32[T, d] @ m.T for an encoded Matrix m [n, d] -> f32[T, n]. float_act: one row too
    with float32 activations, through prefill's tiles (a prefill's last token through the head;
    SmolLM2's head 10 ms, the portable matvec 18, the SIMD one 2), instead of the SIMD kernels'
    int8 activation blocks."""
    n, d = m.shape
    x = _as_rows(x, d, "linear")
    T = x.shape[0]
    if getattr(m, "packed", None) is not None and not (
            _packed(m) is not None and not float_act and (T == 1 or _gemm_ok(m, T))):
        m = m.rows()  # the stored rows, a copy for this call, where no packed kernel takes it
    _check_matrix(m)
    if m.codec.name == "f32":
        return x @ m.q.T
    if T == 1 and not (float_act and quantizes_activations(m, 1)):
        out = np.empty((1, n), dtype=np.float32)
        _matvec(m, x[0], out[0])
        return out
    if not float_act and _gemm_ok(m, T):
        return _gemm_many([m], x)[0]
    # out^T = W x^T tile by tile: BLAS runs this orientation faster for short T (measured)
    xT = np.ascontiguousarray(x.T)
    outT = np.empty((n, T), dtype=np.float32)
    rows = _rows_per_tile(d)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = _dequant_rows(m, r0, r1, _tile(r1 - r0, d))
        np.matmul(w, xT, out=outT[r0:r1])
    return np.ascontiguousarray(outT.T)


# ---------------------------------------------------------------------------------------------
# norms, rope, attention


def rmsnorm(x, w, eps):
    x = np.ascontiguousarray(x, dtype=np.float32)
    return _norms.rmsnorm(x, np.asarray(w, np.float32), float(eps), np.empty_like(x))


def layernorm(x, w, b, eps):
    x = np.ascontiguousarray(x, dtype=np.float32)
    return _norms.layernorm(x, np.asarray(w, np.float32), np.asarray(b, np.float32), float(eps),
                            np.empty_like(x))


def apply_rope(x, cos, sin, positions):
    x = np.ascontiguousarray(x, dtype=np.float32)
    positions = np.ascontiguousarray(positions, dtype=np.int64)
    if positions.shape != (x.shape[0],):
        raise EdgeLLMError(f"apply_rope: {x.shape[0]} rows but {positions.shape} positions")
    # one or two positions (decode): plain comparisons; NumPy reductions cost more than
    # rotating one token
    if positions.size and (min(positions[0], positions[-1]) < 0
                           or max(positions[0], positions[-1]) >= cos.shape[0]
                           or (positions.size > 2 and (positions.min() < 0
                                                       or positions.max() >= cos.shape[0]))):
        raise EdgeLLMError(f"apply_rope: position out of range 0..{cos.shape[0] - 1}")
    return _rope.apply_rope(x, cos, sin, positions, np.empty_like(x))


def attention(q, k_cache, v_cache, start_pos, k_scale=None, v_scale=None):
    """Caches float32, float16, or int8 with scales f32[KVH, C] (kvcache.py), read as stored."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    T, H, hd = q.shape
    if H % k_cache.shape[0]:
        raise EdgeLLMError(f"attention: {H} query heads is not a multiple of "
                           f"{k_cache.shape[0]} kv heads")
    if start_pos + T > k_cache.shape[1]:
        raise EdgeLLMError(f"attention: positions up to {start_pos + T} exceed the cache "
                           f"({k_cache.shape[1]})")
    if k_cache.dtype != v_cache.dtype or (k_cache.dtype == np.int8) != (k_scale is not None):
        raise EdgeLLMError(f"attention: caches {k_cache.dtype}/{v_cache.dtype} with scales "
                           f"{k_scale is not None}: expected float32, float16, or int8 with scales")
    lut = None
    if k_cache.dtype == np.float16:
        k_cache, v_cache, lut = k_cache.view(np.uint16), v_cache.view(np.uint16), _LUT
    elif k_cache.dtype != np.float32 and k_cache.dtype != np.int8:
        raise EdgeLLMError(f"attention: unsupported cache dtype {k_cache.dtype}")
    simd = {"fast": 2, "generic": 1}.get(MODE, 0)  # float16 conversion (attention._f16_row)
    return _attention.attention(q, k_cache, v_cache, k_scale, v_scale, lut, simd,
                                int(start_pos), np.empty_like(q))


# ---------------------------------------------------------------------------------------------
# ffn


def _part_table(layout, gated, d, bundles, separate_down=False):
    """(encs, offs, soffs, gs) int64[3] by slot 0 gate, 1 up, 2 down; checks that every part
    lies inside a row (the kernels address bytes directly). separate_down: the layout has no
    down part (slot 2 is NONE), the down projection is a matrix of its own."""
    if bundles.dtype != np.uint8 or bundles.ndim != 2:
        raise EdgeLLMError(f"ffn: bundles must be uint8 [n, stride], got {bundles.dtype} "
                           f"{list(bundles.shape)}")
    stride = bundles.shape[1]
    tab = np.zeros((4, 3), dtype=np.int64)
    tab[0, 2] = _ffn.NONE
    slot = {"gate": 0, "up": 1} if separate_down else {"gate": 0, "up": 1, "down": 2}
    seen = set()
    for e in layout:
        if e["name"] not in slot:
            raise EdgeLLMError(f"ffn: unknown bundle part {e['name']!r}")
        i = slot[e["name"]]
        seen.add(e["name"])
        tab[0, i] = _ffn.ENC_CODES[e["encoding"]]
        tab[1, i] = e["offset"]
        tab[2, i] = e["scale_offset"] if e["scale_offset"] is not None else 0
        tab[3, i] = e["group_size"] or 0
        c = encodings.codec(e["encoding"], e["group_size"])
        if hasattr(c, "check"):
            c.check(d)
        end = e["offset"] + int(np.prod(c.data_shape(1, d))) * c.data_dtype().itemsize
        if c.scale_shape(1, d) is not None:
            if e["scale_offset"] is None:
                raise EdgeLLMError(f"ffn: bundle part {e['name']!r} has no scale offset")
            end = max(end, e["scale_offset"]
                      + int(np.prod(c.scale_shape(1, d))) * c.scale_dtype().itemsize)
        if end > stride:
            raise EdgeLLMError(f"ffn: bundle part {e['name']!r} ends at byte {end}, past the "
                               f"row stride {stride} (d = {d})")
    need = {"gate", "up"} if gated else {"up"}
    if not separate_down:
        need.add("down")
    if not need <= seen:
        raise EdgeLLMError(f"ffn: bundle layout lacks parts {sorted(need - seen)}")
    return tab


_TABLES = {}  # part tables by layout contents: built once per layer shape, not per token


def _part_table_cached(layout, gated, d, bundles, separate_down):
    if bundles.dtype != np.uint8 or bundles.ndim != 2:
        return _part_table(layout, gated, d, bundles, separate_down)  # raises
    key = (tuple((e.get("name"), e.get("encoding"), e.get("group_size"), e.get("offset"),
                  e.get("scale_offset")) for e in layout),
           bool(gated), int(d), bundles.shape[1], bool(separate_down))
    tab = _TABLES.get(key)
    if tab is None:
        tab = _part_table(layout, gated, d, bundles, separate_down)
        tab.flags.writeable = False
        if len(_TABLES) > 1024:
            _TABLES.clear()
        _TABLES[key] = tab
    return tab


def _ffn_simd_ok(layout):
    if MODE == "portable":
        return False
    for e in layout:
        g = e["group_size"]
        if e["encoding"] == "int4" and (g % 32 or (g // 32) & (g // 32 - 1)):
            return False
        if e["encoding"] == "int3":  # no SIMD int3 kernels yet
            return False
    return True


def _ffn_gemm_parts(layout, T, n=_qgemm.RM, d=None):
    """Names of the bundle parts (gate, up) whose prefill products with T tokens run the integer
    GEMM (qgemm.use_gemm; n neurons of d inputs; d None: any d it takes). The down part stays
    with the float tiles: its blocks run along d, the output, not along the sum."""
    if MODE != "fast" or T < 2 or not _ffn_simd_ok(layout):
        return set()
    return {e["name"] for e in layout
            if e["name"] in ("gate", "up")
            and _qgemm.use_gemm(e["encoding"], e["group_size"], n,
                                d if d is not None else 128, T)}


def _group_shifts(tab):
    out = np.zeros(3, dtype=np.int64)
    for i in range(3):
        if tab[3, i]:
            out[i] = int(tab[3, i] // 32).bit_length() - 1
    return out


def ffn(x, bundles, layout, d, activation, gated, up_bias=None, down=None, float_act=False,
        packed=None):
    """Feed-forward over the neurons in bundle rows uint8[n, stride] -> f32[T, d]. down: the
    down projection as a Matrix [d, n] (columns in bundle-row order) when the bundles hold no
    down part (a GGUF kept as is: its down blocks run along d_ff, not along a column).
    float_act: prefill (T > 1) with float32 activations only (no integer GEMM; w8a8.py's
    per-token mode, which quantizes x itself). packed: the bundles packed 16 rows a group
    (reader.PackedBundles; bundles None), read by prefill's integer GEMM where it takes them,
    else as their stored rows (a copy for this call)."""
    x = _as_rows(x, d, "ffn")
    T = x.shape[0]
    if packed is not None:
        first = {"gate", "up"} if gated else {"up"}
        n = packed.groups.shape[0] * _rows16.R
        if (MODE == "fast" and not float_act and T > 1 and down is not None
                and first <= _ffn_gemm_parts(layout, T, n, d)):
            act = _qgemm.Activations(x)
            u = _qgemm.matmul_packed(packed, act, len(first) - 1)[:T]
            if gated:
                h = _activate(_qgemm.matmul_packed(packed, act, 0)[:T], activation) * u
            else:
                h = _activate(u + up_bias if up_bias is not None else u, activation)
            return linear(down, h)
        bundles = packed.rows()
    if activation not in _ffn.ACT_CODES:
        raise EdgeLLMError(f"ffn: unknown activation {activation!r} (known: silu, relu)")
    kind = _ffn.ACT_CODES[activation]
    bundles = np.ascontiguousarray(bundles)
    if _sparse.is_sparse_layout(layout):  # pruned weights (kernels/sparse.py)
        return _sparse.ffn(x, bundles, layout, d, kind, gated, up_bias, down, linear,
                           lambda v: _activate(v, activation), _LUT)
    tab = _part_table_cached(layout, gated, d, bundles, down is not None)
    n = bundles.shape[0]
    if down is not None and down.shape != (d, n):
        raise EdgeLLMError(f"ffn: down matrix of shape {list(down.shape)} for {n} neurons and "
                           f"d = {d}")
    has_bias = up_bias is not None and not gated
    bias = np.asarray(up_bias, np.float32) if has_bias else np.zeros(1, np.float32)
    if n == 0:
        return np.zeros((T, d), dtype=np.float32)
    if T == 1:
        partial = np.empty((max(1, min(numba.get_num_threads(), n)), d), dtype=np.float32)
        hidden = np.empty(n if down is not None else 1, dtype=np.float32)
        if _ffn_simd_ok(layout):
            # a separate down matrix the SIMD rows take is multiplied inside the same call
            fused = (down is not None and n % 32 == 0 and down.codec.name != "f32"
                     and _simd_ok(down))
            if fused:  # the fused decode's own description of a matrix (packed or not)
                from .fused import _arrays, _enc

                _check_matrix(down)
                dq, ds = _arrays(down)
                denc, dshift, dqrow, dsrow = _enc(down)
            else:
                dq = ds = _NO_SCALES
                denc, dshift, dqrow, dsrow = _ffn.NONE, 0, 0, 0
            out = _ffn.ffn_decode_simd(x[0], bundles, tab[0], tab[1], tab[2], _group_shifts(tab),
                                       d, kind, gated, bias, has_bias, _LUT, partial, hidden,
                                       dq, ds, denc, dshift, dqrow, dsrow, MODE == "fast")
            if fused:
                return out.reshape(1, d)
        else:
            out = _ffn.ffn_decode(x[0], bundles, tab[0], tab[1], tab[2], tab[3], d, kind, gated,
                                  bias, has_bias, _LUT, partial, hidden)
        if down is not None:
            return linear(down, hidden.reshape(1, n))
        return out.reshape(1, d)
    simd = _ffn_simd_ok(layout)
    shifts = _group_shifts(tab)
    # gate and up through the integer GEMM (qgemm.py) where the rule takes them: all rows in
    # one call each, x quantized once
    gemm = set() if float_act else _ffn_gemm_parts(layout, T, n, d)
    first = {"gate", "up"} if gated else {"up"}
    if down is not None and first <= gemm:
        # the whole first stage, token-major f32[T, n]: the hidden goes to down as it is
        act = _qgemm.Activations(x)
        u = _qgemm.matmul_part(bundles, tab[0, 1], tab[1, 1], tab[2, 1], shifts[1], n, d,
                               act, tokens_first=True)[:T]
        if gated:
            g = _qgemm.matmul_part(bundles, tab[0, 0], tab[1, 0], tab[2, 0], shifts[0], n, d,
                                   act, tokens_first=True)[:T]
            h = _activate(g, activation) * u
        else:
            if has_bias:
                u += bias
            h = _activate(u, activation)
        return linear(down, h)
    prods = [None, None]  # f32[n, T + padding] (by neuron, as the tiles' products below)
    if gemm:
        act = _qgemm.Activations(x)
        for i, name in ((0, "gate"), (1, "up")):
            if name in gemm:
                prods[i] = _qgemm.matmul_part(bundles, tab[0, i], tab[1, i], tab[2, i],
                                              shifts[i], n, d, act)[:, :T]
    xT = np.ascontiguousarray(x.T)
    outT = np.zeros((d, T), dtype=np.float32)  # transposed products: see linear
    hT = np.empty((n, T), dtype=np.float32) if down is not None else None
    rows = _rows_per_tile(d, 3)
    tile = _tile(3 * rows, d)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        k = r1 - r0
        w = [None, None, None]
        for i in (0, 1, 2) if gated else (1, 2):
            if (i == 2 and down is not None) or (i < 2 and prods[i] is not None):
                continue
            t = tile[i * rows:i * rows + k]
            if simd:
                w[i] = _ffn.dequant_part_simd(bundles, r0, r1, tab[0, i], tab[1, i], tab[2, i],
                                              shifts[i], d, _LUT, t, MODE == "fast")
            else:
                w[i] = _ffn.dequant_part(bundles, r0, r1, tab[0, i], tab[1, i], tab[2, i],
                                         tab[3, i], d, _LUT, t)
        u = w[1] @ xT if prods[1] is None else prods[1][r0:r1]  # (k, T)
        if gated:
            g = w[0] @ xT if prods[0] is None else prods[0][r0:r1]
            h = _activate(g, activation) * u
        else:
            if has_bias:
                u += bias[r0:r1, None]
            h = _activate(u, activation)
        if down is not None:
            hT[r0:r1] = h
        else:
            outT += w[2].T @ h
    if down is not None:
        return linear(down, hT.T, float_act)
    return np.ascontiguousarray(outT.T)


def _activate(v, activation):
    if activation == "silu":
        with np.errstate(over="ignore"):  # exp(-v) -> inf for v << 0 gives silu = -0, as it should
            return v / (np.float32(1.0) + np.exp(-v))
    return np.maximum(v, np.float32(0.0))


# ---------------------------------------------------------------------------------------------
# what the tests need to know to state honest error bounds


def quantizes_activations(m, T):
    """True when linear(m, x) with T rows quantizes x to int8 blocks of 32 (adds bounded error):
    decode's SIMD kernels, and prefill's integer GEMM."""
    if T == 1:
        return m.codec.name in INT_ENCODINGS and _simd_ok(m)
    return _gemm_ok(m, T)


def ffn_quantizes_activations(layout, T):
    """{part name: True when its dot products with x use int8-quantized activations} (prefill:
    when the layer's d suits the integer GEMM, which this does not see: a superset)."""
    simd = T == 1 and _ffn_simd_ok(layout)
    gemm = _ffn_gemm_parts(layout, T)
    return {e["name"]: (simd and e["encoding"] in INT_ENCODINGS) or e["name"] in gemm
            for e in layout}

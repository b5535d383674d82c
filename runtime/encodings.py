"""Weight encodings: the one codec per encoding, used by the writer, the reader and the kernels' tests.

Every encoding turns a float32 matrix x[n, d] (n rows of length d, quantized along d) into a pair
(q, s): q holds the values, s the scales (None when the encoding has none). docs/FORMAT.md gives
the byte layout; the functions here are its executable definition.

    f32   q float32 [n, d]                       s None
    f16   q float16 [n, d]                       s None
    int8  q int8    [n, d]                       s float32 [n]          x = q * s[row]
    int4  q uint8   [n, d/2] (two per byte)      s float16 [n, d/g]     x = (nibble - 8) * s[row, group]
    q8_0  q int8    [n, d]                       s float16 [n, d/32]    x = q * s[row, block]
    q4_1  q uint8   [n, d/2] (as int4)           s float16 [n, d/16]    x = nibble * s[r, 2b] + s[r, 2b+1]

q8_0 and q4_1 hold llama.cpp's blocks of the same names (32 values each) with the values of a row
first and the per-block float16 numbers separate, as int4 does; int4 with groups of 32 holds
Q4_0's blocks. A GGUF's Q8_0, Q4_0 and Q4_1 tensors are re-laid out into them byte for byte
(converters/sources/gguf.py, `--quant keep`) and decode to the very values llama.cpp computes.

int4 packs each run of 32 values as llama.cpp's Q4_0 does: byte k of the run holds value k in its
low nibble and value k+16 in its high nibble, so unpacking gives two contiguous halves. A group
(g = 32, 64, 128 ...) shares one scale; g is a multiple of 32.

>>> import numpy as np
>>> x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
>>> c = codec("int4", group_size=32)
>>> q, s = c.quantize(x)
>>> q.shape, q.dtype, s.shape, s.dtype
((1, 32), dtype('uint8'), (1, 2), dtype('float16'))
>>> bool(np.abs(c.dequantize(q, s) - x).max() <= c.max_error_bound(x))
True
"""

import numpy as np

from .errors import EdgeLLMError

INT4_BLOCK = 32  # values per packed run (see the module docstring)
GGML_BLOCK = 32  # values per block of q8_0 and q4_1


class F32:
    name = "f32"
    group_size = None

    def quantize(self, x):
        return np.ascontiguousarray(x, dtype=np.float32), None

    def dequantize(self, q, s):
        return np.asarray(q, dtype=np.float32)

    def data_shape(self, n, d):
        return (n, d)

    def data_dtype(self):
        return np.dtype(np.float32)

    def scale_shape(self, n, d):
        return None

    def scale_dtype(self):
        return None

    def max_error_bound(self, x):
        return 0.0


class F16(F32):
    name = "f16"

    def quantize(self, x):
        x = np.asarray(x, dtype=np.float32)
        if np.abs(x).max(initial=0) > 65504:
            raise EdgeLLMError("value out of float16 range; use f32 or an integer encoding")
        return x.astype(np.float16), None

    def data_dtype(self):
        return np.dtype(np.float16)

    def max_error_bound(self, x):
        return float(np.abs(x).max(initial=0)) * 2.0**-11 + 2.0**-24


class Int8(F32):
    """Per-row symmetric int8: s = max|x| / 127."""

    name = "int8"

    def quantize(self, x):
        x = np.asarray(x, dtype=np.float32)
        s = (np.abs(x).max(axis=1) / 127.0).astype(np.float32)
        inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
        q = np.clip(np.rint(x * inv[:, None]), -127, 127).astype(np.int8)
        return q, s

    def dequantize(self, q, s):
        return q.astype(np.float32) * np.asarray(s, dtype=np.float32)[:, None]

    def data_dtype(self):
        return np.dtype(np.int8)

    def scale_shape(self, n, d):
        return (n,)

    def scale_dtype(self):
        return np.dtype(np.float32)

    def max_error_bound(self, x):
        return float(np.abs(x).max(initial=0)) / 127.0 * 0.5 * 1.0001


class Int4(F32):
    """Group-wise int4 with float16 scales, Q4_0 convention: s = m / -8 where m is the value of
    largest magnitude in the group, q = clip(round(x / s) + 8, 0, 15)."""

    name = "int4"

    def __init__(self, group_size=32):
        if group_size is None or group_size <= 0 or group_size % INT4_BLOCK:
            raise EdgeLLMError(f"int4 group size must be a positive multiple of {INT4_BLOCK}, "
                               f"got {group_size}")
        self.group_size = int(group_size)

    def check(self, d):
        if d % self.group_size:
            raise EdgeLLMError(f"int4 with group size {self.group_size} needs a row length "
                               f"divisible by it, got {d}")

    ZERO = 8  # code of 0.0; codes run 0 .. 2 * ZERO - 1 (int3: 4, 0 .. 7)

    def scales(self, x):
        """f16 [n, d/g]: the writer rule's scale of each group, m / -ZERO."""
        n, d = x.shape
        g = x.reshape(n, d // self.group_size, self.group_size)
        idx = np.abs(g).argmax(axis=2)
        m = np.take_along_axis(g, idx[..., None], axis=2)[..., 0]
        return (m / -float(self.ZERO)).astype(np.float16)

    def codes(self, x, s):
        """uint8 codes [n, d] of x for the given scales s [n, d/g] (0.0 -> ZERO where s = 0)."""
        n, d = x.shape
        g = np.asarray(x, dtype=np.float32).reshape(n, d // self.group_size, self.group_size)
        s32 = np.asarray(s).astype(np.float32)
        inv = np.divide(1.0, s32, out=np.zeros_like(s32), where=s32 != 0)
        return np.clip(np.rint(g * inv[..., None]) + self.ZERO, 0,
                       2 * self.ZERO - 1).astype(np.uint8).reshape(n, d)

    def quantize(self, x):
        x = np.asarray(x, dtype=np.float32)
        n, d = x.shape
        self.check(d)
        s = self.scales(x)
        return self.pack(self.codes(x, s)), s

    def pack(self, codes):
        return pack_nibbles(codes)

    def unpack(self, q):
        return unpack_nibbles(q)

    def dequantize(self, q, s):
        n = q.shape[0]
        vals = self.unpack(q).astype(np.float32) - float(self.ZERO)
        d = vals.shape[1]
        g = vals.reshape(n, d // self.group_size, self.group_size)
        return (g * np.asarray(s, dtype=np.float32)[..., None]).reshape(n, d)

    def data_shape(self, n, d):
        return (n, d // 2)

    def data_dtype(self):
        return np.dtype(np.uint8)

    def scale_shape(self, n, d):
        return (n, d // self.group_size)

    def scale_dtype(self):
        return np.dtype(np.float16)

    def max_error_bound(self, x):
        # one full step |m|/8: a value of the opposite sign to the group's extreme m is up to
        # 8 steps away but the nibble stops at +7 (e.g. [1, -1, -1, ...] decodes 1 as 0.875);
        # plus the float16 rounding of the scale (|m| * 2^-11 worst case)
        return float(np.abs(x).max(initial=0)) * (1 / 8 + 2.0**-10) * 1.0001


class Q8_0(Int8):
    """llama.cpp's Q8_0: blocks of 32 int8 values with a float16 scale, s = f16(max|x| / 127)."""

    name = "q8_0"
    group_size = GGML_BLOCK

    def __init__(self, group_size=None):
        if group_size not in (None, GGML_BLOCK):
            raise EdgeLLMError(f"{self.name} has blocks of {GGML_BLOCK} values, got group size "
                               f"{group_size}")

    def check(self, d):
        if d % GGML_BLOCK:
            raise EdgeLLMError(f"{self.name} needs a row length divisible by {GGML_BLOCK}, got {d}")

    def quantize(self, x):
        x = np.asarray(x, dtype=np.float32)
        n, d = x.shape
        self.check(d)
        b = x.reshape(n, d // GGML_BLOCK, GGML_BLOCK)
        s = (np.abs(b).max(axis=2) / np.float32(127.0)).astype(np.float16)
        s32 = s.astype(np.float32)
        inv = np.divide(1.0, s32, out=np.zeros_like(s32), where=s32 != 0)
        q = np.clip(np.rint(b * inv[..., None]), -127, 127).astype(np.int8).reshape(n, d)
        return q, s

    def dequantize(self, q, s):
        n, d = q.shape
        b = q.reshape(n, d // GGML_BLOCK, GGML_BLOCK).astype(np.float32)
        return (b * np.asarray(s, dtype=np.float32)[..., None]).reshape(n, d)

    def scale_shape(self, n, d):
        return (n, d // GGML_BLOCK)

    def scale_dtype(self):
        return np.dtype(np.float16)

    def max_error_bound(self, x):
        # half a step of the largest block, plus the float16 rounding of its scale times 127
        return float(np.abs(x).max(initial=0)) * (0.5 / 127 + 2.0**-11) * 1.0001


class Q4_1(Q8_0):
    """llama.cpp's Q4_1: blocks of 32 unsigned 4-bit codes with a float16 step and minimum:
    x = code * step + min, computed as two float32 roundings (a product, then a sum) as llama.cpp's
    reference dequantization and gguf.quants do. Writer rule: min = f16(min x),
    step = f16((max x - min x) / 15), code = clip(rint((x - min) / step), 0, 15)."""

    name = "q4_1"

    def quantize(self, x):
        x = np.asarray(x, dtype=np.float32)
        n, d = x.shape
        self.check(d)
        b = x.reshape(n, d // GGML_BLOCK, GGML_BLOCK)
        lo = b.min(axis=2).astype(np.float16)
        step = ((b.max(axis=2) - lo.astype(np.float32)) / np.float32(15.0)).astype(np.float16)
        st32 = step.astype(np.float32)
        inv = np.divide(1.0, st32, out=np.zeros_like(st32), where=st32 != 0)
        code = np.rint((b - lo.astype(np.float32)[..., None]) * inv[..., None])
        nib = np.clip(code, 0, 15).astype(np.uint8).reshape(n, d)
        s = np.stack([step, lo], axis=2).reshape(n, 2 * (d // GGML_BLOCK))
        return pack_nibbles(nib), s

    def dequantize(self, q, s):
        n = q.shape[0]
        vals = unpack_nibbles(q).astype(np.float32)
        d = vals.shape[1]
        sm = np.asarray(s, dtype=np.float32).reshape(n, d // GGML_BLOCK, 2)
        b = vals.reshape(n, d // GGML_BLOCK, GGML_BLOCK)
        return (b * sm[..., 0:1] + sm[..., 1:2]).reshape(n, d)

    def data_shape(self, n, d):
        return (n, d // 2)

    def data_dtype(self):
        return np.dtype(np.uint8)

    def scale_shape(self, n, d):
        return (n, 2 * (d // GGML_BLOCK))

    def max_error_bound(self, x):
        # half a step (range / 30) plus the float16 roundings of min and of step (times 15)
        a = float(np.abs(x).max(initial=0))
        return a * (1 / 15 + 2.0**-10 + 30 * 2.0**-11) * 1.0001


class Int3(Int4):
    """Group-wise int3 with float16 scales, the int4 rule with 3-bit codes: s = m / -4 where m
    is the value of largest magnitude in the group, q = clip(round(x / s) + 4, 0, 7); 12 bytes
    per run of 32 values (pack_int3)."""

    name = "int3"
    ZERO = 4

    def __init__(self, group_size=32):
        if group_size is None or group_size <= 0 or group_size % INT4_BLOCK:
            raise EdgeLLMError(f"int3 group size must be a positive multiple of {INT4_BLOCK}, "
                               f"got {group_size}")
        self.group_size = int(group_size)

    def check(self, d):
        if d % self.group_size:
            raise EdgeLLMError(f"int3 with group size {self.group_size} needs a row length "
                               f"divisible by it, got {d}")

    def pack(self, codes):
        return pack_int3(codes)

    def unpack(self, q):
        return unpack_int3(q)

    def data_shape(self, n, d):
        return (n, d // INT4_BLOCK * INT3_RUN_BYTES)

    def max_error_bound(self, x):
        # as int4's, with a step of |m|/4
        return float(np.abs(x).max(initial=0)) * (1 / 4 + 2.0**-10) * 1.0001


INT3_RUN_BYTES = 12  # bytes per run of 32 int3 codes: 8 of low bit pairs, 4 of high bits


def pack_int3(codes):
    """uint8 codes 0..7 [n, d] -> uint8 [n, d/32 * 12]. Per run of 32 values v0..v31: byte k
    (k < 8) holds the low two bits of v[k], v[k+8], v[k+16], v[k+24] at bits 0-1, 2-3, 4-5, 6-7;
    byte 8 + m holds the high bits of v[8m] .. v[8m+7] at bits 0 .. 7."""
    n, d = codes.shape
    c = codes.reshape(n, d // INT4_BLOCK, 4, 8).astype(np.uint8)  # [.., k // 8, k % 8]
    lo = c & 3
    low = lo[:, :, 0] | (lo[:, :, 1] << 2) | (lo[:, :, 2] << 4) | (lo[:, :, 3] << 6)  # [n, r, 8]
    hi = np.packbits((c >> 2) & 1, axis=3, bitorder="little")[..., 0]  # [n, r, 4]
    return np.concatenate([low, hi], axis=2).reshape(n, d // INT4_BLOCK * INT3_RUN_BYTES)


def unpack_int3(q):
    """Inverse of pack_int3: uint8 [n, d/32 * 12] -> codes 0..7 [n, d]."""
    n, h = q.shape
    r = h // INT3_RUN_BYTES
    b = q.reshape(n, r, INT3_RUN_BYTES)
    low = b[:, :, :8]
    lo = np.stack([(low >> (2 * i)) & 3 for i in range(4)], axis=2)  # [n, r, 4, 8]
    hi = np.unpackbits(b[:, :, 8:, None], axis=3, bitorder="little")  # [n, r, 4, 8]
    return (lo | (hi << 2)).astype(np.uint8).reshape(n, r * INT4_BLOCK)


def pack_nibbles(nib):
    """uint8 values 0..15 [n, d] -> packed uint8 [n, d/2], Q4_0 order within each run of 32."""
    n, d = nib.shape
    b = nib.reshape(n, d // INT4_BLOCK, 2, INT4_BLOCK // 2)
    return (b[:, :, 0, :] | (b[:, :, 1, :] << 4)).reshape(n, d // 2)


def unpack_nibbles(q):
    """Inverse of pack_nibbles: packed uint8 [n, d/2] -> values 0..15 [n, d]."""
    n, h = q.shape
    b = q.reshape(n, h // (INT4_BLOCK // 2), 1, INT4_BLOCK // 2)
    return np.concatenate([b & 0x0F, b >> 4], axis=2).reshape(n, 2 * h)


NAMES = ("f32", "f16", "int8", "int4", "int3", "q8_0", "q4_1")


def codec(name, group_size=None):
    """The codec for an encoding name as written in the manifest."""
    if name in SPARSE_NAMES:
        return Sparse(name, group_size)
    if name == "f32":
        return F32()
    if name == "f16":
        return F16()
    if name == "int8":
        return Int8()
    if name == "int4":
        return Int4(group_size if group_size is not None else 32)
    if name == "q8_0":
        return Q8_0(group_size)
    if name == "q4_1":
        return Q4_1(group_size)
    if name == "int3":
        return Int3(group_size if group_size is not None else 32)
    raise EdgeLLMError(f"unknown encoding {name!r} (known: {', '.join(NAMES)})")


# ---------------------------------------------------------------------------------------------
# Sparse matrices (pruned weights, converters/prune.py): half of every row is kept, in one of two
# patterns, and the kept values go through a dense codec (f16, int8, int4) as a row of length d/2.
#
#   sp24_*  2:4: in every group of 4 values of a row at most 2 are non-zero. The kept values are
#           stored planar: first the lower-position value of each of the G = d/4 groups, then the
#           higher one (u = [V0, V1]); a 4-bit code per group, i0 | i1 << 2 with i0 < i1, gives
#           their positions. Code byte k of a row holds group k (low nibble) and group k + G/2
#           (high nibble), so a kernel reads the codes as two contiguous runs.
#   sp50_*  unstructured 50%: exactly d/2 slots per row; a bitmask (bit j of byte k: position
#           8k + j is kept) and the kept values in position order.
#
# q is uint8 [n, V + d/8]: the value codec's bytes for the d/2 kept values (V of them), then the
# d/8 code or mask bytes; s is the value codec's scales for [n, d/2] (int8: f32 [n]; int4: f16
# [n, d/2/g]). A row length divisible by 8 is required (int4 values: d/2 divisible by g).

SPARSE_PATTERNS = ("sp24", "sp50")
SPARSE_VALUES = ("f16", "int8", "int4")
SPARSE_NAMES = tuple(f"{p}_{v}" for p in SPARSE_PATTERNS for v in SPARSE_VALUES)
NAMES = NAMES + SPARSE_NAMES


def sparse_name(pattern, value):
    """"sp24" or "sp50" with a value encoding -> the encoding name, e.g. sp24_int8."""
    name = f"{pattern}_{value}"
    if name not in SPARSE_NAMES:
        raise EdgeLLMError(f"no sparse encoding {name!r} (patterns {', '.join(SPARSE_PATTERNS)}; "
                           f"values {', '.join(SPARSE_VALUES)})")
    return name


class Sparse:
    def __init__(self, name, group_size=None):
        self.name = name
        self.pattern, value = name.split("_", 1)
        if value == "int4":
            self.value = Int4(group_size if group_size is not None else 32)
        else:
            if group_size is not None:
                raise EdgeLLMError(f"{name} takes no group size, got {group_size}")
            self.value = codec(value)
        self.group_size = self.value.group_size

    def check(self, d):
        if d % 8:
            raise EdgeLLMError(f"{self.name} needs a row length divisible by 8, got {d}")
        if hasattr(self.value, "check"):
            try:
                self.value.check(d // 2)
            except EdgeLLMError:
                raise EdgeLLMError(f"{self.name} with group size {self.group_size} needs half "
                                   f"the row length divisible by it, got {d}") from None

    def value_bytes(self, d):
        """Bytes of the packed values at the start of each row."""
        return int(np.prod(self.value.data_shape(1, d // 2))) * self.value.data_dtype().itemsize

    def compress(self, x):
        """float32 [n, d] in the pattern -> (kept values f32 [n, d/2], codes uint8 [n, d/8]).
        Raises EdgeLLMError when a row does not fit the pattern."""
        x = np.asarray(x, dtype=np.float32)
        n, d = x.shape
        self.check(d)
        nz = x != 0
        if self.pattern == "sp24":
            g4 = x.reshape(n, d // 4, 4)
            cnt = nz.reshape(n, d // 4, 4).sum(axis=2)
            if (cnt > 2).any():
                r, gi = np.argwhere(cnt > 2)[0]
                raise EdgeLLMError(f"row {r}: group {gi} has {cnt[r, gi]} non-zero values, "
                                   "2:4 allows 2")
            # the two kept positions: the non-zeros first, then the lowest zero positions
            order = np.argsort(~nz.reshape(n, d // 4, 4), axis=2, kind="stable")[:, :, :2]
            pos = np.sort(order, axis=2)
            vals = np.take_along_axis(g4, pos, axis=2)  # [n, G, 2]
            u = np.concatenate([vals[:, :, 0], vals[:, :, 1]], axis=1)
            code = (pos[:, :, 0] | (pos[:, :, 1] << 2)).astype(np.uint8)  # [n, G]
            half = d // 8
            codes = code[:, :half] | (code[:, half:] << 4)
            return np.ascontiguousarray(u), np.ascontiguousarray(codes, dtype=np.uint8)
        cnt = nz.sum(axis=1)
        if (cnt > d // 2).any():
            r = int(np.argmax(cnt > d // 2))
            raise EdgeLLMError(f"row {r} has {cnt[r]} non-zero values, sp50 keeps {d // 2}")
        order = np.argsort(~nz, axis=1, kind="stable")[:, :d // 2]
        pos = np.sort(order, axis=1)
        mask = np.zeros((n, d), dtype=bool)
        np.put_along_axis(mask, pos, True, axis=1)
        u = np.take_along_axis(x, pos, axis=1)
        return np.ascontiguousarray(u), np.packbits(mask, axis=1, bitorder="little")

    def expand(self, u, codes, d):
        """Inverse of compress: kept values f32 [n, d/2] and codes -> float32 [n, d]."""
        n = u.shape[0]
        out = np.zeros((n, d), dtype=np.float32)
        if self.pattern == "sp24":
            G = d // 4
            code = np.concatenate([codes & 15, codes >> 4], axis=1).astype(np.int64)  # [n, G]
            g4 = out.reshape(n, G, 4)
            np.put_along_axis(g4, (code & 3)[..., None], u[:, :G, None], axis=2)
            np.put_along_axis(g4, (code >> 2)[..., None], u[:, G:, None], axis=2)
            return out
        mask = np.unpackbits(codes, axis=1, count=d, bitorder="little").astype(bool)
        out[mask] = u.reshape(-1)  # row-major: each row's kept values in position order
        return out

    def quantize(self, x):
        u, codes = self.compress(x)
        qv, s = self.value.quantize(u)
        n = u.shape[0]
        q = np.concatenate([np.ascontiguousarray(qv).view(np.uint8).reshape(n, -1), codes],
                           axis=1)
        return np.ascontiguousarray(q), s

    def split(self, q, d):
        """(packed values in the value codec's layout, codes) of q uint8 [n, V + d/8]."""
        vb = self.value_bytes(d)
        n = q.shape[0]
        qv = np.ascontiguousarray(q[:, :vb]).view(self.value.data_dtype())
        return qv.reshape(self.value.data_shape(n, d // 2)), q[:, vb:]

    def dequantize(self, q, s):
        d = self.row_length(q.shape[1])
        qv, codes = self.split(q, d)
        return self.expand(self.value.dequantize(qv, s), codes, d)

    def row_length(self, nbytes):
        """d from the stored bytes per row: values and codes take d/2 * v + d/8 bytes, where v is
        the value codec's bytes per value (f16 2, int8 1, int4 1/2)."""
        num, den = {"f16": (8, 9), "int8": (8, 5), "int4": (8, 3)}[self.value.name]
        return nbytes * num // den

    def data_shape(self, n, d):
        return (n, self.value_bytes(d) + d // 8)

    def data_dtype(self):
        return np.dtype(np.uint8)

    def scale_shape(self, n, d):
        return self.value.scale_shape(n, d // 2)

    def scale_dtype(self):
        return self.value.scale_dtype()

    def max_error_bound(self, x):
        return self.value.max_error_bound(x)


def nbytes(c, n, d):
    """Bytes taken by n rows of length d in encoding c (values and scales)."""
    total = int(np.prod(c.data_shape(n, d))) * c.data_dtype().itemsize
    if c.scale_shape(n, d) is not None:
        total += int(np.prod(c.scale_shape(n, d))) * c.scale_dtype().itemsize
    return total


# ---------------------------------------------------------------------------------------------
# Row-column bundles: FFN neuron i's rows (gate, up, down column; or fc1, fc2 column) in one row.

SEGMENT_ALIGN = 16  # each part starts at a multiple of this within a row
ROW_ALIGN = 64  # bundle stride is a multiple of this


def _round_up(x, a):
    return (x + a - 1) // a * a


def bundle_layout(parts, d):
    """Offsets of each part inside one bundle row.

    parts: list of (part_name, codec); each part is a vector of length d.
    Returns (layout, stride) where layout is a list of dicts with keys name, encoding, group_size,
    offset (of the values), scale_offset (None without scales), and stride is the row length.
    """
    layout, off = [], 0
    for name, c in parts:
        data = int(np.prod(c.data_shape(1, d))) * c.data_dtype().itemsize
        entry = {"name": name, "encoding": c.name, "group_size": c.group_size,
                 "offset": off, "scale_offset": None}
        off += data
        if c.scale_shape(1, d) is not None:
            off = _round_up(off, c.scale_dtype().itemsize)
            entry["scale_offset"] = off
            off += int(np.prod(c.scale_shape(1, d))) * c.scale_dtype().itemsize
        off = _round_up(off, SEGMENT_ALIGN)
        layout.append(entry)
    return layout, _round_up(off, ROW_ALIGN)


def pack_bundles(vectors, parts, d):
    """vectors: dict part_name -> float32 [n_neurons, d]. Returns (uint8 [n, stride], layout)."""
    encoded = {name: c.quantize(np.ascontiguousarray(vectors[name], dtype=np.float32))
               for name, c in parts}
    return pack_encoded_bundles(encoded, parts, d)


def pack_encoded_bundles(encoded, parts, d):
    """As pack_bundles, from parts already encoded: dict part_name -> (q, s) of its codec."""
    layout, stride = bundle_layout(parts, d)
    n = next(iter(encoded.values()))[0].shape[0]
    out = np.zeros((n, stride), dtype=np.uint8)
    for entry, (name, c) in zip(layout, parts):
        q, s = encoded[name]
        qb = np.ascontiguousarray(q).reshape(n, -1).view(np.uint8)
        out[:, entry["offset"]:entry["offset"] + qb.shape[1]] = qb
        if s is not None:
            sb = np.ascontiguousarray(s).reshape(n, -1).view(np.uint8)
            out[:, entry["scale_offset"]:entry["scale_offset"] + sb.shape[1]] = sb
    return out, layout


def bundle_part(bundles, entry, d):
    """Zero-copy views (q, s) of one part of every bundle row, shaped as the codec's q and s."""
    c = codec(entry["encoding"], entry["group_size"])
    n = bundles.shape[0]
    qshape = c.data_shape(n, d)
    qbytes = int(np.prod(qshape[1:])) * c.data_dtype().itemsize
    off = entry["offset"]
    q = bundles[:, off:off + qbytes].view(c.data_dtype()).reshape(qshape)
    s = None
    if entry["scale_offset"] is not None:
        sshape = c.scale_shape(n, d)
        sbytes = int(np.prod(sshape[1:])) * c.scale_dtype().itemsize
        so = entry["scale_offset"]
        s = bundles[:, so:so + sbytes].view(c.scale_dtype()).reshape(sshape)
    return q, s


def unpack_bundle_part(bundles, entry, d):
    """Reference decode of one part of all bundle rows to float32 [n, d]."""
    q, s = bundle_part(bundles, entry, d)
    return codec(entry["encoding"], entry["group_size"]).dequantize(q, s)

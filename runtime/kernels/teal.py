"""The FFN with TEAL-style input thresholds, from weights stored by input column (runtime/teal.py,
docs/FORMAT.md §3.5).

    h -> J = {j : |h_j| > t_in}
    g, u = sum over j in J of h_j * (gate and up columns j)      (axpys over contiguous runs)
    v = act(s_g * g) * (s_u * u) -> K = {i : |v_i| > t_hid}
    out = sum over i in K of v_i * s_d[i] * down_cols[i]         (axpys over contiguous rows)
          (over every i when K holds more than DENSE_DOWN of them: all rows are read then)

A zeroed input skips a whole column of gate and up (2 d_ff int8 bytes), a zeroed hidden value a
whole column of down (d bytes): the bytes not needed are not read. The int8 codes are the dense
model's (per output row scales s, applied once after the sums), activations stay float32.

Plain Numba loops (no intrinsics): LLVM vectorizes the inner loops (int8 -> float32, fused
multiply-add), and the same code runs under NUMBA_DISABLE_JIT=1.
"""

import numpy as np
from numba import njit, prange
from numba.core import config

from .ffn import act

if config.DISABLE_JIT:  # an intrinsic has no Python body
    def prefetch(a, off):
        pass
else:
    from .simd import prefetch

GROUP = 4  # input columns summed per pass over the accumulators (fewer loads and stores of acc)
BLOCK = 128  # accumulator values per inner loop; between two, the next group's columns are
# prefetched (the kept columns are 2 n-byte runs with gaps: the hardware prefetcher alone left
# the loop at half the dense kernel's bandwidth)
DENSE_DOWN = 0.35  # above this fraction of hidden values kept, down reads every row (SmolLM2,
# 1 thread: 50% of the rows 2.4 ms/token, all rows 1.8)
SPAN_ALIGN = 64  # accumulator slices per thread start on a multiple of this many floats


@njit(cache=True, parallel=True, fastmath={"contract"})  # fused multiply-adds
def ffn_teal(x, cols, cscale, dq, ds, thr, kind, acc, rows, hid, partial, kept):
    """One token x f32[d] through the TEAL FFN. cols int8 [d, 2n] (row j: gate column j, then up
    column j), cscale f32[2n] (the gate rows' scales, then the up rows'), dq int8 [n, d] (row i:
    down column i), ds f32[n]; thr f32[2] (t_in, t_hid: strictly above is kept; negative keeps
    all); kind: the activation code. Buffers: acc f32[2n], rows int32[max(d, n)], hid f32[n],
    partial f32[threads, d]. kept int64[3]: += (input columns read, tokens, down rows read: all of them above
    DENSE_DOWN).
    Returns out f32[d]."""
    d = x.shape[0]
    n2 = cols.shape[1]
    n = n2 // 2
    m = 0
    for j in range(d):
        if abs(x[j]) > thr[0]:
            rows[m] = j
            m += 1
    # gate and up: each thread owns a slice of the accumulators and reads that slice of every
    # kept column (a contiguous run)
    nt = max(1, partial.shape[0])
    span = ((n2 + nt - 1) // nt + SPAN_ALIGN - 1) // SPAN_ALIGN * SPAN_ALIGN
    nch = (n2 + span - 1) // span
    for c in prange(nch):
        lo = c * span
        hi = min(n2, lo + span)
        a = acc[lo:hi]  # 1D slices: LLVM vectorizes these loops (indexing the 2D arrays in
        # the loop did not: 1.5 vs 22 GMAC/s)
        w = hi - lo
        a[:] = 0.0
        k = 0
        while k + GROUP <= m:
            c0 = cols[rows[k], lo:hi]
            c1 = cols[rows[k + 1], lo:hi]
            c2 = cols[rows[k + 2], lo:hi]
            c3 = cols[rows[k + 3], lo:hi]
            a0 = x[rows[k]]
            a1 = x[rows[k + 1]]
            a2 = x[rows[k + 2]]
            a3 = x[rows[k + 3]]
            nx = min(m, k + 3 * GROUP)
            for b0 in range(0, w, BLOCK):
                for t in range(k + 2 * GROUP, nx):
                    o = rows[t] * n2 + lo + b0
                    prefetch(cols, o)
                    prefetch(cols, o + 64)
                b1 = min(w, b0 + BLOCK)
                # slices, loops from 0: the shape LLVM vectorizes
                ab, d0, d1, d2, d3 = a[b0:b1], c0[b0:b1], c1[b0:b1], c2[b0:b1], c3[b0:b1]
                for i in range(b1 - b0):
                    ab[i] = ab[i] + (a0 * np.float32(d0[i]) + a1 * np.float32(d1[i])
                                     + a2 * np.float32(d2[i]) + a3 * np.float32(d3[i]))
            k += GROUP
        while k < m:
            c0 = cols[rows[k], lo:hi]
            a0 = x[rows[k]]
            for i in range(w):
                a[i] = a[i] + a0 * np.float32(c0[i])
            k += 1
    # hidden values above the threshold: their rows listed
    mm = 0
    for i in range(n):
        v = act(acc[i] * cscale[i], kind) * (acc[n + i] * cscale[n + i])
        hid[i] = v * ds[i]
        if abs(v) > thr[1]:
            rows[mm] = i
            mm += 1
    # down: rows split between threads, one partial sum each. Above DENSE_DOWN of the rows kept
    # every row is read (the sequential walk streams, while the kept rows alone, 576-byte runs
    # with gaps, came slower than all of them), and so every hidden value is added: the
    # threshold would save nothing there and cost accuracy
    dense = mm > DENSE_DOWN * n
    total = n if dense else mm
    nchunks = max(1, min(total, partial.shape[0]))
    per = (total + nchunks - 1) // nchunks
    for c in prange(nchunks):
        p = partial[c, :]
        p[:] = 0.0
        end = min(total, (c + 1) * per)
        for k in range(c * per, end):
            i = k if dense else rows[k]
            if not dense and k + 1 < end:
                o = rows[k + 1] * d
                for line in range(0, d, 64):
                    prefetch(dq, o + line)
            r = dq[i, :]
            a = hid[i]
            for j in range(d):
                p[j] = p[j] + a * np.float32(r[j])
    out = np.zeros(d, dtype=np.float32)
    for c in range(nchunks):
        for j in range(d):
            out[j] += partial[c, j]
    kept[0] += m
    kept[1] += 1
    kept[2] += total
    return out

"""The low-rank predictor's kernel (kernels/fused.predict_rows, used by resident row skipping):
its scores against NumPy's B (A x) + bias in float64, and its rows exactly the indices whose
score is above the threshold, in order (blocks of 64 in registers, then a tail), in both kernel
flavours."""

import numpy as np
import pytest

from edgellm.runtime.kernels import fused, simd
from edgellm.runtime.kernels.halfs import F16_TO_F32

pytestmark = pytest.mark.skipif(not simd.AVAILABLE, reason="the predictor kernel is an "
                                "intrinsic (NUMBA_DISABLE_JIT=1 has none)")


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("r,d,n", [(32, 256, 1024), (5, 64, 96), (3, 32, 40), (8, 96, 64)])
def test_predict_rows_matches_numpy(fast, r, d, n):
    rng = np.random.default_rng(r * 1000 + n)
    a = (rng.standard_normal((r, d)) / np.sqrt(d)).astype(np.float16)
    b = rng.standard_normal((n, r)).astype(np.float16)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal(d).astype(np.float32)
    want = b.astype(np.float64) @ (a.astype(np.float64) @ x) + bias
    pbt = np.ascontiguousarray(b.T).view(np.uint16)
    z, scores = np.empty(r, np.float32), np.empty(n, np.float32)
    rows = np.full(n, -1, np.int32)
    for thr in (np.float32(np.median(want)), np.float32(-np.inf), np.float32(np.inf),
                np.float32(np.quantile(want, 0.8))):
        m = fused.predict_rows(x, a.view(np.uint16), pbt, bias, thr, F16_TO_F32, z, scores,
                               rows, fast)
        np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4)
        assert np.array_equal(rows[:m], np.flatnonzero(scores > thr))
        # against the float64 scores, away from the threshold by more than the rounding
        sure = np.abs(want - thr) > 1e-3
        assert np.array_equal(np.isin(np.arange(n), rows[:m])[sure], (want > thr)[sure])

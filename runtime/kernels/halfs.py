"""float16 -> float32 for Numba kernels.

Numba has no float16 arithmetic on the CPU, so kernels take float16 data viewed as uint16 and
convert through a 65536-entry float32 table (256 KiB, stays in L2): one load per value, exact for
every bit pattern (subnormals, inf, nan). The SIMD path (simd.py) uses the CPU's own conversion.
"""

import numpy as np

# the table holds the signalling NaN patterns too: converting them raises IEEE "invalid" on
# aarch64 (numpy warns there, not on x86), and the NaN they become is the intended entry
with np.errstate(invalid="ignore"):
    F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)

"""How many threads the runtime uses: Numba's kernels (decode) and BLAS (prefill).

Both pools matter on a small CPU: oversubscribing 2 cores with 2 Numba + 2 BLAS threads that
spin-wait makes every call slower, so one setting governs both.
"""

import numba

from .errors import EdgeLLMError

_blas_limit = None  # keeps threadpoolctl's limit alive for the process


def set_threads(n):
    """Use n threads for kernels and BLAS (n=None: leave the defaults, one per core)."""
    global _blas_limit
    if n is None:
        return
    if not isinstance(n, int) or n < 1:
        raise EdgeLLMError(f"threads must be a positive integer, got {n!r}")
    n_max = numba.config.NUMBA_NUM_THREADS
    if n > n_max:
        raise EdgeLLMError(f"threads={n} is more than the {n_max} threads available")
    numba.set_num_threads(n)
    from threadpoolctl import threadpool_limits

    _blas_limit = threadpool_limits(limits=n, user_api="blas")


def get_threads():
    return numba.get_num_threads()

"""How many threads the runtime uses: Numba's kernels (decode) and BLAS (prefill).

Both pools matter on a small CPU: oversubscribing 2 cores with 2 Numba + 2 BLAS threads that
spin-wait makes every call slower, so one setting governs both.
"""

import numba

from .errors import EdgeLLMError

_blas_limit = None  # keeps threadpoolctl's limit alive for the process
_requested = None  # the count set_threads asked for (None: defaults)


def set_threads(n):
    """Use n threads for kernels and BLAS (n=None: leave the defaults, one per core)."""
    global _blas_limit, _requested
    if n is None:
        return
    if not isinstance(n, int) or n < 1:
        raise EdgeLLMError(f"threads must be a positive integer, got {n!r}")
    n_max = numba.config.NUMBA_NUM_THREADS
    if n > n_max:
        raise EdgeLLMError(f"threads={n} is more than the {n_max} threads available")
    numba.set_num_threads(n)
    _requested = n
    from threadpoolctl import threadpool_limits

    _blas_limit = threadpool_limits(limits=n, user_api="blas")


def get_threads():
    return numba.get_num_threads()


def apply():
    """Numba's thread count belongs to the thread that set it: a model loaded with threads=1 in
    one thread and run in another (the server's generate thread) would use every core. The
    forward pass calls this, so whichever thread runs it uses the count asked for (BLAS's limit
    is process-wide already)."""
    if _requested is not None and numba.get_num_threads() != _requested:
        numba.set_num_threads(_requested)

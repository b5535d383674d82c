"""How many threads the runtime uses: Numba's kernels (decode) and BLAS (prefill).

Both pools matter on a small CPU: oversubscribing 2 cores with 2 Numba + 2 BLAS threads that
spin-wait makes every call slower, so one setting governs both. What was measured on a 2-core
KVM guest shared with other work (docs/PERFORMANCE.md, "Threads"):

- Prefill alternates BLAS calls with Numba kernels (dequantized tiles, attention). OpenBLAS's
  idle workers spin ~0.1 s after each call, so Numba's threads found both cores taken: 2-thread
  prefill ran at 14-16 tokens/s against 80 on one. edgellm/__init__.py sets
  OPENBLAS_THREAD_TIMEOUT=4 (sleep at once) before numpy loads OpenBLAS; `blas_sleeps()` says
  whether that happened in time.
- Decode forks and joins Numba's threads five times a layer. They wait passively
  (OMP_WAIT_POLICY=PASSIVE, kernels/__init__.py: spinning workers starve a core shared with
  other processes), and waking one costs tens of microseconds here, more under load: more than
  a small layer's whole work split in two. SmolLM2-135M (2.2 MB a layer) decoded slower on 2
  threads than on 1. So a layer whose weights are under SMALL_LAYER_BYTES decodes on one
  thread; the head and prefill use all of them. With spinning waits asked for (GOMP_SPINCOUNT,
  or OMP_WAIT_POLICY=ACTIVE: for a device with nothing else running) every layer uses them all,
  and so do layers that all decode as teams (kernels/team.py: one wake-up a token, the other
  thread waits spinning; SmolLM2 keep on 2 threads 6.7 ms a token against 8.9 on one, session
  12, medians of 4 alternating runs).
- Every hand-off between threads waits for the other thread to be scheduled: when other
  processes hold the cores, up to a scheduler slice (milliseconds). At load average 20 on 2
  cores, 2-thread prefill ran 2.5-4x slower than 1 thread, whatever the split between BLAS and
  Numba. So a forward pass uses no more threads than there are cores free at that moment
  (`free_cores`: /proc/loadavg's count of running tasks) where the results do not depend on
  the thread count: BLAS in prefill, the head in decode (bit for bit the same, tested). Decoded
  layers and prefill's Numba kernels keep a fixed count (the FFN and row-skipping prefill sum
  partials per thread), so a text does not change with the machine's load.

EDGELLM_FIXED_THREADS=1 turns both rules off (exactly N threads everywhere, for measurements).
"""

import os
import threading
import time

import numba

from .errors import EdgeLLMError

SMALL_LAYER_BYTES = 8 << 20  # decode a layer with fewer weight bytes on one thread (see above)
LOADAVG = "/proc/loadavg"  # "0.50 0.40 0.30 RUNNING/TOTAL LASTPID" (Linux)
READ_EVERY = 0.25  # seconds one reading of it serves adapt() (recent_free_cores)

_blas_limit = None  # keeps threadpoolctl's limit alive for the process
_requested = None  # the count set_threads asked for (None: defaults)
_local = threading.local()  # per calling thread: the count before adapt() lowered it
_recent = None  # (source, when, free cores): recent_free_cores' last reading
_controller = None  # threadpoolctl's view of the BLAS libraries (found once: it scans them)


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


def fixed():
    return os.environ.get("EDGELLM_FIXED_THREADS", "").strip() not in ("", "0")


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def free_cores():
    """Cores not taken by other runnable tasks right now: Linux's count of running tasks
    (/proc/loadavg, this thread included); every core where that is unknown."""
    n = _cores()
    try:
        with open(LOADAVG, "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return n
    return max(1, n - max(0, running - 1))


def recent_free_cores():
    """free_cores(), read again at most every READ_EVERY seconds: between decoded tokens a read
    of /proc/loadavg took 120-160 us (16 us alone; measured), 0.5% of a TinyLlama token."""
    global _recent
    now = time.monotonic()
    key = (free_cores, LOADAVG)  # a new source (tests) is read at once
    if _recent is None or _recent[0] != key or now - _recent[1] > READ_EVERY:
        _recent = (key, now, free_cores())
    return _recent[2]


def _blas(n):
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    _controller.limit(limits=n, user_api="blas")


def adapt(blas):
    """At the start of a forward pass (after apply()) while other tasks hold the cores: fewer
    BLAS threads for a prefill (blas), fewer Numba threads for a decoded token (its head; its
    layers then take narrow_for_layers' count). A prefill keeps its Numba count: row-skipping
    prefill sums partials per thread, and under a lowered count its logits moved by 1e-6
    with the load (test_rowskip). Returns the count for restore(), or 0."""
    n = _local.full = numba.get_num_threads()
    if n == 1 or fixed():
        return 0
    k = min(n, recent_free_cores())
    if k == n:
        return 0
    if blas:
        _blas(k)
    else:
        numba.set_num_threads(k)
    _local.blas = blas
    return n


def restore(n):
    """Undo adapt() (n: what it returned)."""
    if n:
        if _local.blas:
            _blas(n)
        else:
            numba.set_num_threads(n)


def spinning():
    """True when the user asked OpenMP's waiting threads to spin (then waking one is cheap)."""
    spins = os.environ.get("GOMP_SPINCOUNT", "").strip()
    if spins and spins not in ("0", "0k", "0K"):
        return True
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "ACTIVE"


def decode_layer_threads(layer_bytes, teams=False):
    """Numba threads for decoding one token through a layer of layer_bytes weight bytes: the
    count in use, or 1 for a small layer unless its layers decode as teams (see the module
    docstring)."""
    n = getattr(_local, "full", None) or numba.get_num_threads()
    if n == 1 or teams or layer_bytes >= SMALL_LAYER_BYTES or spinning() or fixed():
        return n
    return 1


def layer_bytes(manifest):
    """Bytes of the model's largest layer chunk (the manifest's sizes): what a decoded token
    reads in a layer, give or take norms. Taken from the manifest, not from the loaded weights,
    so that a model mapped, read into memory or streamed under a budget decodes on the same
    thread count, and so sums its FFN partials alike (tokens and logits equal)."""
    return max((c["size"] for c in manifest["chunks"] if c["file"].startswith("layer_")),
               default=0)


def narrow_for_layers(rt, teams=False):
    """Before a decoded token's layers (rt: model.Transformer; teams: every layer decodes as a
    team): one thread when its layers are small (decode_layer_threads), else the count asked
    for even while adapt() has lowered it (their sums depend on it). Returns the count to
    restore after them, or 0."""
    cur = numba.get_num_threads()
    nbytes = rt.__dict__.get("_layer_bytes")
    if nbytes is None:
        manifest = getattr(rt.reader, "manifest", None)
        nbytes = rt._layer_bytes = (layer_bytes(manifest) if manifest is not None
                                    else SMALL_LAYER_BYTES)
    want = decode_layer_threads(nbytes, teams)
    if want == cur:
        return 0
    numba.set_num_threads(want)
    return cur


def blas_sleeps():
    """True when OpenBLAS's idle workers sleep at once (OPENBLAS_THREAD_TIMEOUT was set before
    OpenBLAS loaded); False when numpy was imported before edgellm, or the user chose longer."""
    from edgellm import BLAS_TIMEOUT_EARLY

    try:
        timeout = int(os.environ.get("OPENBLAS_THREAD_TIMEOUT", ""))
    except ValueError:
        return False
    return BLAS_TIMEOUT_EARLY and timeout <= 4  # OpenBLAS raises smaller values to 4


def describe():
    """What the thread pools are, for benchmarks' records."""
    from threadpoolctl import threadpool_info

    blas = [{k: p.get(k) for k in ("internal_api", "num_threads", "threading_layer")}
            for p in threadpool_info() if p.get("user_api") == "blas"]
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = None
    return {"numba_threads": numba.get_num_threads(), "numba_layer": layer, "blas": blas,
            "blas_sleeps": blas_sleeps(), "spinning": spinning(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "small_layer_bytes": SMALL_LAYER_BYTES}

"""The flash reader: weight reads with pread/preadv from a thread pool, every byte and second counted.

Under a DRAM budget every weight byte the runtime uses comes through a FlashReader (runtime/
streaming.py): resident parts are read once at load into memory the planner accounted for, streamed
parts are read per token into preallocated buffers. Nothing is read through an mmap, so the page
cache is the only memory outside the budget's ledger, and cold mode drops it (below).

Reads are requests (file offset, list of destination buffers): a run of adjacent rows in the file
becomes one preadv into as many buffers as it fills (they need not be adjacent in memory), so the
kernel sees one large read instead of many small ones (disk reads here: ~1.5 GB/s with 4 MiB
reads, ~0.14 GB/s with 4 KiB reads, ../shared/DESIGN.md). Requests run on a pool of `depth`
threads (os.preadv releases the GIL).

Cold mode calls posix_fadvise(DONTNEED) on each range after reading it, widened to whole pages
(the kernel drops only whole pages, and a neuron's bundle row is often smaller than one), so the
page cache does not keep it: the next read of the same bytes goes to the device (measurements are
then not served from memory), and the page cache does not grow past the budget. Every file is
opened with POSIX_FADV_RANDOM: the reads are exactly the rows wanted, and kernel read-ahead
around a small row read would fetch (and, in a memory cgroup, hold) neighbours nobody asked for.
"""

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit, types

from .errors import EdgeLLMError

MAX_IOV = 512  # buffers per preadv call (Linux allows IOV_MAX = 1024)
INLINE = 1 << 20  # batches below this are read on the calling thread (no pool round trip)
MAX_RUN_BYTES = 8 << 20  # a coalesced read is split above this, so the pool can share the work
DEPTH = 32  # reads in flight: window mode's small row reads wait on device latency, and flash
# serves many at once (demo model, cold, this machine's disk: 4 threads 5.9, 16 31, 32 44 tokens/s;
# "LLM in a flash" reads with 32 threads too)
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
RUNS_PER_TASK = 8  # read_rows in cold mode: runs per pool task (a task costs ~50 us to start)
# read_rows calls libc's preadv and posix_fadvise from Numba (no Python per read: a token in
# window mode makes hundreds of reads); without the JIT, or off Linux, it builds requests instead
FAST_ROWS = not numba.config.DISABLE_JIT and sys.platform.startswith("linux")


class FlashReadError(EdgeLLMError):
    """A weight read failed (device error, file removed or truncated under us). Names the file."""


class FlashReader:
    def __init__(self, depth=DEPTH, cold=False):
        if depth < 1:
            raise EdgeLLMError(f"io threads must be >= 1, got {depth}")
        self.depth, self.cold = int(depth), bool(cold)
        self._fds = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=self.depth, thread_name_prefix="edgellm-io")
        self.bytes_read = 0  # counters, for the stats
        self.reads = 0  # preadv calls
        self.read_s = 0.0  # seconds spent inside preadv, summed over threads

    # -----------------------------------------------------------------------------------------

    def _fd(self, path):
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    try:
                        fd = os.open(path, os.O_RDONLY)
                    except OSError as e:
                        raise FlashReadError(f"{path}: cannot open for reading: {e.strerror}") \
                            from None
                    if hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead
                    self._fds[path] = fd
        return fd

    def _preadv(self, fd, bufs, offset):
        """One request; loops on short reads. (Tests replace this to inject errors.)"""
        total = sum(b.nbytes for b in bufs)
        done = 0
        while done < total:
            if done:  # rare: a short read; continue where it stopped
                bufs = _skip(bufs, done)
            n = os.preadv(fd, bufs, offset + done)
            if n <= 0:
                raise OSError(5, f"unexpected end of file at byte {offset + done}")
            done += n
        return total

    def _count(self, requests):
        """Count requests when they are issued, not when they finish: a read-ahead that ends
        after the step that started it still belongs to that step (per-token stats)."""
        with self._lock:
            self.bytes_read += sum(sum(b.nbytes for b in r[2]) for r in requests)
            self.reads += len(requests)

    def _run_all(self, requests):
        """Run requests one after the other (per-request overhead matters: a token in window
        mode makes hundreds of small reads)."""
        t = time.perf_counter()
        for path, offset, bufs in requests:
            fd = self._fd(path)
            try:
                n = self._preadv(fd, bufs, offset)
                if self.cold:  # whole pages: a partial page would stay cached
                    a = offset // PAGE * PAGE
                    os.posix_fadvise(fd, a, -(-(offset + n) // PAGE) * PAGE - a,
                                     os.POSIX_FADV_DONTNEED)
            except OSError as e:
                raise FlashReadError(f"{path}: read of {sum(b.nbytes for b in bufs)} bytes at "
                                     f"offset {offset} failed: {e.strerror or e}") from None
        dt = time.perf_counter() - t
        with self._lock:
            self.read_s += dt

    def submit(self, requests):
        """Start requests [(path, offset, [uint8 buffers])] on the pool, as at most `depth`
        tasks of consecutive requests (one task per request costs more than a small read);
        returns a list of futures."""
        self._count(requests)
        n = len(requests)
        k = min(self.depth, n)
        return [self._pool.submit(self._run_all, requests[j * n // k:(j + 1) * n // k])
                for j in range(k)]

    @staticmethod
    def wait(futures):
        """Wait for all futures; raise the first error after all have finished (so no read is
        still writing into a buffer when the caller reuses it)."""
        err = None
        for f in futures:
            try:
                f.result()
            except Exception as e:  # noqa: BLE001 - re-raised below
                err = err or e
        if err is not None:
            raise err

    def read(self, requests):
        """Run requests and wait for them. Small batches run on the calling thread, except in
        cold mode: reads that go to the device wait on its latency, and several in flight hide
        it (NVMe and SD cards serve many at once), so they always go to the pool."""
        if len(requests) <= 1 or (not self.cold and sum(sum(b.nbytes for b in r[2])
                                                        for r in requests) < INLINE):
            self._count(requests)
            self._run_all(requests)
            return
        self.wait(self.submit(requests))

    def read_into(self, path, offset, out):
        """Read out.nbytes bytes at offset into the contiguous array out."""
        self.read(split_request(path, offset, _bytes_view(out)))

    def read_rows(self, path, base, stride, rows, dest, d0, max_gap=0):
        """Read file rows `rows` (sorted, unique) of `stride` bytes from byte `base` into the
        consecutive rows d0, d0 + 1, ... of dest (uint8 [n, stride], C-contiguous), joining runs
        at most max_gap unwanted rows apart into one read (the gap rows land in a scratch
        buffer). The runs are found and read in compiled code (libc preadv), so a batch of
        hundreds of small reads costs their system calls, not a Python request each. In cold
        mode the runs are shared among pool tasks (reads in flight hide device latency) and the
        calling thread takes one share; warm, it reads them all itself."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        if d0 < 0 or d0 + rows.size > dest.shape[0] or dest.shape[1] != stride:
            raise EdgeLLMError(f"read_rows: {rows.size} rows from row {d0} do not fit the "
                               f"destination {dest.shape}")
        if not FAST_ROWS:
            self.read(row_requests(path, base, stride, rows, dest,
                                   np.arange(d0, d0 + rows.size), max_gap))
            return
        if rows.size > 1 and not np.all(rows[1:] > rows[:-1]):
            raise EdgeLLMError("read_rows: rows must be sorted and unique")
        fd = self._fd(path)
        junk = np.empty(max(1, max_gap * stride), np.uint8)
        bounds = [0, rows.size]
        if self.cold and self.depth > 1:
            starts = np.flatnonzero(np.diff(rows) > max_gap + 1) + 1  # where runs begin
            k = min(self.depth, 1 + starts.size // RUNS_PER_TASK)
            if k > 1:
                bounds = [0] + [int(starts[j * starts.size // k]) for j in range(1, k)] \
                    + [rows.size]
        t = time.perf_counter()
        parts = list(zip(bounds[:-1], bounds[1:]))
        futs = [self._pool.submit(self._rows_task, fd, base, stride, rows, a, b, dest, d0,
                                  max_gap, junk) for a, b in parts[1:]]
        results = [self._rows_task(fd, base, stride, rows, *parts[0], dest, d0, max_gap, junk)]
        for f in futs:
            results.append(f.result())
        nbytes = sum(r[0] for r in results)
        nreads = sum(r[1] for r in results)
        with self._lock:
            self.bytes_read += nbytes
            self.reads += nreads
            self.read_s += time.perf_counter() - t
        failed = [r[2] for r in results if r[2] >= 0]
        if failed:
            off = base + int(rows[failed[0]]) * stride
            try:  # the compiled read has no errno: this read says what went wrong
                os.pread(fd, stride, off)
                why = "short read"
            except OSError as e:
                why = e.strerror or str(e)
            raise FlashReadError(f"{path}: read of row {int(rows[failed[0]])} ({stride} bytes) "
                                 f"at offset {off} failed: {why}")

    def _rows_task(self, fd, base, stride, rows, a, b, dest, d0, max_gap, junk):
        iov = np.empty((MAX_IOV, 2), np.int64)
        return _read_rows(fd, base, stride, rows, a, b, dest, d0, max_gap, junk, self.cold,
                          PAGE, max(1, MAX_RUN_BYTES // stride), iov)

    def close(self):
        self._pool.shutdown(wait=True)
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


# ---------------------------------------------------------------------------------------------
# Building requests


def _bytes_view(a):
    if not a.flags.c_contiguous:
        raise EdgeLLMError("flash reads need a contiguous destination buffer")
    return a.reshape(-1).view(np.uint8)


def _skip(bufs, n):
    out = []
    for b in bufs:
        if n >= b.nbytes:
            n -= b.nbytes
            continue
        out.append(b[n:])
        n = 0
    return out


def split_request(path, offset, buf):
    """One contiguous range as requests of at most MAX_RUN_BYTES (so the pool shares it)."""
    n = buf.nbytes
    return [(path, offset + a, [buf[a:min(n, a + MAX_RUN_BYTES)]])
            for a in range(0, max(n, 1), MAX_RUN_BYTES)] if n else []


def row_requests(path, base, stride, rows, dest, dest_rows, max_gap=0):
    """Requests that read file rows `rows` (sorted, unique) of `stride` bytes starting at byte
    `base` into dest[dest_rows[j]] (dest uint8 [n, stride]). Adjacent file rows are coalesced
    into one preadv with one buffer per run of adjacent destination rows (one buffer in all when
    the destination rows are adjacent too). max_gap > 0 also joins runs separated by at most
    that many unwanted rows: the gap is read into a scratch buffer and dropped (one read
    instead of two costs a few bytes more; on flash a small read costs a page and a round trip
    whatever its size)."""
    rows = np.asarray(rows, dtype=np.int64)
    dest_rows = np.asarray(dest_rows, dtype=np.int64)
    if rows.size == 0:
        return []
    max_rows = max(1, MAX_RUN_BYTES // stride)
    # a run breaks where the file rows jump by more than max_gap + 1
    starts = np.flatnonzero(np.diff(rows) > max_gap + 1) + 1
    bounds = np.concatenate(([0], starts, [rows.size])).tolist()
    dest_adjacent = bool(np.all(np.diff(dest_rows) == 1))  # rows appended in order: the rule
    junk = np.empty(max_gap * stride, np.uint8) if max_gap else None
    flat = dest.reshape(-1)
    reqs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if dest_adjacent and rows[b - 1] - rows[a] == b - a - 1:  # no gap: one buffer per read
            for a0 in range(a, b, max_rows):
                a1 = min(b, a0 + max_rows)
                d0 = int(dest_rows[a0])
                reqs.append((path, base + int(rows[a0]) * stride,
                             [flat[d0 * stride:(d0 + a1 - a0) * stride]]))
            continue
        off, bufs, span = None, [], 0
        for j in range(a, b):
            r, d = int(rows[j]), int(dest_rows[j])
            gap = r - int(rows[j - 1]) - 1 if j > a else 0
            if off is not None and (len(bufs) + 2 > MAX_IOV or span + 1 + gap > max_rows):
                reqs.append((path, off, bufs))  # this one is full: the next starts at row r
                off, bufs, span, gap = None, [], 0, 0
            if off is None:
                off = base + r * stride
            if gap:
                bufs.append(junk[:gap * stride])
            elif bufs and j > a and dest_rows[j - 1] == d - 1 and \
                    bufs[-1].base is not None and _ends_at(bufs[-1], flat, d * stride):
                bufs[-1] = flat[(d * stride - bufs[-1].nbytes):(d + 1) * stride]
                span += 1
                continue
            bufs.append(flat[d * stride:(d + 1) * stride])
            span += 1 + gap
        reqs.append((path, off, bufs))
    return reqs


def _ends_at(buf, flat, byte):
    """buf is a slice of flat that ends just before `byte` (so the next row extends it)."""
    start = buf.__array_interface__["data"][0] - flat.__array_interface__["data"][0]
    return 0 <= start and start + buf.nbytes == byte


# ---------------------------------------------------------------------------------------------
# Compiled row reads (FlashReader.read_rows): libc called from Numba, the GIL released

_preadv_c = types.ExternalFunction("preadv", types.int64(types.int32, types.uintp, types.int32,
                                                         types.int64))
_fadvise_c = types.ExternalFunction("posix_fadvise", types.int32(types.int32, types.int64,
                                                                 types.int64, types.int32))
FADV_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", 4)


@njit(nogil=True, cache=True)
def _read_rows(fd, base, stride, rows, a, b, dest, d0, max_gap, junk, cold, page, max_rows, iov):
    """Read rows[a:b] into dest rows d0 + a .. d0 + b - 1: one preadv per run (rows at most
    max_gap apart, at most max_rows spanned, at most len(iov) buffers; adjacent destination
    rows share one buffer). Returns (bytes, reads, index of the first row of a failed run or
    -1)."""
    dptr = dest.ctypes.data
    jptr = junk.ctypes.data
    max_iov = iov.shape[0]
    nbytes = 0
    nreads = 0
    j = a
    while j < b:
        iov[0, 0] = dptr + (d0 + j) * stride
        iov[0, 1] = stride
        k = 1
        span = 1
        e = j + 1
        while e < b:
            g = rows[e] - rows[e - 1] - 1
            if g > max_gap or k + 2 > max_iov or span + 1 + g > max_rows:
                break
            if g > 0:
                iov[k, 0] = jptr
                iov[k, 1] = g * stride
                iov[k + 1, 0] = dptr + (d0 + e) * stride
                iov[k + 1, 1] = stride
                k += 2
            else:  # the next destination row follows: extend the buffer
                iov[k - 1, 1] += stride
            span += 1 + g
            e += 1
        off = base + rows[j] * stride
        total = span * stride
        done = 0
        first = 0
        while done < total:
            n = _preadv_c(fd, iov.ctypes.data + 16 * first, k - first, off + done)
            if n <= 0:
                return nbytes, nreads, j
            done += n
            while n > 0 and first < k:  # a short read (rare): skip what was filled
                if n >= iov[first, 1]:
                    n -= iov[first, 1]
                    first += 1
                else:
                    iov[first, 0] += n
                    iov[first, 1] -= n
                    n = 0
        if cold:  # whole pages: a partial page would stay cached
            p0 = off // page * page
            _fadvise_c(fd, p0, (off + total + page - 1) // page * page - p0, FADV_DONTNEED)
        nbytes += total
        nreads += 1
        j = e
    return nbytes, nreads, -1

"""The windowed neuron cache of one layer ("LLM in a flash", section 3.3).

A preallocated buffer of bundle rows, uint8 [capacity, stride], holds the FFN neurons of the
current window: rows 0..n_pinned-1 are pinned hot neurons (never evicted), rows n_pinned..n-1 are
the neurons used most recently (the last tokens' active sets, as many as fit). Bookkeeping is
three index arrays:

    ids[r]        neuron held in row r (r < n)
    slot[i]       row holding neuron i, or -1
    last_used[r]  step at which row r's neuron was last in an active set

A step (one token, or one prefill block) asks for its active neurons: rows already cached are hits;
missing neurons get rows at the end and the caller reads their bundles straight into those rows.
Rows stay while there is room: only when the missing neurons do not fit are the least recently
used unpinned rows (never this step's) evicted, as many as needed, by moving the last rows into
their places (no reallocation, no copy of the whole buffer). Neurons that left the window of the
last k tokens are therefore the first to go, but they are not thrown away while the cache has
free rows (evicting them at once re-read ~1 MB per token at high budgets on relu-large). The FFN
is then computed from rows 0..n of the buffer directly.
"""

import numpy as np
from numba import njit

from .errors import EdgeLLMError


class NeuronCache:
    def __init__(self, n_neurons, capacity, stride):
        if capacity < 1:
            raise EdgeLLMError(f"neuron cache capacity must be >= 1, got {capacity}")
        self.n_neurons, self.capacity, self.stride = n_neurons, min(capacity, n_neurons), stride
        self.buf = np.zeros((self.capacity, stride), dtype=np.uint8)  # (capacity, stride)
        self.ids = np.full(self.capacity, -1, dtype=np.int32)  # (capacity,)
        self.last_used = np.zeros(self.capacity, dtype=np.int64)  # (capacity,)
        self.slot = np.full(n_neurons, -1, dtype=np.int32)  # (n_neurons,)
        self.n = 0
        self.n_pinned = 0

    @property
    def nbytes(self):
        return self.buf.nbytes + self.ids.nbytes + self.last_used.nbytes + self.slot.nbytes

    def cached(self):
        """Neuron ids held, in row order (a copy)."""
        return self.ids[:self.n].copy()

    def pin(self, neurons):
        """Reserve rows 0..len(neurons)-1 for neurons kept for good (call once, while empty).
        Returns their rows; the caller reads the bundles into them."""
        neurons = np.asarray(neurons, dtype=np.int32)
        if self.n:
            raise EdgeLLMError("pin() must come before any other use of the cache")
        if neurons.size > self.capacity:
            raise EdgeLLMError(f"cannot pin {neurons.size} neurons in a cache of {self.capacity}")
        rows = self._append(neurons, 0)
        self.n_pinned = self.n
        return rows

    def lookup(self, active, step):
        """Mark the cached neurons of `active` as used at `step`; return the missing ones."""
        active = np.asarray(active, dtype=np.int32)
        rows = self.slot[active]
        hit = rows >= 0
        self.last_used[rows[hit]] = step
        return active[~hit]

    def prepare(self, active, step):
        """One step's bookkeeping in one compiled call: lookup(active, step), then, when the
        missing neurons do not fit in the free rows, evict the rows used longest ago (never this
        step's), as many as needed. Returns the missing neurons (in active's order; active:
        unique ids). Same result as lookup and evict_oldest in turn (ties in last use may go
        either way)."""
        active = np.ascontiguousarray(active, dtype=np.int32)
        missing = np.empty(active.size, dtype=np.int32)
        self.n, m = _prepare(self.buf, self.ids, self.last_used, self.slot, self.n,
                             self.n_pinned, self.capacity, active, step, missing)
        return missing[:m]

    def evict(self, keep_after, protect=None):
        """Evict unpinned rows whose last use is <= keep_after, except neurons in `protect`.
        Returns the number evicted."""
        n, p = self.n, self.n_pinned
        gone = np.flatnonzero(self.last_used[p:n] <= keep_after) + p
        if protect is not None and gone.size:
            gone = gone[~np.isin(self.ids[gone], protect)]
        self._remove(gone)
        return gone.size

    def evict_oldest(self, count, protect):
        """Make room: evict the `count` unpinned rows used longest ago, except `protect`."""
        n, p = self.n, self.n_pinned
        cand = np.arange(p, n)
        cand = cand[~np.isin(self.ids[cand], protect)]
        if count <= 0 or cand.size == 0:
            return 0
        order = np.argsort(self.last_used[cand], kind="stable")[:count]
        self._remove(cand[order])
        return min(count, cand.size)

    def evict_unpinned(self):
        """Drop every unpinned row (a step whose active set exceeds the capacity): nothing
        moves, the tail is just forgotten."""
        p, n = self.n_pinned, self.n
        self.slot[self.ids[p:n]] = -1
        self.ids[p:n] = -1
        self.n = p

    def insert(self, neurons, step):
        """Append rows for neurons (not cached; must fit). Returns their rows, in order; the
        caller fills buf[rows] with the neurons' bundles (or calls drop_tail on failure)."""
        neurons = np.asarray(neurons, dtype=np.int32)
        if self.n + neurons.size > self.capacity:
            raise EdgeLLMError(f"neuron cache overflow: {self.n} + {neurons.size} rows > "
                               f"{self.capacity}")
        return self._append(neurons, step)

    def drop_tail(self, n_before):
        """Undo inserts past row n_before (their reads failed: the rows hold no valid data)."""
        tail = self.ids[n_before:self.n]
        self.slot[tail] = -1
        self.ids[n_before:self.n] = -1
        self.n = n_before

    # -----------------------------------------------------------------------------------------

    def _append(self, neurons, step):
        a, b = self.n, self.n + neurons.size
        self.ids[a:b] = neurons
        self.slot[neurons] = np.arange(a, b, dtype=np.int32)
        self.last_used[a:b] = step
        self.n = b
        return np.arange(a, b)

    def _remove(self, rows):
        """Remove rows (unique, unpinned): each hole below the new end takes one of the rows
        that stay from the tail, as repeated swap-with-last does, in one vectorized move."""
        if rows.size == 0:
            return
        n = self.n
        m = n - rows.size
        self.slot[self.ids[rows]] = -1
        holes = rows[rows < m]
        tail = np.arange(m, n)
        movers = tail[~np.isin(tail, rows)]  # rows past the new end that stay
        holes = np.sort(holes)
        # holes.size == movers.size: both count the removed rows below m
        self.buf[holes] = self.buf[movers]
        self.ids[holes] = self.ids[movers]
        self.last_used[holes] = self.last_used[movers]
        self.slot[self.ids[holes]] = holes.astype(np.int32)
        self.ids[m:n] = -1
        self.n = m


@njit(cache=True)
def _prepare(buf, ids, last_used, slot, n, n_pinned, capacity, active, step, missing):
    """NeuronCache.prepare: returns (new n, number of missing written to `missing`)."""
    m = 0
    for a in active:  # lookup: hits are marked used now (which also protects them below)
        r = slot[a]
        if r >= 0:
            last_used[r] = step
        else:
            missing[m] = a
            m += 1
    short = m - (capacity - n)
    if short <= 0:
        return n, m  # room for all: nothing is evicted
    # make room: the `short` rows used longest ago, except this step's. The cut-off step comes
    # from a partition (linear time, the cache is full at every step here), then the rows
    # older than it and, in row order, as many of those used at it as still needed.
    n_cand = 0
    for r in range(n_pinned, n):
        if last_used[r] != step:
            n_cand += 1
    if n_cand == 0:
        return n, m
    vals = np.empty(n_cand, dtype=np.int64)
    c = 0
    for r in range(n_pinned, n):
        if last_used[r] != step:
            vals[c] = last_used[r]
            c += 1
    take = min(short, n_cand)
    cut = np.partition(vals, take - 1)[take - 1]
    dead = np.zeros(n, dtype=np.bool_)
    n_dead = 0
    for r in range(n_pinned, n):
        if last_used[r] < cut:
            dead[r] = True
            n_dead += 1
    for r in range(n_pinned, n):
        if n_dead == take:
            break
        if last_used[r] == cut:
            dead[r] = True
            n_dead += 1
    # remove the dead rows: each hole below the new end takes a surviving row from the tail
    new_n = n - n_dead
    for r in range(n):
        if dead[r]:
            slot[ids[r]] = -1
    j = n - 1
    for i in range(n_pinned, new_n):
        if dead[i]:
            while dead[j]:
                j -= 1
            buf[i, :] = buf[j, :]
            ids[i] = ids[j]
            last_used[i] = last_used[j]
            slot[ids[i]] = i
            j -= 1
    for r in range(new_n, n):
        ids[r] = -1
    return new_n, m

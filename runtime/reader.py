"""The one reader: every weight byte the runtime uses comes through a Reader.

Resident mode memory-maps each chunk after checking it against the manifest and hands out
zero-copy NumPy views; with mapped=False it reads each chunk into memory instead (views of that
copy). edgellm.load reads when the weights fit comfortably in the available memory and maps
otherwise (choose_mapped, mmap="auto"). A mapped file that another process truncates kills this
process with SIGBUS at the next touch of a page past the new end, which no Python code can catch;
once read into memory, nothing on disk can change the weights. Streaming under a DRAM budget
reads through runtime/flashio.py instead (runtime/streaming.py).
"""

import hashlib
import mmap
import os
from dataclasses import dataclass

import numpy as np

from . import encodings, format, memory
from .errors import EdgeLLMError, FormatError

# edgellm.load(mmap="auto"): read the chunks into memory when the weights take at most this
# share of the memory available (runtime/memory.py), else map them. Half, because a read copy is
# anonymous memory that only swap can evict (a mapping's clean pages the kernel can drop and
# read again), and the rest must hold the KV cache, the runtime (~95 MB), the other processes'
# growth and, while the chunks are read, their pages in the page cache.
READ_FRACTION = 0.5


@dataclass
class Matrix:
    """One encoded [n, d] weight matrix: values q, scales s (or None) and the codec to read them."""

    q: np.ndarray
    s: np.ndarray | None
    codec: object
    shape: tuple

    def dequantize(self, rows=None):
        if rows is None:
            return self.codec.dequantize(self.q, self.s)
        return self.codec.dequantize(self.q[rows], None if self.s is None else self.s[rows])

    @property
    def nbytes(self):
        return self.q.nbytes + (0 if self.s is None else self.s.nbytes)


class PackedMatrix:
    """An int4 Matrix whose values and scales were rewritten in place, in a chunk read into
    memory, in the layout decode reads 16 rows at a time (kernels/rows16.py: Reader.pack).
    `packed` is (values, scales) in that layout; q and s give the stored rows back as copies,
    for the kernels that read rows (prefill, the float path): `rows()`."""

    def __init__(self, pv, ps, codec, shape):
        self.packed, self.codec, self.shape = (pv, ps), codec, shape

    def rows(self, rows=None):
        """A plain Matrix of the stored rows (a copy), all of them or a slice of whole groups."""
        from .kernels import rows16

        q, s = rows16.unpack(*self.packed, rows)
        return Matrix(q, s, self.codec, (q.shape[0], self.shape[1]))

    q = property(lambda self: self.rows().q)
    s = property(lambda self: self.rows().s)

    def dequantize(self, rows=None):
        return self.rows().dequantize(rows)

    @property
    def nbytes(self):
        return self.packed[0].nbytes + self.packed[1].nbytes


class PackedBundles:
    """FFN bundle rows whose int4 gate/up parts were packed in place 16 rows a group
    (Reader.pack_bundles; kernels/rows16.pack_bundles): groups uint8 [n/16, 16 stride] in
    units of `unit` bytes, where the parts' (value, scale) byte offsets within a unit. rows()
    gives the stored rows back."""

    def __init__(self, groups, unit, where, parts, stride, d, group_size):
        self.groups, self.unit, self.where, self.parts = groups, unit, where, parts
        self.stride, self.d, self.group_size = stride, d, group_size

    def rows(self):
        from .kernels import rows16

        return rows16.unpack_bundles(self.groups, self.unit, self.where, self.parts,
                                     self.stride, self.d, self.group_size)


def weight_bytes(manifest):
    """Bytes of a model's chunk files (what a resident load maps or reads)."""
    return sum(int(c["size"]) for c in manifest["chunks"])


def choose_mapped(mmap, nbytes):
    """How a resident load holds nbytes of weights: (mapped, why). mmap True or False forces
    mapping or reading; "auto" reads when nbytes <= READ_FRACTION of memory.available_bytes()
    and maps otherwise (or when the available memory is unknown). Reading costs a private copy
    per process (mapped, processes share the page cache) and the read at load; it gives faster
    decode (anonymous memory gets 2 MB pages, a mapped file 4 KB ones: int4 decode 1.2x,
    docs/PERFORMANCE.md) and a model that files changed on disk cannot break (SIGBUS)."""
    if mmap is True or mmap is False:
        return mmap, f"forced (mmap={mmap})"
    if mmap != "auto":
        raise EdgeLLMError(f"mmap must be 'auto', True or False, got {mmap!r}")
    avail = memory.available_bytes()
    if avail is None:
        return True, "auto: available memory unknown"
    fits = nbytes <= READ_FRACTION * avail
    return not fits, (f"auto: {nbytes / 1e6:.1f} MB of weights {'<=' if fits else '>'} "
                      f"{READ_FRACTION:g} x {avail / 1e6:.0f} MB available")


class Reader:
    def __init__(self, model_dir, manifest, mapped=True):
        self.model_dir = os.fspath(model_dir)
        self.manifest = manifest
        self.mapped = mapped  # False: chunks are read into memory, not mapped
        self.chunks = {c["file"]: c for c in manifest["chunks"]}
        self._maps = {}  # file -> (mmap, {stored name: (dtype, shape, begin, end)})
        self.bytes_mapped = 0
        self._seen = {c["file"]: _identity(os.path.join(self.model_dir, c["file"]))
                      for c in manifest["chunks"]}
        self._packed = {}  # (file, name) -> PackedMatrix (pack) or PackedBundles (pack_bundles)

    def read_in(self, file):
        """True when this chunk's bytes are a private copy in memory (read, not mapped): no
        later change on disk can reach them."""
        return not self.mapped and file in self._maps

    def _open(self, file):
        if file not in self._maps:
            if file not in self.chunks:
                raise FormatError(os.path.join(self.model_dir, file), "not a chunk of this model")
            path = format.safe_path(self.model_dir, file)
            extents = format.check_chunk(path, self.chunks[file])
            with open(path, "rb") as f:
                first = min((v[2] for v in extents.values()), default=0)
                mm = (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.mapped
                      else _read_all(f, path, self.chunks[file]["size"], first))
            self._maps[file] = (mm, extents)
            self.bytes_mapped += len(mm)
        return self._maps[file]

    def array(self, file, stored_name):
        """Zero-copy read-only view of one stored safetensors tensor."""
        mm, extents = self._open(file)
        if stored_name not in extents:
            raise FormatError(os.path.join(self.model_dir, file), f"no tensor {stored_name!r}")
        packed = self._packed.get((file, stored_name))
        if packed is not None:  # rewritten in place by pack(): the stored rows, a copy
            return packed.rows().q if isinstance(packed, PackedMatrix) else packed.rows()
        if stored_name.endswith(format.scales_name("")):
            packed = self._packed.get((file, stored_name[:-len(format.scales_name(""))]))
            if packed is not None:
                return packed.s
        dtype, shape, b, e = extents[stored_name]
        return np.frombuffer(mm, dtype=dtype, count=(e - b) // dtype.itemsize,
                             offset=b).reshape(shape)

    def entry(self, file, name):
        return self.chunks[file]["tensors"].get(name)

    def has(self, file, name):
        return name in self.chunks[file]["tensors"]

    def matrix(self, file, name):
        packed = self._packed.get((file, name))
        return packed if packed is not None else load_matrix(self, file, name)

    def pack(self, file, name):
        """The matrix with its rows interleaved for decode (kernels/rows16.py), rewritten in place
        in this chunk's private copy: the same memory. Where the layout does not apply (not
        int4, a shape it does not take, a mapped chunk, a CPU without its kernel) the plain
        matrix. Once packed, matrix() and array() of that name give the packed matrix and
        the stored rows (a copy)."""
        from .kernels import rows16

        m = self.matrix(file, name)
        if (isinstance(m, PackedMatrix) or not rows16.ENABLED or self.mapped
                or m.codec.name != "int4" or not rows16.packable(*m.shape, m.codec.group_size)):
            return m
        pv, ps = rows16.pack(m.q, m.s)
        self._overwrite(file, ((m.q, pv), (m.s, ps)))
        packed = PackedMatrix(m.q.reshape(pv.shape), m.s.view(np.uint16).reshape(ps.shape),
                              m.codec, m.shape)
        self._packed[(file, name)] = packed
        return packed

    def pack_bundles(self, file, name, parts, d, group_size):
        """FFN bundle rows with their int4 parts (rows16.pack_bundles: parts, d, group_size)
        packed 16 rows a group in place, as pack() does for a matrix -> PackedBundles, or
        None where the layout does not apply."""
        from .kernels import rows16

        done = self._packed.get((file, name))
        if done is not None or not rows16.ENABLED or self.mapped:
            return done
        rows = self.array(file, name)
        if rows.dtype != np.uint8 or rows.ndim != 2 or not rows16.packable(
                rows.shape[0], d, group_size):
            return None
        groups, unit, where = rows16.pack_bundles(rows, parts, d, group_size)
        self._overwrite(file, ((rows, groups),))
        packed = PackedBundles(rows.reshape(groups.shape), unit, where, parts, rows.shape[1], d,
                               group_size)
        self._packed[(file, name)] = packed
        return packed

    def _overwrite(self, file, pairs):
        """Write each (view, data) pair's data over the view's bytes, in this chunk's private
        copy (pack: data of the view's size)."""
        buf = self._open(file)[0]
        buf.flags.writeable = True  # the chunk's own copy (_read_all)
        try:
            for old, new in pairs:
                at = old.__array_interface__["data"][0] - buf.__array_interface__["data"][0]
                buf[at:at + new.nbytes] = new.reshape(-1).view(np.uint8)
        finally:
            buf.flags.writeable = False

    def vector(self, file, name):
        """A small tensor (norm weight, bias) as float32."""
        return np.asarray(self.array(file, name), dtype=np.float32)

    def verify(self, progress=None):
        """Full read: check every chunk's size, header and sha256 against the manifest."""
        for c in self.manifest["chunks"]:
            path = format.safe_path(self.model_dir, c["file"])
            format.check_chunk(path, c)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
                    if progress:
                        progress(len(block))
            if h.hexdigest() != c["sha256"]:
                raise FormatError(path, "checksum mismatch: the file is corrupt or was changed "
                                        "after conversion")

    def check_unchanged(self):
        """Raise a FormatError when a chunk file the runtime may still read changed on disk
        since the model was loaded (removed, replaced, truncated, or written to: its device,
        inode, size, mtime or ctime differ; ctime too because tools that keep a file's mtime,
        such as rsync -t or cp -p, cannot keep its ctime). Chunks already read into memory
        (read_in) are skipped: their copy cannot change. Costs one stat per chunk. Mapped
        weights would no longer match the file, and a mapped file that shrank faults (SIGBUS)
        where its pages are gone: callers check before each generation, so such a change ends
        in this error instead (a change during a generation is not seen: docs/INTERNALS.md)."""
        for file, seen in self._seen.items():
            if self.read_in(file):
                continue
            path = os.path.join(self.model_dir, file)
            now = _identity(path)
            if now == seen:
                continue
            if now is None:
                what = "removed"
            elif now[:2] != seen[:2]:
                what = "replaced by another file"
            elif now[2] != seen[2]:
                what = f"its size changed from {seen[2]} to {now[2]} bytes"
            else:
                what = "written to, or its status changed"
            raise FormatError(path, f"changed on disk since the model was loaded ({what}); load "
                                    "the model again")

    def close(self):
        # views handed out keep their mmap alive; just drop our references
        self._maps.clear()


def _read_all(f, path, size, aligned_at=0):
    """A chunk file's bytes in a read-only array (a file shorter than the manifest says, e.g.
    truncated since it was checked, is a FormatError), placed so that byte aligned_at (the
    first tensor's) sits on a 64-byte boundary: where the tensors' sizes are multiples of 64
    (the large ones are) rows16's 64-byte loads then never straddle two cache lines (15% of a
    packed FFN's time, measured)."""
    raw = np.empty(size + 64, np.uint8)
    at = (-(raw.__array_interface__["data"][0] + aligned_at)) % 64
    buf = raw[at:at + size]
    view, got = memoryview(buf), 0
    while got < size:
        n = f.readinto(view[got:])
        if not n:
            raise FormatError(path, f"file ended after {got} of {size} bytes while being read "
                                    "(truncated?)")
        got += n
    buf.flags.writeable = False
    return buf


def _identity(path):
    """(device, inode, size, mtime, ctime) of a file, or None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def load_matrix(src, file, name):
    """A Matrix from any source with entry() and array() (the mmap Reader, or the streaming
    runtime's MemorySource, which reads into counted memory)."""
    entry = src.entry(file, name)
    c = encodings.codec(entry["encoding"], entry.get("group_size"))
    s = None
    if c.scale_shape(*entry["shape"]) is not None:
        s = src.array(file, format.scales_name(name))
    return Matrix(src.array(file, name), s, c, tuple(entry["shape"]))

"""Write a model directory (format v1) safely: stage, verify, then rename into place.

Everything goes into a temporary sibling of the destination (`DST.tmp-XXXXXX`). Only when the
manifest is written and the staged directory passes the runtime's own checks (read_manifest, then
Reader.verify: every chunk's size, header and sha256) is it renamed to DST. Any exception, including
KeyboardInterrupt, removes the staging directory, so a failed conversion leaves nothing behind. An
existing DST is replaced only with overwrite=True, only if it is an edgellm model directory (or
empty), and only after the new one has been verified; the two directories are swapped in one
atomic step (renameat2 RENAME_EXCHANGE), so a process killed at any point leaves DST either the old
model or the new one (a kill can leave a `DST.tmp-*` directory behind, never a half-made DST).
A write that fails (disk full, I/O error) is a ConvertError naming DST.

Leftovers of killed conversions: a staging directory's name carries its owner, `DST.tmp-PID-START-
XXXXXX` (START: the process's start time, so a reused pid is not taken for the owner), written in
the same mkdtemp that creates it. The next conversion to DST removes the staging directories whose
owner is no longer running, and never one whose owner is (another conversion at work). Names
without an owner (older versions) are left alone.

Chunks are written with safetensors.numpy.save_file, so each is a valid safetensors file.

>>> with Staging("out/model", overwrite=False) as st:          # doctest: +SKIP
...     st.write_chunk("embed.safetensors", entries, arrays)
...     st.write_manifest(manifest)
...     st.commit()
"""

import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from edgellm.runtime import format
from edgellm.runtime.errors import ConvertError, EdgeLLMError
from edgellm.runtime.reader import Reader


def check_destination(dst, overwrite, src=None):
    """Refuse a destination we must not write, before any work is done."""
    dst = os.path.abspath(dst)
    if src is not None:
        s = os.path.realpath(src)
        d = os.path.realpath(dst)
        if d == s or d.startswith(s + os.sep) or s.startswith(d + os.sep):
            raise ConvertError(f"{dst}: the output must not be the source directory, inside it, "
                               "or contain it")
    if os.path.lexists(dst):
        if not overwrite:
            raise ConvertError(f"{dst}: already exists (choose another output or pass "
                               "overwrite=True / --force to replace it)")
        if not os.path.isdir(dst) or os.path.islink(dst):
            raise ConvertError(f"{dst}: exists and is not a directory; refusing to replace it")
        if os.listdir(dst) and not os.path.isfile(os.path.join(dst, format.MANIFEST)):
            raise ConvertError(f"{dst}: exists and is not an edgellm model directory (no "
                               f"{format.MANIFEST}); refusing to replace it")
    return dst


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class Staging:
    def __init__(self, dst, overwrite=False):
        self.dst = os.path.abspath(dst)
        self.overwrite = overwrite
        self.tmp = None
        self.committed = False

    def __enter__(self):
        parent = os.path.dirname(self.dst)
        try:
            os.makedirs(parent, exist_ok=True)
            remove_stale(self.dst)
            pid = os.getpid()
            self.tmp = tempfile.mkdtemp(prefix=f"{os.path.basename(self.dst)}.tmp-{pid}-"
                                        f"{_start_time(pid)}-", dir=parent)
        except OSError as e:
            raise ConvertError(f"{self.dst}: cannot create the output next to it in {parent} "
                               f"({e.strerror or e})") from None
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.tmp is not None and os.path.exists(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        reason = _write_error(exc, self.tmp)
        if reason:  # replaces the OSError / SafetensorError
            raise ConvertError(f"{self.dst}: cannot write the converted model: {reason}; nothing "
                               "was written") from None
        return False

    def path(self, file):
        return os.path.join(self.tmp, file)

    def write_chunk(self, file, entries, arrays):
        """Write one chunk. entries: canonical name -> manifest tensor entry; arrays: stored
        safetensors name -> ndarray. Returns the manifest chunk entry (file, size, sha256, tensors).
        """
        expected = {}
        for name, e in entries.items():
            expected.update(format.stored_tensors(name, e))
        got = {k: (v.dtype, tuple(v.shape)) for k, v in arrays.items()}
        if got != expected:  # a converter bug, not a user error: fail loudly before writing
            raise EdgeLLMError(f"{file}: arrays {got} disagree with the manifest entries "
                               f"{expected}")
        path = self.path(file)
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path)
        return {"file": file, "size": os.path.getsize(path), "sha256": sha256_file(path),
                "tensors": entries}

    def copy(self, src_path, file):
        shutil.copyfile(src_path, self.path(file))

    def write_manifest(self, manifest):
        path = self.path(format.MANIFEST)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, ensure_ascii=False)
            f.write("\n")

    def verify(self):
        """Re-read the staged directory with the runtime's own checks."""
        m, _ = format.read_manifest(self.tmp)
        Reader(self.tmp, m).verify()

    def commit(self):
        """Verify, then move the staged directory to dst (replacing an old one if allowed)."""
        self.verify()
        old = None
        if os.path.lexists(self.dst):
            check_destination(self.dst, self.overwrite)
            if _exchange(self.tmp, self.dst):  # tmp now holds the old model; __exit__ removes it
                self.committed = True
                return self.dst
            old = tempfile.mkdtemp(prefix=os.path.basename(self.dst) + ".old-",
                                   dir=os.path.dirname(self.dst))
            os.rmdir(old)
            os.rename(self.dst, old)
        try:
            os.rename(self.tmp, self.dst)
        except BaseException:
            if old is not None:
                os.rename(old, self.dst)
            raise
        self.tmp = None
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.dst


def _proc_stat(pid):
    """(state, start time in clock ticks since boot) of a process from Linux /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2:].split()  # after the name, which may hold spaces
        return fields[0], int(fields[19])  # fields 3 and 22
    except (OSError, ValueError, IndexError):
        return None


def _start_time(pid):
    st = _proc_stat(pid)
    return st[1] if st else 0


def _running(pid, start):
    """Is process pid, started at `start` (0: not known), still running (not a zombie)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    st = _proc_stat(pid)
    if st is None:  # no /proc: the pid alone decides
        return True
    return st[0] != b"Z" and (start == 0 or st[1] == start)


def remove_stale(dst):
    """Remove DST.tmp-PID-START-* staging directories whose owner is no longer running (left by
    a killed conversion). Returns the paths removed."""
    parent, base = os.path.split(os.path.abspath(dst))
    prefix = base + ".tmp-"
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        owner = name[len(prefix):].split("-")
        if len(owner) != 3 or not (owner[0].isdigit() and owner[1].isdigit()):
            continue  # not named by this version: its owner is unknown
        path = os.path.join(parent, name)
        if (int(owner[0]) == os.getpid() or _running(int(owner[0]), int(owner[1]))
                or not os.path.isdir(path) or os.path.islink(path)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _exchange(a, b):
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where unsupported (then
    the caller renames twice, with a moment in which b does not exist)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or filesystem
        return False
    raise OSError(err, os.strerror(err), b)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _write_error(exc, tmp):
    """Why a write into the staging directory failed (disk full, I/O error), or None when exc is
    not such an error (a source that cannot be read keeps its own message)."""
    if isinstance(exc, OSError):
        if exc.errno in NO_SPACE:
            return "no space left on the device"
        if tmp and exc.filename and os.fspath(exc.filename).startswith(tmp):
            return exc.strerror or str(exc)
    if isinstance(exc, SafetensorError) and "os error" in str(exc):  # save_file's I/O error
        if "os error 28" in str(exc) or "os error 122" in str(exc):
            return "no space left on the device"
        return str(exc)
    return None

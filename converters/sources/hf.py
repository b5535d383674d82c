"""Hugging Face checkpoint source: stream tensors out of safetensors files, no torch.

A directory holds `model.safetensors`, or shards listed by `model.safetensors.index.json`. Opening
the source reads only the headers (runtime.format.read_header, the one safetensors header parser),
so every missing shard, missing tensor, wrong shape or unsupported dtype is found before the
converter writes anything. Tensors are then read one at a time, or a block of rows at a time, with
positioned reads into a fresh float32 array: F32 and F16 as they are, BF16 widened exactly
(`(u16.astype(uint32) << 16).view(float32)`; NumPy has no bfloat16).

Reads go through the file, not a memory map, on purpose: pages of a mapping count towards the
process's resident memory for as long as it stays mapped, and the converter promises a peak of a
few layers, not the size of the checkpoint.

>>> src = HFSource("path/to/hf_model")                        # doctest: +SKIP
>>> w = src.read("model.layers.0.self_attn.q_proj.weight")     # doctest: +SKIP
>>> rows = src.read("model.embed_tokens.weight", rows=(0, 1024)) # doctest: +SKIP
"""

import json
import os

import numpy as np

from edgellm.runtime import format
from edgellm.runtime.errors import ConvertError, FormatError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # BF16 read as raw uint16


def bf16_to_f32(u16):
    """Widen raw bfloat16 bits (uint16) to float32, exactly."""
    return (np.asarray(u16, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


class HFSource:
    def __init__(self, path, optional_prefixes=("model.",)):
        self.path = os.fspath(path)
        self.optional_prefixes = tuple(optional_prefixes)
        self.index = {}  # tensor name -> (file path, dtype name, shape, absolute begin, end)
        self._files = {}  # file path -> open file object
        for file in self._shard_files():
            self._read_header(file)

    # -- discovery ----------------------------------------------------------------------------

    def _shard_files(self):
        if not os.path.isdir(self.path):
            raise ConvertError(f"{self.path}: not a directory")
        index_path = os.path.join(self.path, INDEX)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                files = list(dict.fromkeys(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ConvertError(f"{index_path}: not a valid safetensors index ({e})") from None
            self.weight_map = weight_map
            paths = []
            for name in files:
                if not isinstance(name, str) or os.path.basename(name) != name:
                    raise ConvertError(f"{index_path}: shard name {name!r} is not a plain file "
                                       "name")
                p = os.path.join(self.path, name)
                if not os.path.isfile(p):
                    raise ConvertError(f"{p}: shard listed in {INDEX} is missing")
                paths.append(p)
            return paths
        self.weight_map = None
        single = os.path.join(self.path, SINGLE)
        if os.path.isfile(single):
            return [single]
        if any(os.path.isfile(os.path.join(self.path, f))
               for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            raise ConvertError(f"{self.path}: only PyTorch .bin weights found; edgellm reads "
                               "safetensors (re-save the model with safe_serialization=True)")
        raise ConvertError(f"{single}: missing (and no {INDEX}): no safetensors weights in "
                           f"{self.path}")

    def _read_header(self, file):
        try:
            header, start = format.read_header(file)
        except FormatError as e:
            raise ConvertError(str(e)) from None
        size = os.path.getsize(file)
        for name, h in header.items():
            if self.weight_map is not None and self.weight_map.get(name) != os.path.basename(file):
                continue  # the index decides which shard holds a name
            try:
                dtype, shape = h["dtype"], tuple(int(v) for v in h["shape"])
                b, e = (int(v) for v in h["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConvertError(f"{file}: corrupt header entry for {name}") from None
            if not 0 <= b <= e or start + e > size:
                raise ConvertError(f"{file}: tensor {name} lies outside the file (truncated?)")
            self.index[name] = (file, dtype, shape, start + b, start + e)

    # -- lookup -------------------------------------------------------------------------------

    def resolve(self, name):
        """The stored name for a checkpoint name, allowing a missing 'model.' prefix."""
        if name in self.index:
            return name
        for p in self.optional_prefixes:
            if name.startswith(p) and name[len(p):] in self.index:
                return name[len(p):]
        return None

    def has(self, name):
        return self.resolve(name) is not None

    def _where(self, name):
        if self.weight_map is not None:
            return os.path.join(self.path, INDEX)
        return os.path.join(self.path, SINGLE)

    def info(self, name):
        """(file, dtype name, shape) of a tensor; ConvertError naming the file when absent."""
        stored = self.resolve(name)
        if stored is None:
            raise ConvertError(f"{self._where(name)}: tensor {name!r} is missing")
        file, dtype, shape, _, _ = self.index[stored]
        return file, dtype, shape

    def check(self, name, shape):
        """Check that a tensor exists with a given shape and a readable dtype."""
        file, dtype, have = self.info(name)
        if dtype not in DTYPES:
            raise ConvertError(f"{file}: tensor {name} has dtype {dtype}; supported: "
                               f"{', '.join(DTYPES)}")
        if tuple(have) != tuple(shape):
            raise ConvertError(f"{file}: tensor {name} has shape {list(have)}, the config implies "
                               f"{list(shape)}")
        _, _, _, b, e = self.index[self.resolve(name)]
        if e - b != int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize:
            raise ConvertError(f"{file}: tensor {name}: data size disagrees with its shape")

    def dtypes(self):
        return sorted({v[1] for v in self.index.values()})

    # -- reading ------------------------------------------------------------------------------

    def read(self, name, rows=None):
        """float32 copy of a tensor, or of rows [start, stop) of a 2-D tensor."""
        stored = self.resolve(name)
        if stored is None:
            raise ConvertError(f"{self._where(name)}: tensor {name!r} is missing")
        file, dtype, shape, b, e = self.index[stored]
        if dtype not in DTYPES:
            raise ConvertError(f"{file}: tensor {name} has unsupported dtype {dtype}")
        raw = np.dtype(DTYPES[dtype])
        if rows is not None:
            r0, r1 = rows
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * raw.itemsize
            b, shape = b + r0 * row_bytes, (r1 - r0,) + tuple(shape[1:])
        count = int(np.prod(shape, dtype=np.int64))
        buf = np.empty(count, dtype=raw)
        view, f, done = memoryview(buf).cast("B"), self._file(file), 0
        f.seek(b)
        while done < buf.nbytes:  # one read() returns at most ~2 GiB on Linux
            got = f.readinto(view[done:])
            if not got:
                raise ConvertError(f"{file}: truncated while reading tensor {name}")
            done += got
        if dtype == "BF16":
            out = bf16_to_f32(buf)
        elif dtype == "F16":
            out = buf.astype(np.float32)
        else:
            out = buf
        return out.reshape(shape)

    def _file(self, path):
        if path not in self._files:
            self._files[path] = open(path, "rb", buffering=0)
        return self._files[path]

    def close(self):
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

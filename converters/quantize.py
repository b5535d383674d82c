"""Choose an encoding for each tensor and encode it, measuring what the encoding costs.

--quant f32|f16|int8|int4|int3 applies to every weight matrix (attention, FFN bundles, token
embedding, head). Vectors (norm weights, biases) and OPT's learned position table stay f32. int4
and int3 need a row length divisible by the group size; a matrix whose rows are not falls back to
int8, and the choice is recorded. Every lossy encoding reports its maximum absolute error,
measured by decoding what was written (as llama2.c's exporter does), so each lossy step says its
cost.

Encoding goes a block of rows at a time (all codecs quantize rows independently, so blocking is
exact): the embedding of a 32k-vocabulary model never exists as one float32 array.

>>> c, note = matrix_codec("int4", 64, d=96)
>>> c.name, note
('int8', 'row length 96 is not divisible by the int4 group size 64: int8 instead')
"""

import numpy as np

from edgellm.runtime import encodings
from edgellm.runtime.errors import ConvertError, EdgeLLMError

QUANTS = ("f32", "f16", "int8", "int4", "int3")
GROUPED = ("int4", "int3")  # quants with a group size
KEEP = "keep"  # GGUF sources only: Q8_0/Q4_0/Q4_1 blocks stored as they are (sources/gguf.py)
BLOCK_VALUES = 1 << 20  # values per encoding block (4 MiB as float32)


def check_quant(quant, group_size):
    if quant not in QUANTS + (KEEP,):
        raise ConvertError(f"quant {quant!r} is not supported (choose one of "
                           f"{', '.join(QUANTS + (KEEP,))})")
    if quant in GROUPED:
        if (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0
                or group_size % encodings.INT4_BLOCK):
            raise ConvertError(f"group_size must be a positive multiple of "
                               f"{encodings.INT4_BLOCK} for {quant}, got {group_size!r}")


def matrix_codec(quant, group_size, d):
    """(codec, note) for a matrix with rows of length d; note explains a fallback, else None."""
    if quant in GROUPED and d % group_size:
        return encodings.codec("int8"), (f"row length {d} is not divisible by the {quant} group "
                                         f"size {group_size}: int8 instead")
    return encodings.codec(quant, group_size if quant in GROUPED else None), None


def entry(c, shape):
    """Manifest tensor entry for an encoded matrix or a vector."""
    return {"encoding": c.name, "shape": [int(v) for v in shape], "group_size": c.group_size}


def vector_entry(shape):
    return {"encoding": "f32", "shape": [int(v) for v in shape], "group_size": None}


def encode_matrix(read_rows, n, d, c, name="tensor", block_values=BLOCK_VALUES):
    """Encode an [n, d] matrix given read_rows(r0, r1) -> float32 [r1 - r0, d].

    Returns (q, s, stats) with stats {"max_abs_error", "max_abs"} measured on the decoded result.
    """
    q = np.empty(c.data_shape(n, d), dtype=c.data_dtype())
    sshape = c.scale_shape(n, d)
    s = None if sshape is None else np.empty(sshape, dtype=c.scale_dtype())
    err = peak = 0.0
    step = max(1, block_values // max(d, 1))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        x = read_rows(r0, r1)
        try:
            qb, sb = c.quantize(x)
        except EdgeLLMError as e:
            raise ConvertError(f"{name}: {e}") from None
        q[r0:r1] = qb
        if s is not None:
            s[r0:r1] = sb
        peak = max(peak, float(np.abs(x).max(initial=0)))
        if c.name != "f32":
            err = max(err, float(np.abs(c.dequantize(qb, sb) - x).max(initial=0)))
        del x, qb, sb
    return q, s, {"max_abs_error": err, "max_abs": peak}


def bundle_codec(quant, group_size, d):
    """Codec for every part of an FFN bundle (each part is a vector of length d_model)."""
    return matrix_codec(quant, group_size, d)


def encode_bundles(read_rows, part_names, c, n, d, name="ffn_bundles",
                   block_values=BLOCK_VALUES):
    """Pack the FFN bundles of n neurons, a block of neurons at a time.

    read_rows(part, r0, r1) -> float32 [r1 - r0, d]: rows r0..r1 of a part (for "down", columns
    of the [d, d_ff] matrix, transposed). Returns (bundles uint8 [n, stride], layout, stats per
    part) with stats measured on the decoded rows.
    """
    parts = [(p, c) for p in part_names]
    layout, stride = encodings.bundle_layout(parts, d)
    out = np.empty((n, stride), dtype=np.uint8)
    stats = {p: {"max_abs_error": 0.0, "max_abs": 0.0} for p in part_names}
    step = max(1, block_values // max(d * len(parts), 1))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        vectors = {p: np.ascontiguousarray(read_rows(p, r0, r1), dtype=np.float32)
                   for p in part_names}
        try:
            block, block_layout = encodings.pack_bundles(vectors, parts, d)
        except EdgeLLMError as e:
            raise ConvertError(f"{name}: {e}") from None
        assert block_layout == layout
        out[r0:r1] = block
        for e in layout:
            x = vectors[e["name"]]
            st = stats[e["name"]]
            err = np.abs(encodings.unpack_bundle_part(block, e, d) - x).max(initial=0)
            st["max_abs_error"] = max(st["max_abs_error"], float(err))
            st["max_abs"] = max(st["max_abs"], float(np.abs(x).max(initial=0)))
        del vectors, block
    return out, layout, stats

"""Low-rank attention projections (docs/FORMAT.md §3.4): a projection W [n, d] stored as two
matrices, left [n, r] and right [r, d], with W ≈ left · right (converters/lowrank.py: ASVD /
SVD-LLM style). The forward pass computes y = left · (right · x): two matrix products through
the ordinary kernels, r (n + d) weights read instead of n d.

The fused decode call (kernels/fused.py) takes one matrix per projection: a layer with a
low-rank projection runs the per-operation path.
"""

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_o")


def in_manifest(manifest):
    """The model stores some projection as factors (a chunk tensor P.left)."""
    return any(k.endswith(".left") for c in manifest["chunks"] for k in c["tensors"])


class LowRank:
    """One projection as two encoded matrices (reader.Matrix): y = left (right x)."""

    def __init__(self, left, right):
        self.left, self.right = left, right
        self.shape = (left.shape[0], right.shape[1])
        self.rank = right.shape[0]

    @property
    def nbytes(self):
        return self.left.nbytes + self.right.nbytes


def projection(reader, file, name):
    """The reader's Matrix `name` of chunk `file`, or a LowRank when it is stored in factors."""
    if reader.has(file, name + ".left"):
        return LowRank(reader.matrix(file, name + ".left"), reader.matrix(file, name + ".right"))
    return reader.matrix(file, name)


def linear(ops, m, x):
    """ops.linear(m, x) for a Matrix or a LowRank (ops: the kernels module, or kernels/w8a8)."""
    if isinstance(m, LowRank):
        return ops.linear(m.left, ops.linear(m.right, x))
    return ops.linear(m, x)


def linear_many(ops, ms, x, biases=None):
    """ops.linear_many with LowRank members computed one by one."""
    if not any(isinstance(m, LowRank) for m in ms):
        return ops.linear_many(ms, x, biases)
    outs = [linear(ops, m, x) for m in ms]
    for y, b in zip(outs, biases or [None] * len(ms)):
        if b is not None:
            y += b
    return outs

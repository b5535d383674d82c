"""`edgellm export MODEL --to onnx -o DIR`: an edgellm model as an ONNX graph that onnxruntime
runs with the same quantized weights.

The directory holds model.onnx (+ model.onnx_data, the weights as external data), config.json,
generation_config.json and the tokenizer files (as `--to hf` writes them), so it has the shape of
an optimum export: `edgellm convert DIR` reads it back (sources/onnx.py) when its weights are
float.

The graph (opset 18 + com.microsoft for MatMulNBits), optimum's names and layout:
inputs `input_ids` [batch, seq] int64, `attention_mask` [batch, past + seq] int64 (1 = attend),
`position_ids` [batch, seq] int64, and per layer `past_key_values.{i}.key` / `.value`
[batch, kv_heads, past, head_dim] float32 (past = 0 for a prompt); outputs `logits`
[batch, seq, vocab] float32 and `present.{i}.key` / `.value` [batch, kv_heads, past + seq,
head_dim]. The forward pass is docs/FORMAT.md §5 in plain ONNX ops: RMSNorm as
x·(mean(x²)+ε)^-½·w (LayerNormalization for `norm: layer`), RoPE from cos/sin tables gathered by
position_ids (rotate_half), grouped-query attention as two batched MatMuls with a causal mask
(query at past + t sees keys 0 … past + t) and the attention mask, SiLU as x·sigmoid(x).

Weights, each kept in its stored encoding where ONNX has an exact twin:
- int4 (g = 32, 64, 128) -> com.microsoft MatMulNBits, bits 4, block_size g: the same codes,
  re-packed from the Q4_0 nibble order (value k and k+16 of a run of 32 in one byte) into
  MatMulNBits' order (values 2i and 2i+1 in byte i, low first); no zero points, so the operator's
  default zero point 8 applies: (code - 8) · scale, exactly FORMAT.md §4.3. The f16 scales
  widen exactly to float32 (MatMulNBits' scales have A's type);
- int8 -> DequantizeLinear(int8 [out, in], f32 scale [out], axis 0, zero point 0) then MatMul:
  q · s, exactly §4.2;
- f16 and f32 -> initializers of that type (f16 Cast to float32 in the graph);
- the FFN down projection is stored one neuron per row, quantized along d_model (§4.5), while
  MatMulNBits quantizes along its input (d_ff): int4 down rows are decoded in the graph from the
  same bytes (BitwiseAnd/BitShift, minus 8, times the scale; a constant subgraph onnxruntime
  folds to float at load); int8 ones compute u·diag(s)·Q: the neuron's scale multiplies the
  activation u, and Q [d_ff, d] goes through DequantizeLinear with unit scales (same int8 bytes;
  only the float rounding order differs);
- the embedding: Gather of the stored rows and their scales (int8, int4 decoded as above, f16
  Cast); a tied head reuses the same initializers: int4 through MatMulNBits, int8 as an 8-bit
  MatMulNBits (codes q + 128, the operator's default zero point 128, each block of 32 with its
  row's scale: exact) whose bytes the Gather also reads;
- anything else (int3, q8_0, q4_1, sparse encodings, a kept ffn_down matrix) has no exact ONNX
  twin here: written as the float32 values edgellm decodes (exact, larger), listed in the report.
onnxruntime may fold the DequantizeLinear and decode subgraphs into float weights when it loads
the model; the file holds the quantized bytes.

Everything is written to a temporary sibling directory and renamed into place when complete.
"""

import os
import sys

import numpy as np

from .export import ExportError, _check_destination, _hf_directory, _Model, hf_config
from .runtime.kernels.reference import rope_tables

OPSET = 18
NBITS_BLOCKS = (16, 32, 64, 128, 256)  # MatMulNBits block sizes (powers of two >= 16)


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ExportError("exporting ONNX needs the onnx package (pip install "
                          "'edgellm[onnx]')") from None
    return onnx


class _Graph:
    """Nodes and initializers of one graph, with generated tensor names."""

    def __init__(self, onnx):
        self.onnx, self.h = onnx, onnx.helper
        self.nodes, self.inits, self.n = [], {}, 0

    def const(self, name, array):
        if name not in self.inits:
            self.inits[name] = self.onnx.numpy_helper.from_array(np.ascontiguousarray(array),
                                                                 name)
        return name

    def ints(self, name, values):
        return self.const(name, np.asarray(values, dtype=np.int64))

    def op(self, op, inputs, scope="", domain=None, outputs=1, **attrs):
        self.n += 1
        name = f"{scope}/{op}_{self.n}"
        outs = [f"{name}_out{k}" for k in range(outputs)] if isinstance(outputs, int) \
            else list(outputs)
        self.nodes.append(self.h.make_node(op, list(inputs), outs, name=name, domain=domain,
                                           **attrs))
        return outs[0] if len(outs) == 1 else outs


# ---------------------------------------------------------------------------------------------
# Weights


def _nbits_pack(q, codec):
    """int4 rows (Q4_0 nibble order) -> MatMulNBits B [N, K/g, g/2]: byte i of a block holds
    values 2i (low nibble) and 2i+1 (high)."""
    codes = codec.unpack(q)  # [N, K] values 0..15
    n, k = codes.shape
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    g = codec.group_size
    return np.ascontiguousarray(packed.reshape(n, k // g, g // 2).astype(np.uint8))


class _Weights:
    """Linear layers and the embedding in ONNX form, with a report per tensor."""

    def __init__(self, g, report):
        self.g, self.report = g, report

    def _record(self, key, kind):
        self.report["tensors"][key] = kind

    def int4_blocks(self, key, q, s, codec):
        """(B, flat scales) initializers in MatMulNBits layout, shared by Gather and head."""
        b = self.g.const(f"{key}.nbits", _nbits_pack(q, codec))
        sc = self.g.const(f"{key}.scales", np.asarray(s, np.float32).reshape(-1))
        return b, sc

    def linear(self, x, key, q, s, codec, scope):
        """x [.., K] · Wᵀ for W [N, K] stored as rows quantized along K."""
        g = self.g
        n = q.shape[0]
        if codec.name == "int4" and codec.group_size in NBITS_BLOCKS:
            k = q.shape[1] * 2
            b, sc = self.int4_blocks(key, q, s, codec)
            self._record(key, f"MatMulNBits int4 g{codec.group_size}")
            return g.op("MatMulNBits", [x, b, sc], scope, domain="com.microsoft", K=k, N=n,
                        bits=4, block_size=codec.group_size)
        if codec.name == "int8":
            w = self._dq_rows(key, q, s, scope)
            self._record(key, "DequantizeLinear int8 (axis 0) + MatMul")
            wt = g.op("Transpose", [w], scope, perm=[1, 0])
            return g.op("MatMul", [x, wt], scope)
        w = self._float_t(key, q, s, codec, transpose=True)
        return g.op("MatMul", [x, w], scope)

    def linear_rows_in(self, x, key, q, s, codec, scope):
        """x [.., K] · D for D [K, N] stored as rows quantized along N (the FFN down rows)."""
        g = self.g
        if codec.name == "int8":
            # x·diag(s)·Q: the row scales move to the input side, so the int8 matrix has unit
            # per-column scales, the DequantizeLinear + MatMul form onnxruntime fuses into an
            # 8-bit MatMulNBits; scales on axis 0 (along K) it would dequantize on every call
            x = g.op("Mul", [x, g.const(f"{key}.scale", np.asarray(s, np.float32).reshape(-1))],
                     scope)
            qi = g.const(f"{key}.int8", np.asarray(q, np.int8))
            n = q.shape[1]
            w = g.op("DequantizeLinear", [qi, g.const(f"unit_scale.{n}", np.ones(n, np.float32)),
                                          g.const(f"zero_point.{n}", np.zeros(n, np.int8))],
                     scope, axis=1)
            self._record(key, "int8 scales on the input, DequantizeLinear int8 (axis 1) + MatMul")
        elif codec.name == "int4":
            w = self._int4_rows(key, q, s, codec, scope)
            self._record(key, f"int4 g{codec.group_size} decoded in the graph + MatMul")
        else:
            w = self._float_t(key, q, s, codec, transpose=False)
        return g.op("MatMul", [x, w], scope)

    def _dq_rows(self, key, q, s, scope):
        g = self.g
        qi = g.const(f"{key}.int8", np.asarray(q, np.int8))
        si = g.const(f"{key}.scale", np.asarray(s, np.float32).reshape(-1))
        zp = g.const(f"{key}.zero_point", np.zeros(q.shape[0], np.int8))
        return g.op("DequantizeLinear", [qi, si, zp], scope, axis=0)

    def _float_t(self, key, q, s, codec, transpose):
        """f32/f16 initializer ([K, N] when transpose), or the decoded values as f32."""
        g = self.g
        if codec.name == "f16":
            w = np.asarray(q, np.float16)
            name = g.const(f"{key}.f16", w.T if transpose else w)
            self._record(key, "float16")
            return g.op("Cast", [name], "", to=self.g.onnx.TensorProto.FLOAT)
        w = np.asarray(q, np.float32) if codec.name == "f32" else \
            codec.dequantize(q, s).astype(np.float32)
        self._record(key, "float32" if codec.name == "f32" else
                     f"float32 (decoded from {codec.name}: no exact ONNX twin)")
        return g.const(f"{key}.f32", w.T if transpose else w)

    def _int4_rows(self, key, q, s, codec, scope):
        """[K, N] int4 rows decoded with plain ops (a constant subgraph)."""
        g = self.g
        k, half = q.shape
        gs = codec.group_size
        b = g.const(f"{key}.nbits", _nbits_pack(q, codec))  # [K, N/g, g/2]
        sc = g.const(f"{key}.scales2d", np.asarray(s, np.float32))  # [K, N/g]
        vals = self.decode_int4(b, sc, gs, scope)  # [K, N/g, g]
        return g.op("Reshape", [vals, g.ints(f"shape.{k}x-1", [k, -1])], scope)

    def decode_int4(self, b, scales, gs, scope):
        """MatMulNBits-ordered bytes [..., nb, g/2] and scales [..., nb] -> f32 [..., nb, g]."""
        g = self.g
        lo = g.op("BitwiseAnd", [b, g.const("u8.15", np.array(15, np.uint8))], scope)
        hi = g.op("BitShift", [b, g.const("u8.4", np.array(4, np.uint8))], scope,
                  direction="RIGHT")
        ax = g.ints("axis.-1", [-1])
        pair = g.op("Concat", [g.op("Unsqueeze", [lo, ax], scope),
                               g.op("Unsqueeze", [hi, ax], scope)], scope, axis=-1)
        # [..., nb, g/2, 2] -> [..., nb, g]: keep every leading dim, merge the last two
        codes = g.op("Reshape", [pair, self._merge_last(pair, gs, scope)], scope)
        f = g.op("Cast", [codes], scope, to=g.onnx.TensorProto.FLOAT)
        f = g.op("Sub", [f, g.const("f32.8", np.array(8.0, np.float32))], scope)
        return g.op("Mul", [f, g.op("Unsqueeze", [scales, ax], scope)], scope)

    def _merge_last(self, t, gs, scope):
        """The shape of t with its last two dims merged into gs (leading dims kept)."""
        g = self.g
        shape = g.op("Shape", [t], scope)
        lead = g.op("Slice", [shape, g.ints("i.0", [0]), g.ints("i.-2", [-2])], scope)
        return g.op("Concat", [lead, g.ints(f"i.{gs}", [gs])], scope, axis=0)

    def int8_blocks(self, key, q, s):
        """A tied int8 embedding as 8-bit MatMulNBits blocks: codes q + 128 (the operator's
        default zero point for 8 bits is 128) in blocks of 32, each with its row's scale; the
        Gather of the embedding reads the same bytes. (DequantizeLinear would need its own copy:
        onnxruntime fuses it into MatMulNBits only when nothing else reads the int8 tensor.)"""
        n, d = q.shape
        codes = (np.asarray(q, np.int16) + 128).astype(np.uint8).reshape(n, d // 32, 32)
        b = self.g.const(f"{key}.nbits8", codes)
        sc = self.g.const(f"{key}.scales8", np.repeat(np.asarray(s, np.float32).reshape(n, 1),
                                                      d // 32, axis=1).reshape(-1))
        return b, sc

    def tied_int8(self, codec, q):
        return codec.name == "int8" and q.shape[1] % 32 == 0

    def head_int8(self, x, key, q, s, scope):
        b, sc = self.int8_blocks(key, q, s)
        self._record(key, "MatMulNBits 8-bit, block 32, row scale per block (tied embedding)")
        return self.g.op("MatMulNBits", [x, b, sc], scope, domain="com.microsoft",
                         K=q.shape[1], N=q.shape[0], bits=8, block_size=32)

    def embed(self, ids, key, q, s, codec, scope, tied=False):
        """Rows of the embedding for ids [B, T] -> f32 [B, T, d]."""
        g = self.g
        if tied and self.tied_int8(codec, q):
            b, _ = self.int8_blocks(key, q, s)
            rows = g.op("Reshape", [g.op("Gather", [b, ids], scope),
                                    g.ints("shape.bt-1", [0, 0, -1])], scope)
            rows = g.op("Sub", [g.op("Cast", [rows], scope, to=g.onnx.TensorProto.FLOAT),
                                g.const("f32.128", np.array(128.0, np.float32))], scope)
            si = g.const(f"{key}.row_scale", np.asarray(s, np.float32).reshape(-1))
            sc = g.op("Unsqueeze", [g.op("Gather", [si, ids], scope), g.ints("axis.-1", [-1])],
                      scope)
            self._record(key + " (gather)", "int8 rows (MatMulNBits bytes) · scale")
            return g.op("Mul", [rows, sc], scope)
        if codec.name == "int8":
            qi = g.const(f"{key}.int8", np.asarray(q, np.int8))
            si = g.const(f"{key}.scale", np.asarray(s, np.float32).reshape(-1))
            rows = g.op("Cast", [g.op("Gather", [qi, ids], scope)], scope,
                        to=g.onnx.TensorProto.FLOAT)
            sc = g.op("Unsqueeze", [g.op("Gather", [si, ids], scope), g.ints("axis.-1", [-1])],
                      scope)
            self._record(key + " (gather)", "int8 rows · scale")
            return g.op("Mul", [rows, sc], scope)
        if codec.name == "int4" and codec.group_size in NBITS_BLOCKS:
            b, sc = self.int4_blocks(key, q, s, codec)
            n, nb = q.shape[0], q.shape[1] * 2 // codec.group_size
            sc2 = g.op("Reshape", [sc, g.ints(f"shape.{n}x{nb}", [n, nb])], scope)
            vals = self.decode_int4(g.op("Gather", [b, ids], scope),
                                    g.op("Gather", [sc2, ids], scope), codec.group_size, scope)
            self._record(key + " (gather)", f"int4 g{codec.group_size} rows decoded")
            return g.op("Reshape", [vals, g.ints("shape.bt-1", [0, 0, -1])], scope)
        if codec.name == "f16":
            w = g.const(f"{key}.f16rows", np.asarray(q, np.float16))
            self._record(key + " (gather)", "float16")
            return g.op("Cast", [g.op("Gather", [w, ids], scope)], scope,
                        to=g.onnx.TensorProto.FLOAT)
        w = np.asarray(q, np.float32) if codec.name == "f32" else \
            codec.dequantize(q, s).astype(np.float32)
        self._record(key + " (gather)", "float32" if codec.name == "f32" else
                     f"float32 (decoded from {codec.name}: no exact ONNX twin)")
        return g.op("Gather", [g.const(f"{key}.f32rows", w), ids], scope)


# ---------------------------------------------------------------------------------------------
# The forward pass


def _norm(g, x, w, b, cfg, scope):
    wn = g.const(f"{scope.strip('/').replace('/', '.')}.weight", w)
    if cfg.norm == "layer":
        bn = g.const(f"{scope.strip('/').replace('/', '.')}.bias", b)
        return g.op("LayerNormalization", [x, wn, bn], scope, axis=-1,
                    epsilon=float(cfg.norm_eps))
    ms = g.op("ReduceMean", [g.op("Mul", [x, x], scope), g.ints("axis.-1", [-1])], scope,
              keepdims=1)
    eps = g.const("norm_eps", np.array(cfg.norm_eps, np.float32))
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, eps], scope)], scope)], scope)
    return g.op("Mul", [g.op("Mul", [x, inv], scope), wn], scope)


def _rope(g, x, cos, sin, half, scope):
    """x [B, T, heads, hd] rotated (rotate_half); cos/sin [B, T, 1, hd/2]."""
    x1, x2 = g.op("Split", [x, g.ints(f"split.{half}", [half, half])], scope, outputs=2, axis=-1)
    y1 = g.op("Sub", [g.op("Mul", [x1, cos], scope), g.op("Mul", [x2, sin], scope)], scope)
    y2 = g.op("Add", [g.op("Mul", [x2, cos], scope), g.op("Mul", [x1, sin], scope)], scope)
    return g.op("Concat", [y1, y2], scope, axis=-1)


def _bias(g, y, m, name, i, scope):
    if m.has(name, i):
        return g.op("Add", [y, g.const(f"layers.{i}.{name}", m.vector(name, i))], scope)
    return y


def build(m, progress=False):
    """(ModelProto, report) for an edgellm model (export._Model)."""
    onnx = _onnx()
    h, TP = onnx.helper, onnx.TensorProto
    c = m.config
    g = _Graph(onnx)
    report = {"format": "onnx", "tensors": {}}
    W = _Weights(g, report)
    H, KVH, hd = c.n_heads, c.n_kv_heads, c.head_dim
    G = H // KVH

    inputs = [h.make_tensor_value_info("input_ids", TP.INT64, ["batch", "seq"]),
              h.make_tensor_value_info("attention_mask", TP.INT64, ["batch", "total"]),
              h.make_tensor_value_info("position_ids", TP.INT64, ["batch", "seq"])]
    outputs = [h.make_tensor_value_info("logits", TP.FLOAT, ["batch", "seq", c.vocab_size])]
    for i in range(c.n_layers):
        for kv in ("key", "value"):
            inputs.append(h.make_tensor_value_info(f"past_key_values.{i}.{kv}", TP.FLOAT,
                                                   ["batch", KVH, "past", hd]))
            outputs.append(h.make_tensor_value_info(f"present.{i}.{kv}", TP.FLOAT,
                                                    ["batch", KVH, "total", hd]))

    q, s, codec = m.matrix("tok_embeddings")
    x = W.embed("input_ids", "tok_embeddings", q, s, codec, "/model/embed_tokens",
                tied=c.tied_embeddings)
    emb = (q, s, codec)
    ax = g.ints("axis.-1", [-1])
    if c.positions == "learned":
        pos = m.dense("pos_embeddings")
        idx = g.op("Add", ["position_ids", g.ints("pos_offset", c.pos_offset)], "/model/pos")
        x = g.op("Add", [x, g.op("Gather", [g.const("pos_embeddings", pos), idx], "/model/pos")],
                 "/model/pos")
    else:
        cos, sin = rope_tables(hd, c.max_context, c.rope_theta, c.rope_scaling)
        ax2 = g.ints("axis.2", [2])
        cos_t = g.op("Unsqueeze", [g.op("Gather", [g.const("rope.cos", cos), "position_ids"],
                                        "/model/rope"), ax2], "/model/rope")
        sin_t = g.op("Unsqueeze", [g.op("Gather", [g.const("rope.sin", sin), "position_ids"],
                                        "/model/rope"), ax2], "/model/rope")

    # causal mask [B, 1, 1, T, S]: key j is seen by query t iff j <= past + t and mask[b, j]
    ids_shape = g.op("Shape", ["input_ids"], "/model/mask")
    T = g.op("Gather", [ids_shape, g.ints("i1", 1)], "/model/mask", axis=0)
    S = g.op("Gather", [g.op("Shape", ["attention_mask"], "/model/mask"), g.ints("i1", 1)],
             "/model/mask", axis=0)
    P = g.op("Sub", [S, T], "/model/mask")
    zero, one = g.ints("i0", 0), g.ints("i1", 1)
    qpos = g.op("Range", [P, S, one], "/model/mask")  # absolute positions of the queries
    kpos = g.op("Range", [zero, S, one], "/model/mask")
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [kpos, g.ints("axis.0", [0])], "/model/mask"),
                                  g.op("Unsqueeze", [qpos, ax], "/model/mask")], "/model/mask")
    am = g.op("Cast", ["attention_mask"], "/model/mask", to=TP.BOOL)
    am = g.op("Unsqueeze", [am, g.ints("axes.123", [1, 2, 3])], "/model/mask")  # [B,1,1,1,S]
    allowed = g.op("And", [causal, am], "/model/mask")  # [B, 1, 1, T, S]
    neg = g.const("mask.min", np.array(np.finfo(np.float32).min, np.float32))
    scale = g.const("attn.scale", np.array(1.0 / np.sqrt(hd), np.float32))

    from tqdm.auto import tqdm

    for i in tqdm(range(c.n_layers), desc="export", unit="layer", disable=not progress):
        L = f"/model/layers.{i}"
        norm_b = m.vector("attn_norm.bias", i) if c.norm == "layer" else None
        hN = _norm(g, x, m.vector("attn_norm.weight", i), norm_b, c, L + "/input_layernorm")
        proj = {}
        for name, hfn in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")):
            qq, ss, cc = m.matrix(name, i)
            y = W.linear(hN, f"layers.{i}.{name}", qq, ss, cc, f"{L}/self_attn/{hfn}")
            proj[name] = _bias(g, y, m, name + ".bias", i, f"{L}/self_attn/{hfn}")
        A = f"{L}/self_attn"
        qh = g.op("Reshape", [proj["attn_q"], g.ints("shape.q", [0, 0, H, hd])], A)
        kh = g.op("Reshape", [proj["attn_k"], g.ints("shape.kv", [0, 0, KVH, hd])], A)
        vh = g.op("Reshape", [proj["attn_v"], g.ints("shape.kv", [0, 0, KVH, hd])], A)
        if c.positions == "rope":
            qh = _rope(g, qh, cos_t, sin_t, hd // 2, A)
            kh = _rope(g, kh, cos_t, sin_t, hd // 2, A)
        qh = g.op("Transpose", [qh], A, perm=[0, 2, 1, 3])  # [B, H, T, hd]
        kh = g.op("Transpose", [kh], A, perm=[0, 2, 1, 3])  # [B, KVH, T, hd]
        vh = g.op("Transpose", [vh], A, perm=[0, 2, 1, 3])
        k_all = g.op("Concat", [f"past_key_values.{i}.key", kh], A,
                     outputs=[f"present.{i}.key"], axis=2)
        v_all = g.op("Concat", [f"past_key_values.{i}.value", vh], A,
                     outputs=[f"present.{i}.value"], axis=2)
        q5 = g.op("Reshape", [qh, g.ints("shape.q5", [0, KVH, G, -1, hd])], A)
        k5 = g.op("Unsqueeze", [k_all, g.ints("axis.2", [2])], A)  # [B, KVH, 1, S, hd]
        v5 = g.op("Unsqueeze", [v_all, g.ints("axis.2", [2])], A)
        kt = g.op("Transpose", [k5], A, perm=[0, 1, 2, 4, 3])
        scores = g.op("Mul", [g.op("MatMul", [q5, kt], A), scale], A)  # [B, KVH, G, T, S]
        scores = g.op("Where", [allowed, scores, neg], A)
        probs = g.op("Softmax", [scores], A, axis=-1)
        a = g.op("MatMul", [probs, v5], A)  # [B, KVH, G, T, hd]
        a = g.op("Reshape", [a, g.ints("shape.heads", [0, H, -1, hd])], A)
        a = g.op("Transpose", [a], A, perm=[0, 2, 1, 3])
        a = g.op("Reshape", [a, g.ints("shape.merge", [0, 0, H * hd])], A)
        qq, ss, cc = m.matrix("attn_o", i)
        o = W.linear(a, f"layers.{i}.attn_o", qq, ss, cc, f"{A}/o_proj")
        x = g.op("Add", [x, _bias(g, o, m, "attn_o.bias", i, f"{A}/o_proj")], L)

        norm_b = m.vector("ffn_norm.bias", i) if c.norm == "layer" else None
        hN = _norm(g, x, m.vector("ffn_norm.weight", i), norm_b, c,
                   L + "/post_attention_layernorm")
        F = f"{L}/mlp"
        qq, ss, cc = m.matrix("ffn_up", i)
        up = W.linear(hN, f"layers.{i}.ffn_up", qq, ss, cc, f"{F}/up_proj")
        if c.ffn_bias:
            perm = np.argsort(m.reader.array(m.chunk(i), "ffn_perm"))  # bias is in row order
            up = g.op("Add", [up, g.const(f"layers.{i}.ffn_up.bias",
                                          m.vector("ffn_up.bias", i)[perm])], F)
        if c.gated_ffn:
            qq, ss, cc = m.matrix("ffn_gate", i)
            gate = W.linear(hN, f"layers.{i}.ffn_gate", qq, ss, cc, f"{F}/gate_proj")
            act = _act(g, gate, c, F)
            u = g.op("Mul", [act, up], F)
        else:
            u = _act(g, up, c, F)
        qq, ss, cc = m.matrix("ffn_down", i)
        if m.down_is_matrix(i):
            y = W.linear(u, f"layers.{i}.ffn_down", qq, ss, cc, f"{F}/down_proj")
        else:
            y = W.linear_rows_in(u, f"layers.{i}.ffn_down", qq, ss, cc, f"{F}/down_proj")
        if c.ffn_bias:
            y = g.op("Add", [y, g.const(f"layers.{i}.ffn_down.bias",
                                        m.vector("ffn_down.bias", i))], F)
        x = g.op("Add", [x, y], L)

    hN = _norm(g, x, m.vector("norm.weight"), m.vector("norm.bias") if c.norm == "layer"
               else None, c, "/model/norm")
    if c.tied_embeddings:
        q, s, codec = emb
        key = "tok_embeddings"
    else:
        q, s, codec = m.matrix("output")
        key = "output"
    if c.tied_embeddings and W.tied_int8(codec, q):
        logits = W.head_int8(hN, key, q, s, "/lm_head")
    else:
        logits = W.linear(hN, key, q, s, codec, "/lm_head")
    g.op("Identity", [logits], "/lm_head", outputs=["logits"])
    graph = h.make_graph(g.nodes, "edgellm", inputs, outputs, list(g.inits.values()))
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET),
                                               h.make_opsetid("com.microsoft", 1)],
                         producer_name="edgellm")
    model.ir_version = 9  # onnxruntime 1.17+ reads IR 9 (opset 18)
    return model, report


def _act(g, x, c, scope):
    if c.activation == "relu":
        return g.op("Relu", [x], scope)
    return g.op("Mul", [x, g.op("Sigmoid", [x], scope)], scope)


# ---------------------------------------------------------------------------------------------


def export_onnx(model_dir, out, overwrite=False, progress=True, report=None):
    """Write model_dir as an ONNX directory out (model.onnx, model.onnx_data, config.json,
    tokenizer). Returns out."""
    onnx = _onnx()
    m = _Model(model_dir)
    try:
        cfg = hf_config(m.config)
    except ExportError as e:
        raise ExportError(f"{m.path}: cannot export to ONNX: {e}") from None
    if m.config.positions == "rope" and m.config.head_dim % 2:
        raise ExportError(f"{m.path}: cannot export to ONNX: odd head_dim with rotary positions")
    out = _check_destination(out, overwrite, is_dir=True)
    model, rep = build(m, progress)
    with _hf_directory(m, cfg, out) as tmp:
        onnx.save_model(model, os.path.join(tmp, "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="model.onnx_data",
                        size_threshold=1024)
        del model
    if report is not None:
        report.update(rep)
    if progress:
        kinds = sorted(set(rep["tensors"].values()))
        print("weights: " + "; ".join(kinds), file=sys.stderr)
    return out


class OnnxRunner:
    """An exported directory in onnxruntime, batch 1, keeping its own KV cache (present.* fed back
    as past_key_values.*). forward(ids) -> logits f32[T, V] for the new tokens.

    exact=True sets onnxruntime's `session.qdq_matmulnbits_accuracy_level` to 0: by default
    (level 4) its optimizer turns DequantizeLinear int8 + MatMul into an 8-bit MatMulNBits that
    also quantizes the activations to int8, which moves logits by ~1-2% of their range; level 0
    keeps float activations, so the graph computes what edgellm computes."""

    def __init__(self, path, threads=None, exact=True):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("running ONNX needs onnxruntime (pip install 'edgellm[onnx]')") \
                from None
        path = os.fspath(path)
        file = os.path.join(path, "model.onnx") if os.path.isdir(path) else path
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        if exact:
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        self.session = ort.InferenceSession(file, so, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past_inputs = {i.name: i.shape for i in self.session.get_inputs()
                            if i.name.startswith("past_key_values.")}
        self.reset()

    def reset(self):
        self.past = {n: np.zeros((1, s[1], 0, s[3]), np.float32)
                     for n, s in self.past_inputs.items()}
        self.pos = 0

    def forward(self, ids):
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        T = ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, self.pos + T), np.int64),
                 "position_ids": np.arange(self.pos, self.pos + T, dtype=np.int64)[None],
                 **self.past}
        res = dict(zip(self.outputs, self.session.run(None, feeds)))
        self.past = {n: res["present." + n[len("past_key_values."):]] for n in self.past}
        self.pos += T
        return res["logits"][0]

"""One layer-by-layer calibration pass over a source checkpoint, shared by every calibrated method
(GPTQ, AWQ, Wanda, SparseGPT, low-rank, layer dropping...).

The pass holds the hidden states of the calibration sequences (f32, N tokens in all, N bounded
by CalibOptions.tokens) and walks the layers in order. For each layer it hands the consumer a
`Layer`: the layer's float32 weights as the source holds them, and on demand the inputs of each
linear. The consumer may replace weights (quantized-then-dequantized, pruned, rescaled); when it
hands the layer back, the hidden states go through the layer *as transformed*, so later layers
calibrate on what the compressed earlier layers really produce (sequential, as GPTQ and SparseGPT
do). Peak RAM: the hidden states plus one layer's weights and activations.

    with layerwise.open_source(src) as (spec, source, tok):
        seqs = layerwise.sequences(tok, spec.config, text=None, tokens=8192, seq_len=256)
        walk = layerwise.Walk(source, spec, seqs)
        for layer in walk.layers():          # layer i; the pass resumes when the loop does
            X = layer.inputs("attn_q")       # f32 [N, d]: normed hidden states
            H = layer.hessian("attn_q")      # f64 [d, d]: X^T X / N
            layer.set("attn_q", new_w)       # f32 [q_dim, d]
        walk.hidden                          # list of f32 [T_k, d] after the last layer

Layer (all names canonical, as in docs/FORMAT.md §3.2; matrices [out, in] in Hugging Face
orientation, so ffn_down is [d_model, d_ff]):
    layer.index, layer.cfg (runtime ModelConfig), layer.n_tokens (N)
    layer.weights      dict name -> f32 array: attn_q/k/v/o, ffn_gate (gated only), ffn_up,
                       ffn_down, the norm weights/biases, and the biases the config has
    layer.inputs(name) f32 [N, in] input of the linear `name`, computed from the layer's weights
                       as they are now:
                         attn_q, attn_k, attn_v   Norm(x; attn_norm)
                         attn_o                   attention output, heads concatenated [N, q_dim]
                         ffn_gate, ffn_up         Norm(x + o; ffn_norm)
                         ffn_down                 act(gate) * up (gated) or act(up + b) [N, d_ff]
    layer.hessian(name)  f64 [in, in] = X^T X / N of those inputs (cached, shared by the linears
                       with the same input)
    layer.set(name, w, encoded=None)  replace a weight (same shape, f32). Inputs downstream of it
                       are recomputed on the next request (setting attn_q, then asking for
                       inputs("attn_o") gives the output of the quantized attention).
                       encoded: optional (codec, q, s) that w decodes from exactly, which the
                       converter then stores as is instead of encoding w again
                       (layer.encoded[name]).
    layer.drop(): skip the layer entirely (hidden states pass through unchanged; for layer
                  dropping), recorded in layer.dropped.
Sequences are run one at a time from position 0 with causal attention, like the runtime.
"""

import contextlib
import os
import tempfile

import numpy as np

from edgellm.runtime import kernels
from edgellm.runtime.kernels import reference
from edgellm.runtime.errors import ConvertError

MIN_TOKENS = 256  # fewer calibration tokens than this is refused (statistics would be noise)

# the stage (point in the layer) each linear reads its input at
INPUT_STAGE = {"attn_q": 0, "attn_k": 0, "attn_v": 0, "attn_o": 1,
               "ffn_gate": 2, "ffn_up": 2, "ffn_down": 3}
# the first stage whose value depends on each weight (setting it invalidates that and later ones)
_AFFECTS = {"attn_norm": 0, "attn_q": 1, "attn_k": 1, "attn_v": 1, "attn_o": 2, "ffn_norm": 2,
            "ffn_gate": 3, "ffn_up": 3, "ffn_down": 4}
LINEARS = tuple(INPUT_STAGE)


def _affects(name):
    base = name.split(".")[0]
    if base not in _AFFECTS:
        raise ConvertError(f"layerwise: unknown tensor {name!r}")
    return _AFFECTS[base]


# ---------------------------------------------------------------------------------------------
# Source, tokenizer and calibration sequences


def load_tokenizer(tok, cfg, path=None, data=None):
    """The runtime's Tokenizer for a manifest tokenizer entry `tok` ({kind, file, add_bos}) of
    a model with config cfg, from the file at `path` or its bytes `data` (a GGUF's)."""
    from edgellm.runtime.tokenizer import Tokenizer

    manifest = {"tokenizer": tok, "config": cfg.to_dict()}
    if path is not None:
        if os.path.basename(path) == tok["file"]:
            return Tokenizer.load(os.path.dirname(path), manifest)
        with open(path, "rb") as f:
            data = f.read()
    with tempfile.TemporaryDirectory() as tmp:  # the libraries read the file when loading
        with open(os.path.join(tmp, tok["file"]), "wb") as f:
            f.write(data)
        return Tokenizer.load(tmp, manifest)


@contextlib.contextmanager
def open_source(src):
    """(spec, source, tokenizer) of an HF directory or a GGUF file, as `edgellm convert` reads
    them; the tokenizer is the runtime's Tokenizer for the source's tokenizer."""
    from . import arch
    from . import convert as conv
    from .sources import gguf as gguf_source
    from .sources.hf import HFSource

    src = os.fspath(src)
    if gguf_source.is_gguf(src):
        with gguf_source.GGUFSource(src) as source:
            spec = source.spec()
            kind, file, data, add_bos, _ = source.tokenizer()
            tok = {"kind": kind, "file": file,
                   "add_bos": bool(add_bos and spec.config.bos_token_id is not None)}
            yield spec, source, load_tokenizer(tok, spec.config, data=data)
        return
    spec = arch.from_hf_dir(src)
    with HFSource(src, optional_prefixes=arch.OPTIONAL_PREFIXES) as source:
        tok, path, _ = conv.find_tokenizer(src, spec)
        yield spec, source, load_tokenizer(tok, spec.config, path=path)


def sequences(tokenizer, cfg, text=None, tokens=8192, seq_len=256):
    """Calibration token sequences (converters/calibrate.py's text and splitting): at most
    `tokens` in all, seq_len each (capped at the model's context). text: a UTF-8 file, None for
    the shipped calibration text. Raises ConvertError when the text gives fewer than
    min(tokens, MIN_TOKENS) tokens, or when tokens/seq_len are not sensible."""
    from . import calibrate

    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < MIN_TOKENS:
        raise ConvertError(f"calibration: tokens must be an integer >= {MIN_TOKENS}, "
                           f"got {tokens!r}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 8:
        raise ConvertError(f"calibration: seq_len must be an integer >= 8, got {seq_len!r}")
    path = os.fspath(text) if text is not None else calibrate.default_text()
    body = calibrate.read_text(path)
    seqs = calibrate.sequences(tokenizer, body, min(seq_len, cfg.max_context), tokens)
    n = sum(s.size for s in seqs)
    if n < MIN_TOKENS:
        raise ConvertError(f"{path}: the calibration text is too short ({n} tokens; calibrated "
                           f"methods need at least {MIN_TOKENS})")
    if any(s.max() >= cfg.vocab_size for s in seqs):
        raise ConvertError(f"{path}: the tokenizer gives ids beyond the model's vocabulary")
    return seqs


# ---------------------------------------------------------------------------------------------
# The pass


class Layer:
    """One layer of the pass (see the module docstring)."""

    def __init__(self, walk, index, weights):
        self.walk, self.index, self.cfg = walk, index, walk.cfg
        self.weights = weights
        self.encoded = {}  # name -> (codec, q, s) given to set()
        self.dropped = False
        self._stages = {}  # stage -> value (see _stage)
        self._hessians = {}

    @property
    def n_tokens(self):
        return self.walk.n_tokens

    def inputs(self, name):
        if name not in INPUT_STAGE or name not in self.weights:
            raise ConvertError(f"layerwise: layer {self.index} has no linear {name!r}")
        return self._stage(INPUT_STAGE[name])

    def hessian(self, name):
        st = INPUT_STAGE.get(name)
        if st not in self._hessians:
            X = self.inputs(name)
            H = np.zeros((X.shape[1], X.shape[1]), dtype=np.float64)
            for r0 in range(0, X.shape[0], 4096):  # f64 products, a block of tokens at a time
                xb = X[r0:r0 + 4096].astype(np.float64)
                H += xb.T @ xb
            self._hessians[st] = H / X.shape[0]
        return self._hessians[st]

    def set(self, name, w, encoded=None):
        if name not in self.weights:
            raise ConvertError(f"layerwise: layer {self.index} has no tensor {name!r}")
        w = np.ascontiguousarray(w, dtype=np.float32)
        if w.shape != self.weights[name].shape:
            raise ConvertError(f"layerwise: {name} must keep its shape "
                               f"{list(self.weights[name].shape)}, got {list(w.shape)}")
        self.weights[name] = w
        if encoded is not None:
            self.encoded[name] = encoded
        else:
            self.encoded.pop(name, None)
        first = _affects(name)
        for st in [s for s in self._stages if s >= first]:
            del self._stages[st]
        for st in [s for s in self._hessians if s >= first]:
            del self._hessians[st]

    def drop(self):
        self.dropped = True

    # -- stages: 0 attn input, 1 attention output, 2 FFN input (with the residual after
    # attention), 3 FFN activations, 4 the layer's output --------------------------------------

    def _stage(self, st):
        if st not in self._stages:
            self._stages[st] = self._compute(st)
        return self._stages[st][0] if st == 2 else self._stages[st]

    def _norm(self, x, name):
        w = self.weights[name + ".weight"]
        if self.cfg.norm == "layer":
            return kernels.layernorm(x, w, self.weights[name + ".bias"], self.cfg.norm_eps)
        return kernels.rmsnorm(x, w, self.cfg.norm_eps)

    def _linear(self, x, name):
        y = x @ self.weights[name].T
        b = self.weights.get(name + ".bias")
        return y + b if b is not None else y

    def _compute(self, st):
        cfg, W = self.cfg, self.weights
        if st == 0:
            return self._norm(self.walk.x, "attn_norm")
        if st == 1:
            h = self._stage(0)
            q, k, v = (self._linear(h, n) for n in ("attn_q", "attn_k", "attn_v"))
            out = np.empty((h.shape[0], cfg.q_dim), dtype=np.float32)
            for r0, r1 in self.walk.spans:
                T = r1 - r0
                qs = q[r0:r1].reshape(T, cfg.n_heads, cfg.head_dim)
                ks = k[r0:r1].reshape(T, cfg.n_kv_heads, cfg.head_dim)
                vs = v[r0:r1].reshape(T, cfg.n_kv_heads, cfg.head_dim)
                if cfg.positions == "rope":
                    pos = np.arange(T, dtype=np.int64)
                    qs = kernels.apply_rope(qs, self.walk.cos, self.walk.sin, pos)
                    ks = kernels.apply_rope(ks, self.walk.cos, self.walk.sin, pos)
                kc = np.ascontiguousarray(ks.transpose(1, 0, 2))  # the cache layout [KVH, T, hd]
                vc = np.ascontiguousarray(vs.transpose(1, 0, 2))
                out[r0:r1] = kernels.attention(qs, kc, vc, 0).reshape(T, cfg.q_dim)
            return out
        if st == 2:
            x = self.walk.x + self._linear(self._stage(1), "attn_o")
            return self._norm(x, "ffn_norm"), x
        if st == 3:
            h = self._stage(2)
            if cfg.gated_ffn:
                g = reference.activate(h @ W["ffn_gate"].T, cfg.activation)
                return (g * (h @ W["ffn_up"].T)).astype(np.float32)
            return reference.activate(self._linear(h, "ffn_up"),
                                              cfg.activation).astype(np.float32)
        if st == 4:
            self._stage(2)
            return self._stages[2][1] + self._linear(self._stage(3), "ffn_down")
        raise AssertionError(st)

    def output(self):
        """Hidden states f32 [N, d] after this layer (as transformed)."""
        if self.dropped:
            return self.walk.x
        return self._stage(4)


class Walk:
    """The pass over source `source` (converters/sources) described by `spec` (arch.Spec), on
    token sequences `seqs` (int arrays). Iterate layers() once."""

    def __init__(self, source, spec, seqs, progress=False):
        cfg = spec.config
        self.source, self.spec, self.cfg = source, spec, cfg
        self.progress = progress
        self.spans, n = [], 0
        for s in seqs:
            self.spans.append((n, n + s.size))
            n += s.size
        self.n_tokens = n
        ids = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
        names = spec.global_tensors()
        emb = source.read(names["tok_embeddings"])  # [V, d]; read whole once, then freed
        self.x = np.ascontiguousarray(emb[ids], dtype=np.float32)
        del emb
        if cfg.positions == "learned":
            pos = source.read(names["pos_embeddings"])
            for r0, r1 in self.spans:
                self.x[r0:r1] += pos[cfg.pos_offset + np.arange(r1 - r0)]
        else:
            longest = max(r1 - r0 for r0, r1 in self.spans)
            self.cos, self.sin = kernels.rope_tables(cfg.head_dim, longest, cfg.rope_theta,
                                                     cfg.rope_scaling)

    @property
    def hidden(self):
        """Hidden states per sequence, f32 [T_k, d] (after the layers walked so far)."""
        return [self.x[r0:r1] for r0, r1 in self.spans]

    def read_layer(self, i):
        """dict canonical name -> f32 array of layer i from the source."""
        return {c: np.ascontiguousarray(self.source.read(hf), dtype=np.float32)
                for c, hf in self.spec.layer_tensors(i).items()}

    def layers(self):
        """Yield each Layer in order; when the consumer asks for the next one, the hidden states
        go through the previous one as it was left."""
        from tqdm.auto import tqdm

        for i in tqdm(range(self.cfg.n_layers), desc="calibrate", unit="layer",
                      disable=not self.progress):
            layer = Layer(self, i, self.read_layer(i))
            yield layer
            self.x = np.ascontiguousarray(layer.output(), dtype=np.float32)
            layer._stages.clear()
            layer._hessians.clear()

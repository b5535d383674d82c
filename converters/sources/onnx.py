"""ONNX source: a causal-LM decoder exported to ONNX (torch.onnx.export, optimum) -> the
converter's Hugging Face checkpoint names.

What is read: the `.onnx` file (a path, or a directory holding model.onnx, decoder_model.onnx or
decoder_model_merged.onnx as optimum names them), with config.json and the tokenizer files next to
it, as optimum writes them. The config gives the architecture (converters/arch.py); the graph only
supplies the weights. The graph is parsed without its external data (onnx.load(...,
load_external_data=False)); each weight is read when the converter asks for it, by a positioned
read of its own byte range, so peak memory is one tensor, not the model.

Which initializer is which canonical tensor, in this order:
1. by name: an initializer named like the checkpoint tensor, possibly behind a prefix
   (`model.layers.0.input_layernorm.weight`, `m.model.norm.weight`) or without `model.` (a bare
   decoder), with the expected shape;
2. by node scope: torch names a Linear's MatMul `/model/layers.0/self_attn/q_proj/MatMul`, so
   an anonymous weight (`onnx::MatMul_123`) is still found through the node that uses it;
3. by tracing the graph, for whatever is left (e.g. a graph whose names were all stripped):
   the linears (MatMul or Gemm with a constant weight, possibly through Transpose, Cast or
   Identity) in graph order, grouped by the activation they read: per layer q/k/v (one input),
   o, then gate/up (one input) and down, or fc1 and fc2 (OPT), then the head. Roles inside a group
   come from what consumes the outputs: gate feeds the activation (Sigmoid, Relu, ...), up does
   not; v never reaches a Softmax before the next linear, q and k do, and q is the first input of
   the scores MatMul. Norm weights (and biases) are the 1-D constants multiplied (added) into
   each group's input; the embedding is the Gather reading the token ids.
MatMul computes x·W with W stored [in, out]: such weights are transposed to the checkpoint's
[out, in] when read (Gemm with transB=1 stores [out, in] already).

An If node (optimum's merged decoder: the model with and without past keys in its two branches)
is read through its then_branch. Anything missing is an error naming the .onnx file and the tensors not found, before anything is
written. Graphs that are already quantized (MatMulNBits, DequantizeLinear, MatMulInteger) are
refused: convert a floating-point export.
"""

import os

import numpy as np

from edgellm.runtime.errors import ConvertError

ONNX_NAMES = ("model.onnx", "decoder_model.onnx", "decoder_model_merged.onnx")
QUANTIZED_OPS = ("MatMulNBits", "DequantizeLinear", "MatMulInteger", "QLinearMatMul",
                 "DynamicQuantizeMatMul", "GatherBlockQuantized")
ACT_OPS = ("Sigmoid", "Relu", "Gelu", "FastGelu", "QuickGelu", "HardSigmoid", "Tanh", "Softplus",
           "Silu", "Swish")
PASS_OPS = ("Cast", "Identity")
# ONNX TensorProto data types we read, as (name, raw numpy dtype)
DTYPES = {1: ("FLOAT", np.float32), 10: ("FLOAT16", np.float16), 16: ("BFLOAT16", np.uint16),
          11: ("DOUBLE", np.float64)}


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ConvertError("reading ONNX needs the onnx package (pip install 'edgellm[onnx]')") \
            from None
    return onnx


def find_onnx(src):
    """The .onnx file src names (a file ending in .onnx, or a directory holding one of
    ONNX_NAMES and no safetensors weights), else None."""
    src = os.fspath(src)
    if os.path.isfile(src):
        return src if src.lower().endswith(".onnx") else None
    if os.path.isdir(src) and not any(os.path.isfile(os.path.join(src, f)) for f in
                                      ("model.safetensors", "model.safetensors.index.json")):
        for name in ONNX_NAMES:
            if os.path.isfile(os.path.join(src, name)):
                return os.path.join(src, name)
    return None


def _flatten(graph):
    """(nodes, initializers) of a graph, an If node replaced by its then_branch: optimum's merged
    decoder (decoder_model_merged.onnx) holds the model twice, with and without past keys, in the
    two branches of one If; either branch has every weight, the other would repeat them."""
    nodes, inits = [], list(graph.initializer)
    for n in graph.node:
        branch = next((a.g for a in n.attribute if a.name == "then_branch"), None) \
            if n.op_type == "If" else None
        if branch is None:
            nodes.append(n)
            continue
        sub_nodes, sub_inits = _flatten(branch)
        nodes += sub_nodes
        inits += sub_inits
    return nodes, inits


class ONNXSource:
    """An ONNX decoder seen through Hugging Face checkpoint names (the HFSource interface)."""

    def __init__(self, path, spec):
        self.path = os.path.abspath(os.fspath(path))
        self.dir = os.path.dirname(self.path)
        onnx = _onnx()
        try:
            model = onnx.load(self.path, load_external_data=False)
        except Exception as e:  # DecodeError, OSError ...
            raise ConvertError(f"{self.path}: cannot read ONNX ({type(e).__name__}: {e})") \
                from None
        g = model.graph
        nodes, inits = _flatten(g)
        quantized = sorted({n.op_type for n in nodes if n.op_type in QUANTIZED_OPS})
        if quantized:
            raise ConvertError(f"{self.path}: the graph is already quantized ({', '.join(quantized)}"
                               "); convert a floating-point export")
        self.inits = {t.name: t for t in inits}
        for n in nodes:  # constants folded into Constant nodes count as initializers
            if n.op_type == "Constant" and len(n.output) == 1:
                for a in n.attribute:
                    if a.name == "value" and a.t.dims:
                        self.inits.setdefault(n.output[0], a.t)
        self.nodes = nodes
        self.inputs = [i.name for i in g.input if i.name not in self.inits]
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.spec = spec
        self.map = {}  # hf name -> (initializer name, transposed)
        self.note = ""  # why tracing failed, for the error message
        self._map_all()
        self._cache = (None, None)
        self._files = {}

    # -- mapping ------------------------------------------------------------------------------

    def _needed(self):
        out = {}
        for c, hf in self.spec.global_tensors().items():
            out[hf] = c
        for i in range(self.spec.config.n_layers):
            for c, hf in self.spec.layer_tensors(i).items():
                out[hf] = c
        return out  # hf name -> canonical

    def _dims(self, name):
        return tuple(int(d) for d in self.inits[name].dims)

    def _map_all(self):
        needed = self._needed()
        shape = {hf: tuple(self.spec.shape(c)) for hf, c in needed.items()}
        # 1. by name (a prefix such as "m." or "model." before the checkpoint name is allowed)
        by_suffix = {}
        for name in self.inits:
            for hf in needed:
                if name == hf or name.endswith("." + hf) or hf == "model." + name:
                    by_suffix.setdefault(hf, []).append(name)
        for hf, names in by_suffix.items():
            fits = [(n, False) for n in names if self._dims(n) == shape[hf]]
            fits += [(n, True) for n in names if len(shape[hf]) == 2
                     and self._dims(n) == shape[hf][::-1] and shape[hf][0] != shape[hf][1]]
            if len(fits) == 1:
                self.map[hf] = fits[0]
        # 2. by node scope: /model/layers.0/self_attn/q_proj/MatMul
        for n in self.nodes:
            lin = self._linear(n)
            if lin is None or not n.name:
                continue
            scope = n.name.strip("/").replace("/", ".").rsplit(".", 1)[0] + ".weight"
            for hf in needed:
                if hf not in self.map and (scope == hf or scope.endswith("." + hf)) and \
                        self._oriented(lin[1], lin[2]) == shape[hf]:
                    self.map[hf] = lin[1:]
        # 3. by tracing the graph
        if any(hf not in self.map for hf in needed):
            for hf, v in self._trace().items():
                if hf in needed and hf not in self.map and v is not None:
                    self.map[hf] = v

    def _oriented(self, name, transposed):
        d = self._dims(name)
        return d[::-1] if transposed else d

    def _const(self, tensor):
        """(initializer name, transposed) behind a tensor through Transpose/Cast/Identity."""
        t = False
        for _ in range(8):
            if tensor in self.inits:
                return tensor, t
            n = self.producer.get(tensor)
            if n is None:
                return None
            if n.op_type == "Transpose":
                perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), [1, 0])
                if perm != [1, 0]:
                    return None
                t = not t
            elif n.op_type not in PASS_OPS:
                return None
            tensor = n.input[0]
        return None

    def _linear(self, n):
        """(activation input, initializer, transposed to [out, in]) of a MatMul/Gemm with a
        constant 2-D weight, else None."""
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2:
            return None
        c = self._const(n.input[1])
        if c is None or len(self._dims(c[0])) != 2 or self._const(n.input[0]) is not None:
            return None
        name, t = c
        if n.op_type == "Gemm":
            trans_b = next((a.i for a in n.attribute if a.name == "transB"), 0)
            return n.input[0], name, t == bool(trans_b)  # transB=1: stored [out, in]
        return n.input[0], name, not t  # MatMul: x·W, W stored [in, out]

    def _reach(self, tensor, limit=400):
        """Nodes reached forward from tensor, stopping at linears and at Shape/Size (metadata)."""
        seen, todo, out, ids = {tensor}, [tensor], [], set()
        while todo and len(out) < limit:
            t = todo.pop()
            for n in self.consumers.get(t, []):
                if id(n) in ids:
                    continue
                ids.add(id(n))
                out.append(n)
                if self._linear(n) is not None or n.op_type in ("Shape", "Size"):
                    continue
                for o in n.output:
                    if o not in seen:
                        seen.add(o)
                        todo.append(o)
        return out, seen

    def _vector_into(self, tensor, op, size):
        """The 1-D constant of `size` combined with tensor by a consumer of type op."""
        for n in self.consumers.get(tensor, []):
            if n.op_type == op:
                for i in n.input:
                    c = self._const(i)
                    if c is not None and self._dims(c[0]) == (size,):
                        return (c[0], False), n.output[0]
        return None, None

    def _norm_of(self, tensor):
        """(weight, bias) initializers of the norm whose output is tensor (RMSNorm as Mul by a
        vector, LayerNorm decomposed or as LayerNormalization / SimplifiedLayerNormalization)."""
        d = self.spec.config.d_model
        for _ in range(4):
            n = self.producer.get(tensor)
            if n is None:
                return None, None
            if n.op_type in PASS_OPS:
                tensor = n.input[0]
                continue
            if n.op_type in ("LayerNormalization", "SimplifiedLayerNormalization",
                             "SkipSimplifiedLayerNormalization", "SkipLayerNormalization"):
                k = 2 if n.op_type.startswith("Skip") else 1
                w = self._const(n.input[k])
                b = self._const(n.input[k + 1]) if len(n.input) > k + 1 and n.input[k + 1] \
                    else None
                return (w[0], False) if w else None, (b[0], False) if b else None
            consts = [self._const(i) for i in n.input]
            vec = [c for c in consts if c is not None and self._dims(c[0]) == (d,)]
            other = [i for i, c in zip(n.input, consts) if c is None]
            if n.op_type == "Mul" and vec:
                return (vec[0][0], False), None
            if n.op_type == "Add" and vec and other:
                w, _ = self._norm_of(other[0])
                return w, (vec[0][0], False)
            return None, None
        return None, None

    def _trace(self):
        """hf name -> (initializer, transposed) from the graph's structure (see the module
        docstring); entries it cannot decide are left out."""
        spec, cfg = self.spec, self.spec.config
        found = {}
        lins = [(n,) + self._linear(n) for n in self.nodes if self._linear(n) is not None]
        groups = []
        for lin in lins:
            if groups and groups[-1][0][1] == lin[1]:
                groups[-1].append(lin)
            else:
                groups.append([lin])
        # embedding (and learned positions): Gathers of a 2-D constant with d columns
        for n in self.nodes:
            if n.op_type == "Gather" and len(n.input) == 2:
                c = self._const(n.input[0])
                if c is None or len(self._dims(c[0])) != 2 or self._dims(c[0])[1] != cfg.d_model:
                    continue
                tok = n.input[1] in self.inputs or self._from_input(n.input[1])
                key = "tok" if tok and self._dims(c[0])[0] == cfg.vocab_size else "pos"
                found.setdefault(key, (c[0], False))
        names = dict(spec.global_tensors())
        if "tok" in found:
            found[names["tok_embeddings"]] = found.pop("tok")
        if "pos_embeddings" in names and "pos" in found:
            found[names["pos_embeddings"]] = found.pop("pos")
        per_layer = (3, 1, 2, 1) if cfg.gated_ffn else (3, 1, 1, 1)
        want = len(per_layer) * cfg.n_layers
        if len(groups) < want or [len(g) for g in groups[:want]] != \
                list(per_layer) * cfg.n_layers:
            self.note = (f" (tracing the graph: its {len(lins)} weight MatMul/Gemm nodes form "
                         f"{len(groups)} groups by input; {cfg.n_layers} layers need "
                         f"{want} groups of sizes {list(per_layer)} each, then the head)")
            return found  # cannot match the layers; the caller names what is missing
        for i in range(cfg.n_layers):
            names = spec.layer_tensors(i)
            qkv, o, up, down = groups[4 * i:4 * i + 4]
            roles = self._qkv_roles(qkv)
            if roles is None:
                continue
            ffn = self._gate_up(up) if cfg.gated_ffn else {"ffn_up": up[0]}
            if ffn is None:
                continue
            lin = dict(roles, attn_o=o[0], ffn_down=down[0], **ffn)
            for canonical, (node, _, init, t) in lin.items():
                found[names[canonical]] = (init, t)
                bias = canonical + ".bias" if canonical != "ffn_down" else "ffn_down.bias"
                if bias in names:
                    b = self._bias(node)
                    if b is not None:
                        found[names[bias]] = b
            for canonical, group in (("attn_norm", qkv), ("ffn_norm", up)):
                w, b = self._norm_of(group[0][1])
                if w is not None:
                    found[names[canonical + ".weight"]] = w
                if b is not None and canonical + ".bias" in names:
                    found[names[canonical + ".bias"]] = b
        names = spec.global_tensors()
        rest = groups[want:]
        if rest:
            head = rest[-1][0]
            w, b = self._norm_of(head[1])
            if w is not None:
                found[names["norm.weight"]] = w
            if b is not None and "norm.bias" in names:
                found[names["norm.bias"]] = b
            if "output" in names:
                found[names["output"]] = head[2:]
        return found

    def _from_input(self, tensor):
        for _ in range(6):
            if tensor in self.inputs:
                return True
            n = self.producer.get(tensor)
            if n is None or not n.input:
                return False
            tensor = n.input[0]
        return False

    def _bias(self, node):
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            c = self._const(node.input[2])
            return (c[0], False) if c else None
        n = self._dims_of_linear(node)
        b, _ = self._vector_into(node.output[0], "Add", n)
        return b

    def _dims_of_linear(self, node):
        _, init, t = self._linear(node)
        return self._oriented(init, t)[0]

    def _qkv_roles(self, group):
        """{"attn_q", "attn_k", "attn_v"} -> linear among the 3 of a group."""
        reach = {id(lin[0]): self._reach(lin[0].output[0]) for lin in group}
        soft = [lin for lin in group if any(n.op_type == "Softmax"
                                            for n in reach[id(lin[0])][0])]
        v = [lin for lin in group if lin not in soft]
        if len(soft) != 2 or len(v) != 1:
            return None
        a, b = soft
        # the scores MatMul: reached by both q and k, its first input from q
        b_nodes = {id(n) for n in reach[id(b[0])][0]}
        for n in reach[id(a[0])][0]:
            if n.op_type == "MatMul" and self._linear(n) is None and id(n) in b_nodes:
                if n.input[0] in reach[id(a[0])][1] and n.input[0] not in reach[id(b[0])][1]:
                    return {"attn_q": a, "attn_k": b, "attn_v": v[0]}
                if n.input[0] in reach[id(b[0])][1] and n.input[0] not in reach[id(a[0])][1]:
                    return {"attn_q": b, "attn_k": a, "attn_v": v[0]}
        return None

    def _gate_up(self, group):
        act = [lin for lin in group
               if any(n.op_type in ACT_OPS for n in self.consumers.get(lin[0].output[0], []))]
        if len(act) != 1:
            return None
        return {"ffn_gate": act[0], "ffn_up": next(lin for lin in group if lin is not act[0])}

    # -- HFSource interface --------------------------------------------------------------------

    def has(self, name):
        return name in self.map

    def info(self, name):
        if name not in self.map:
            raise ConvertError(f"{self.path}: no initializer found for {name} (not by name, node "
                               "scope or graph structure)")
        init, t = self.map[name]
        dt = DTYPES.get(self.inits[init].data_type, (f"type {self.inits[init].data_type}",))[0]
        return self.path, dt, self._oriented(init, t)

    def check(self, name, shape):
        if name not in self.map:
            missing = [hf for hf in self._needed() if hf not in self.map]
            raise ConvertError(
                f"{self.path}: cannot map the graph onto {self.spec.model_type} with "
                f"{self.spec.config.n_layers} layers (config.json): no initializer found for "
                f"{len(missing)} tensor(s): {', '.join(missing[:6])}"
                f"{' ...' if len(missing) > 6 else ''}{self.note}")
        file, dtype, have = self.info(name)
        init = self.map[name][0]
        if self.inits[init].data_type not in DTYPES:
            raise ConvertError(f"{file}: initializer {init} ({name}) has {dtype}; supported: "
                               f"{', '.join(v[0] for v in DTYPES.values())}")
        if tuple(have) != tuple(shape):
            raise ConvertError(f"{file}: initializer {init} ({name}) has shape {list(have)}, "
                               f"config.json implies {list(shape)}")
        if self.inits[init].data_location == _onnx().TensorProto.EXTERNAL:
            self._external(init)  # the byte range exists: checked before anything is written

    def dtypes(self):
        return sorted({DTYPES.get(self.inits[i].data_type, ("?",))[0]
                       for i, _ in self.map.values()})

    def read(self, name, rows=None):
        """float32 copy of a tensor in checkpoint layout ([out, in]), or rows [r0, r1). One
        tensor is cached (transposed weights are read whole, then served a block at a time)."""
        if self._cache[0] != name:
            self._cache = (None, None)
            init, t = self.map[name]
            w = self._array(init)
            self._cache = (name, np.ascontiguousarray(w.T) if t else w)
        w = self._cache[1]
        return w if rows is None else w[rows[0]:rows[1]]

    def _array(self, init):
        onnx = _onnx()
        t = self.inits[init]
        raw_dtype = DTYPES[t.data_type][1]
        shape = self._dims(init)
        if t.data_location == onnx.TensorProto.EXTERNAL:
            path, off, nbytes = self._external(init)
            if path not in self._files:
                self._files[path] = open(path, "rb", buffering=0)
            f = self._files[path]
            buf = np.empty(int(np.prod(shape, dtype=np.int64)), dtype=raw_dtype)
            view, done = memoryview(buf).cast("B"), 0
            f.seek(off)
            while done < nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise ConvertError(f"{path}: truncated while reading {init}")
                done += got
            a = buf.reshape(shape)
        else:
            from onnx import numpy_helper

            a = numpy_helper.to_array(t)
        if t.data_type == 16 and a.dtype == np.uint16:
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return np.ascontiguousarray(a, dtype=np.float32)

    def _external(self, init):
        """(file, offset, bytes) of an initializer's external data, checked to lie in a file
        inside the model's directory."""
        t = self.inits[init]
        raw_dtype = DTYPES[t.data_type][1]
        shape = self._dims(init)
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        path = os.path.realpath(os.path.join(self.dir, loc))
        if not loc or os.path.isabs(loc) or \
                os.path.commonpath([path, os.path.realpath(self.dir)]) != \
                os.path.realpath(self.dir):
            raise ConvertError(f"{self.path}: initializer {init}: external data location "
                               f"{loc!r} is not a file inside {self.dir}")
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = count * np.dtype(raw_dtype).itemsize
        off = int(info.get("offset", 0))
        if int(info.get("length", nbytes)) != nbytes:
            raise ConvertError(f"{path}: initializer {init}: {info.get('length')} bytes, "
                               f"its shape needs {nbytes}")
        if not os.path.isfile(path) or os.path.getsize(path) < off + nbytes:
            raise ConvertError(f"{path}: external data of {init} missing or truncated")
        return path, off, nbytes

    def close(self):
        self._cache = (None, None)
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

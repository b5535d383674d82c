"""Prefill and decode speed of edgellm against llama.cpp on the same TinyLlama-1.1B-shaped model
(a script, not a test; timings are never asserted).

What it does (everything is cached in --workdir, so a rerun only measures):
1. writes a TinyLlama-1.1B-shaped Hugging Face checkpoint with random, fan-in scaled weights
   (d_model 2048, 22 layers, 32 heads, 4 kv heads, d_ff 5632, vocab 32000, SiLU gated, untied
   head; f16 safetensors, written one tensor at a time, ~2.2 GB);
2. converts it with edgellm at f16, int8 and int4 (group 32);
3. writes the same weights as GGUF files (gguf package) at F16, Q8_0 and Q4_0, with Q and K
   permuted to llama.cpp's rotary convention (as convert_hf_to_gguf.py does), and checks once per
   pair that both engines compute the same model: top-1 agreement over the prompt's positions
   and over 16 greedy tokens (teacher-forced), and the correlation of the last logits;
4. measures both engines side by side in one process with the same threads: prefill tokens/s
   on a 128-token prompt, decode tokens/s over 64 greedy tokens (median of --repeats), the
   machine's copy bandwidth, and the memory-bandwidth bound bandwidth / (weight bytes read per
   token: every matrix except the gathered token embedding, head included);
5. prints a table and JSON (--json FILE too).

    python benchmarks/decode.py                            # f16/F16, int8/Q8_0, int4/Q4_0
    python benchmarks/decode.py --repeats 3 --json decode.json
    python benchmarks/decode.py --encodings int4 --repeats 1

Disk: the work dir holds about 10 GB (checkpoint 2.2, GGUF 2.2 + 1.2 + 0.6, edgellm 2.2 + 1.2 +
0.6). Needs llama-cpp-python (the [bench] extra) and gguf ([convert]).
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import time


def _threads_from_argv(default=2):
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return str(default)


# BLAS (edgellm's prefill) reads these at import: set them before NumPy is imported.
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, _threads_from_argv())

import numpy as np  # noqa: E402

_USER_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")  # before edgellm sets its default

# The timed runs happen in child processes, one engine each (see timed_in_child): both load an
# OpenMP runtime (libgomp) whose wait policy is fixed by whoever starts it first. edgellm asks for
# PASSIVE (its threads share 2 cores with OpenBLAS's); llama.cpp runs best with its default
# spinning. In one process one of them loses: measured 64 -> 11 prefill tokens/s for edgellm int4
# when llama_cpp started libgomp first, and 50 -> 31 decode tokens/s for llama.cpp Q4_0 the other
# way round.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from engines import Edge, Llama  # noqa: E402  (after the thread environment above)

SHAPE = dict(d=2048, layers=22, heads=32, kv=4, head_dim=64, d_ff=5632, vocab=32000,
             theta=10000.0, max_pos=2048, eps=1e-5)
SEED = 0
HF_NAME = "hf-tinyllama-shape-f16-seed0"
PAIRS = {"f16": "F16", "int8": "Q8_0", "int4": "Q4_0"}  # edgellm encoding -> GGUF type
GROUP = 32


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# 1. The Hugging Face checkpoint


def hf_tensors(s=SHAPE):
    """[(HF name, shape, kind)] in file order; kind: 'norm' | 'embed' | 'matrix'."""
    d, f, V = s["d"], s["d_ff"], s["vocab"]
    qd, kvd = s["heads"] * s["head_dim"], s["kv"] * s["head_dim"]
    out = [("model.embed_tokens.weight", (V, d), "embed")]
    for i in range(s["layers"]):
        L = f"model.layers.{i}."
        out += [(L + "input_layernorm.weight", (d,), "norm"),
                (L + "self_attn.q_proj.weight", (qd, d), "matrix"),
                (L + "self_attn.k_proj.weight", (kvd, d), "matrix"),
                (L + "self_attn.v_proj.weight", (kvd, d), "matrix"),
                (L + "self_attn.o_proj.weight", (d, qd), "matrix"),
                (L + "post_attention_layernorm.weight", (d,), "norm"),
                (L + "mlp.gate_proj.weight", (f, d), "matrix"),
                (L + "mlp.up_proj.weight", (f, d), "matrix"),
                (L + "mlp.down_proj.weight", (d, f), "matrix")]
    out += [("model.norm.weight", (d,), "norm"), ("lm_head.weight", (V, d), "embed")]
    return out


def random_tensor(index, shape, kind):
    """Deterministic weights, fan-in scaled so activations stay O(1) (as tests/tiny.py does):
    matrices N(0, 1/fan_in), embedding and head twice that scale (logits ~N(0, 4)), norms
    1 + 0.1 N(0, 1)."""
    rng = np.random.default_rng([SEED, index])
    x = rng.standard_normal(shape, dtype=np.float32)
    if kind == "norm":
        return 1.0 + 0.1 * x
    x *= (2.0 if kind == "embed" else 1.0) / np.sqrt(shape[-1])
    return x


def hf_config(s=SHAPE):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": s["d"], "intermediate_size": s["d_ff"],
            "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv"], "head_dim": s["head_dim"], "hidden_act": "silu",
            "rms_norm_eps": s["eps"], "vocab_size": s["vocab"],
            "max_position_embeddings": s["max_pos"], "rope_theta": s["theta"],
            "rope_scaling": None, "tie_word_embeddings": False, "attention_bias": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
            "transformers_version": "4.46.0", "use_cache": True}


def build_checkpoint(workdir):
    """The HF checkpoint (cached): f16 safetensors written one tensor at a time."""
    path = os.path.join(workdir, HF_NAME)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    sys.path.insert(0, REPO)
    from tests import tiny  # sentencepiece tokenizer and safetensors header helpers

    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    t0 = time.perf_counter()
    tensors = hf_tensors()
    header, _ = tiny.safetensors_header([(n, "F16", shape) for n, shape, _ in tensors])
    with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
        f.write(header)
        for i, (name, shape, kind) in enumerate(tensors):
            f.write(random_tensor(i, shape, kind).astype(np.float16).tobytes())
    # The converter needs a tokenizer; the benchmark feeds token ids, so a small sentencepiece
    # model (320 pieces, unk 0, bos 1, eos 2) serves: the model's vocabulary is 32000 ids.
    with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
        f.write(tiny.sentencepiece_model())
    _write_json(os.path.join(tmp, "tokenizer_config.json"),
                {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>",
                 "unk_token": "<unk>", "model_max_length": SHAPE["max_pos"]})
    _write_json(os.path.join(tmp, "config.json"), hf_config())
    os.rename(tmp, path)
    log(f"checkpoint: {path} ({_du(path) / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)")
    return path


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


def _du(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


# ---------------------------------------------------------------------------------------------
# 2. edgellm conversions


def converted(workdir, hf, enc, ffn_down="bundle"):
    dst = os.path.join(workdir, f"edgellm-{enc}" + (f"-g{GROUP}" if enc == "int4" else "")
                       + ("-down" if ffn_down == "matrix" else ""))
    if os.path.isfile(os.path.join(dst, "manifest.json")):
        return dst
    from edgellm.converters.convert import convert

    t0 = time.perf_counter()
    convert(hf, dst, quant=enc, group_size=GROUP, progress=True, ffn_down=ffn_down)
    log(f"converted {enc}: {dst} ({_du(dst) / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)")
    return dst


# ---------------------------------------------------------------------------------------------
# 3. GGUF files


def permute(w, n_head, n_head_kv=None):
    """llama.cpp's rotary layout for Q and K (convert_hf_to_gguf.py, LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_tensors(s=SHAPE):
    """[(GGUF name, HF name, permute heads or None)] in llama.cpp's order."""
    out = [("token_embd.weight", "model.embed_tokens.weight", None)]
    for i in range(s["layers"]):
        L, B = f"model.layers.{i}.", f"blk.{i}."
        out += [(B + "attn_norm.weight", L + "input_layernorm.weight", None),
                (B + "attn_q.weight", L + "self_attn.q_proj.weight", (s["heads"], s["heads"])),
                (B + "attn_k.weight", L + "self_attn.k_proj.weight", (s["heads"], s["kv"])),
                (B + "attn_v.weight", L + "self_attn.v_proj.weight", None),
                (B + "attn_output.weight", L + "self_attn.o_proj.weight", None),
                (B + "ffn_norm.weight", L + "post_attention_layernorm.weight", None),
                (B + "ffn_gate.weight", L + "mlp.gate_proj.weight", None),
                (B + "ffn_up.weight", L + "mlp.up_proj.weight", None),
                (B + "ffn_down.weight", L + "mlp.down_proj.weight", None)]
    out += [("output_norm.weight", "model.norm.weight", None),
            ("output.weight", "lm_head.weight", None)]
    return out


def _gguf_type(qname, ndim):
    import gguf

    return gguf.GGMLQuantizationType.F32 if ndim == 1 else gguf.GGMLQuantizationType[qname]


def _gguf_nbytes(qtype, shape):
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _encode_gguf(x, qtype):
    """float32 [n, d] (or [d]) -> the array GGUFWriter writes, quantized a block of rows at a
    time (gguf.quants' NumPy quantizer needs several times the input in temporaries)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(x, dtype=np.float16)
    step = 2048
    return np.concatenate([gguf.quants.quantize(x[r:r + step], qtype)
                           for r in range(0, x.shape[0], step)])


def write_gguf(workdir, hf, qname):
    """The checkpoint's weights as a llama.cpp GGUF (cached), one tensor in memory at a time."""
    path = os.path.join(workdir, f"tinyllama-shape-{qname}.gguf")
    if os.path.isfile(path):
        return path
    import gguf
    from safetensors import safe_open

    s, Q = SHAPE, gguf.GGMLQuantizationType
    t0 = time.perf_counter()
    tmp = path + ".tmp"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("tinyllama-shape-random")
    w.add_context_length(s["max_pos"])
    w.add_embedding_length(s["d"])
    w.add_block_count(s["layers"])
    w.add_feed_forward_length(s["d_ff"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv"])
    w.add_rope_dimension_count(s["head_dim"])
    w.add_rope_freq_base(s["theta"])
    w.add_layer_norm_rms_eps(s["eps"])
    w.add_vocab_size(s["vocab"])
    w.add_file_type({"F16": gguf.LlamaFileType.MOSTLY_F16,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qname])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # A dummy sentencepiece-style vocabulary: unk, bos, eos, the 256 byte pieces, then filler.
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    tokens += [f"\u2581t{i}" for i in range(len(tokens), s["vocab"])]
    types += [T.NORMAL] * (s["vocab"] - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(s["vocab"])])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    shapes = dict((n, shape) for n, shape, _ in hf_tensors())
    plan = gguf_tensors()
    for name, hf_name, _ in plan:
        shape = shapes[hf_name]
        qtype = _gguf_type(qname, len(shape))
        nbytes = _gguf_nbytes(qtype, shape)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor_info(name, shape, np.float32 if qtype == Q.F32 else np.float16, nbytes)
        else:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            byte_shape = (*shape[:-1], shape[-1] // block * size)
            w.add_tensor_info(name, byte_shape, np.uint8, nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    with safe_open(os.path.join(hf, "model.safetensors"), framework="numpy") as f:
        for name, hf_name, heads in plan:
            x = f.get_tensor(hf_name).astype(np.float32)
            if heads is not None:
                x = permute(x, *heads)
            w.write_tensor_data(_encode_gguf(x, _gguf_type(qname, x.ndim)))
            del x
    w.close()
    os.rename(tmp, path)
    log(f"gguf {qname}: {path} ({_du(path) / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)")
    return path


def gguf_matrix_bytes(path):
    """Weight bytes llama.cpp reads per token: every 2-D tensor but the token embedding."""
    import gguf

    r = gguf.GGUFReader(path)
    return sum(int(t.n_bytes) for t in r.tensors
               if len(t.shape) == 2 and t.name != "token_embd.weight")


def edgellm_part_bytes(rt):
    """Weight bytes edgellm reads per token by part: attention matrices, FFN (bundles with their
    scales and padding, and the down matrix when it is one) and the head; not the token
    embedding (one row is gathered)."""
    n = {"attention": 0, "ffn": 0, "head": rt.head.nbytes}
    for L in rt.layers:
        n["attention"] += L.q.nbytes + L.k.nbytes + L.v.nbytes + L.o.nbytes
        n["ffn"] += L.ffn.bundles.nbytes
        if L.ffn.down is not None:  # the down projection as a matrix, outside the bundles
            n["ffn"] += L.ffn.down.nbytes
    return n


def kernel_part_bytes(rt):
    """Weight bytes per token read by each matrix kernel of kernel_parts."""
    n = {"qkv": 0, "o": 0, "ffn": 0, "head": rt.head.nbytes}
    for L in rt.layers:
        n["qkv"] += L.q.nbytes + L.k.nbytes + L.v.nbytes
        n["o"] += L.o.nbytes
        n["ffn"] += L.ffn.bundles.nbytes + (L.ffn.down.nbytes if L.ffn.down is not None else 0)
    return n


def edgellm_matrix_bytes(rt):
    return sum(edgellm_part_bytes(rt).values())


# ---------------------------------------------------------------------------------------------
# 4. Measurements


def copy_bandwidth(mb=1024, repeats=7):
    """A large NumPy copy (one thread), median of repeats, counted as STREAM does: bytes read
    plus bytes written (2 x the array) per second."""
    src = np.ones(mb << 18, dtype=np.float32)
    dst = np.empty_like(src)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        ts.append(time.perf_counter() - t0)
    return 2 * src.nbytes / statistics.median(ts)


def read_bandwidth(mb=1024, repeats=7):
    """Bytes read per second by a parallel Numba sum over a large float32 array (all threads),
    median of repeats: what a decode step does with its weights."""
    import numba

    @numba.njit(parallel=True, fastmath=True, cache=False)
    def total(a):
        s = np.float32(0)
        for i in numba.prange(a.size):
            s += a[i]
        return s

    a = np.ones(mb << 18, dtype=np.float32)
    total(a)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        total(a)
        ts.append(time.perf_counter() - t0)
    return a.nbytes / statistics.median(ts)


def run_once(engine, prompt, n_decode, clock=time.perf_counter):
    """(prefill seconds, decode seconds, generated ids) for one greedy run."""
    t0 = clock()
    logits = engine.prefill(prompt)
    t1 = clock()
    out = [int(np.argmax(logits))]
    for _ in range(n_decode):
        out.append(int(np.argmax(engine.step(out[-1]))))
    t2 = clock()
    return t1 - t0, t2 - t1, out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class _CPUTime:
    """Stands for the `time` module inside runtime/model.py so that its part timer reads this
    process's CPU time (--clock cpu: on a shared machine, the work of this process only)."""

    def __getattr__(self, name):
        return time.process_time if name == "perf_counter" else getattr(time, name)


def decode_parts(edge, prompt, n, clock_name):
    """edgellm's decode time per token by part (embed, attention, ffn, head, other) on the
    per-operation path (the fused call times a layer as one part; bit for bit the same logits),
    on the benchmark's clock."""
    from edgellm.runtime import model as rt_model

    clock = CLOCKS[clock_name]
    saved = rt_model.time
    if clock_name == "cpu":
        rt_model.time = _CPUTime()
    try:
        rt = edge.rt
        rt.reset()
        tok = int(np.argmax(rt.forward(prompt)[-1]))
        rt.timer.parts = {}
        rt.fused = False
        t0 = clock()
        for _ in range(n):
            tok = int(np.argmax(rt.forward([tok])[-1]))
        wall = (clock() - t0) / n
        rt.fused = True
    finally:
        rt_model.time = saved
    parts = {k: v / n for k, v in rt.timer.parts.items()}
    parts["other"] = wall - sum(parts.values())
    return parts


def kernel_parts(edge, prompt, n, clock_name):
    """The fused path's time per token split by kernel: the whole token as decode runs it (one
    decode_layer call per layer, then the head), and the matrix kernels of every layer alone, in
    layer order, on the model's own weights: q/k/v (one matvec3), o (matvec1), the FFN
    (ffn_call: gate/up rows and the down matrix). "layer rest" is the fused layers' time minus
    those: norms, rope, the KV-cache store, attention over the cache, per-call costs. (The
    per-operation parts of decode_parts add Python per operation to "attention".)"""
    from edgellm.runtime import model as rt_model
    from edgellm.runtime.kernels import fused, qmatvec
    from edgellm.runtime.kernels.halfs import F16_TO_F32 as lut

    clock = CLOCKS[clock_name]
    saved = rt_model.time
    if clock_name == "cpu":
        rt_model.time = _CPUTime()
    rt = edge.rt
    try:
        rt.reset()
        tok = int(np.argmax(rt.forward(prompt)[-1]))
        rt.timer.parts = {}
        t0 = clock()
        for _ in range(n):
            tok = int(np.argmax(rt.forward([tok])[-1]))
        token = (clock() - t0) / n
        timed = {k: v / n for k, v in rt.timer.parts.items()}
    finally:
        rt_model.time = saved
    plans = rt._fused_layers()
    if plans is None or any(p is None for p in plans):
        return None
    M = fused
    sc = fused.Scratch(rt.cfg)
    nq = rt.cfg.n_heads * rt.cfg.head_dim
    nk = rt.cfg.n_kv_heads * rt.cfg.head_dim
    h = np.random.default_rng(0).standard_normal(rt.cfg.d_model).astype(np.float32)
    att = np.random.default_rng(1).standard_normal(nq).astype(np.float32)
    q, k, v = sc.qkv[:nq], sc.qkv[nq:nq + nk], sc.qkv[nq + nk:]

    def qkv(meta, a):
        qmatvec.matvec3(meta[M.M_QENC], meta[M.M_QSHIFT], meta[M.M_QROW], meta[M.M_QSROW],
                        a["wq"], a["sq"], a["wk"], a["sk"], a["wv"], a["sv"], h, lut, q, k, v,
                        meta[M.M_FAST] != 0)

    def o(meta, a):
        fused.matvec1(meta[M.M_OENC], meta[M.M_OSHIFT], meta[M.M_OROW], meta[M.M_OSROW],
                      a["wo"], a["so"], att, lut, sc.obuf, meta[M.M_FAST] != 0)

    def ffn(meta, a):
        fused.ffn_call(h, meta, a, sc.partial(a["n"]), sc.hidden(a["n"]))

    out = {}
    for name, f in (("qkv", qkv), ("o", o), ("ffn", ffn)):
        for meta, a in plans:  # warm up
            f(meta, a)
        ts = []
        for _ in range(3):
            t0 = clock()
            for meta, a in plans:
                f(meta, a)
            ts.append(clock() - t0)
        out[name] = statistics.median(ts)
    out["layer rest"] = timed.get("layer", 0.0) - out["qkv"] - out["o"] - out["ffn"]
    out["head"] = timed.get("head", 0.0)
    out["other"] = token - sum(out.values())
    return out


def equivalence(edge, llama_path, prompt, n_ctx, threads, n_check, reference=None):
    """Do both engines compute the same model? Top-1 agreement over the prompt's positions and
    over n_check greedy tokens of edgellm (teacher-forced in llama.cpp), free-running greedy
    agreement, and the correlation and largest difference of the last position's logits.
    reference: f32 logits [len(prompt), V] of the unquantized model (edgellm f16), to say how
    far each engine's quantization moves it (random weights have many near-ties)."""
    ref = Llama(llama_path, n_ctx, threads, logits_all=True)
    try:
        _, _, gen = run_once(edge, prompt, n_check - 1)  # edgellm's greedy tokens
        seq = list(prompt) + gen[:-1]
        le = edge.all_logits(seq)
        ll = ref.all_logits(seq)
        P = len(prompt)
        top_e, top_l = le.argmax(1), ll.argmax(1)
        a, b = le[P - 1], ll[P - 1]
        # llama.cpp's own free-running greedy tokens
        _, _, gen_l = run_once(ref, prompt, n_check - 1)
    finally:
        ref.close()
    return {
        "prompt_top1_agreement": float(np.mean(top_e[:P] == top_l[:P])),
        "greedy_top1_agreement_teacher_forced": float(np.mean(top_l[P - 1:] == np.array(gen))),
        "greedy_tokens_equal_free_running": int(sum(x == y for x, y in zip(gen, gen_l))),
        "greedy_tokens": n_check,
        "last_logits_corr": float(np.corrcoef(a, b)[0, 1]),
        "last_logits_max_abs_diff": float(np.abs(a - b).max()),
        "last_logits_std": float(b.std()),
    } | ({} if reference is None else {
        "edgellm_vs_f16_prompt_top1": float(np.mean(top_e[:P] == reference.argmax(1))),
        "llama_vs_f16_prompt_top1": float(np.mean(top_l[:P] == reference.argmax(1))),
        "edgellm_vs_f16_last_corr": float(np.corrcoef(a, reference[-1])[0, 1]),
        "llama_vs_f16_last_corr": float(np.corrcoef(b, reference[-1])[0, 1]),
    })


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def make_prompt(n):
    rng = np.random.default_rng(1)
    return [1] + rng.integers(3, SHAPE["vocab"], size=n - 1).tolist()


def timed_in_child(engine, path, args, parts=False):
    """One timed run (after warm-up) of one engine in a fresh process: (prefill s, decode s, ids,
    edgellm's decode time by part when parts, how edgellm held its weights or None)."""
    import subprocess

    cmd = [sys.executable, os.path.abspath(__file__), "--child", engine, path,
           "--threads", str(args.threads), "--n-ctx", str(args.n_ctx),
           "--prompt", str(args.prompt), "--decode", str(args.decode), "--clock", args.clock]
    if parts:
        cmd.append("--parts")
    env = dict(os.environ)  # each engine with its own OpenMP default unless the user set one
    env.pop("OMP_WAIT_POLICY", None)
    if _USER_WAIT_POLICY is not None:
        env["OMP_WAIT_POLICY"] = _USER_WAIT_POLICY
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"child {engine} failed:\n{r.stderr[-2000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return (out["prefill_s"], out["decode_s"], out["tokens"],
            (out.get("parts"), out.get("kernel_parts")) if parts else None, out.get("weights"))


class EdgeMapped(Edge):
    """edgellm with its chunks mapped from the files (edgellm.load(mmap=True)), whatever the
    default load chooses: page cache with 4 KB pages, where chunks read into memory (the
    default when the model fits, as llama.cpp holds its repacked Q4_0 weights in a buffer of its
    own: CPU_REPACK, q4_0_8x8, in its log) are anonymous memory with 2 MB pages."""
    name = "edgellm-map"

    def __init__(self, path, n_ctx, threads):
        import edgellm

        self.model = edgellm.load(path, n_ctx=n_ctx, threads=threads, mmap=True)
        self.rt = self.model.runtime


def child(args):
    engine, path = args.child
    prompt = make_prompt(args.prompt)
    if engine in ("edgellm", "edgellm-map"):
        # edgellm.load sets the threads; starting Numba's pool before edgellm is imported would
        # start OpenMP with its spinning default (prefill measured 6x slower that way)
        e = Edge(path, args.n_ctx, args.threads) if engine == "edgellm" else EdgeMapped(
            path, args.n_ctx, args.threads)
    else:
        e = Llama(path, args.n_ctx, args.threads)
    run_once(e, prompt[:16], 2)  # compile or load kernels, touch pages
    run_once(e, prompt, 2)
    tp, td, out = run_once(e, prompt, args.decode, CLOCKS[args.clock])
    parts = kparts = None
    if args.parts and engine == "edgellm":
        parts = decode_parts(e, prompt, args.decode, args.clock)
        kparts = kernel_parts(e, prompt, args.decode, args.clock)
    weights = getattr(getattr(e, "model", None), "weights", None)  # edgellm's load choice
    print(json.dumps({"prefill_s": tp, "decode_s": td, "tokens": out, "parts": parts,
                      "kernel_parts": kparts, "weights": weights}))
    return 0


def bench_pair(enc, edge_path, gguf_path, args, prompt, reference=None):
    qname = PAIRS[enc]
    log(f"--- {enc} / {qname}")
    edge = Edge(edge_path, args.n_ctx, args.threads)
    t0 = time.perf_counter()
    run_once(edge, prompt[:16], 2)  # compile (or load the cached) Numba kernels, touch pages
    run_once(edge, prompt, 2)
    log(f"edgellm warm-up {time.perf_counter() - t0:.1f} s")
    eq = None
    if args.check_tokens:
        eq = equivalence(edge, gguf_path, prompt, args.n_ctx, args.threads, args.check_tokens,
                         None if enc == "f16" else reference)
        log("equivalence:", json.dumps(eq))
    engines = (("edgellm", edge_path), ("llama.cpp", gguf_path))
    if args.mapped:
        engines += (("edgellm-map", edge_path),)
    res = {name: {"prefill_s": [], "decode_s": []} for name, _ in engines}
    parts = kparts = None
    for r in range(args.repeats):
        for name, path in engines:  # alternate, so that noise from other users hits both
            tp, td, out, p, w = timed_in_child(name, path, args,
                                               parts=r == 0 and name == "edgellm")
            if p is not None:
                parts, kparts = p
            if w is not None and r == 0:
                log(f"  {name} weights: {w['load']} ({w['why']})")
                res[name]["weights"] = w
            res[name]["prefill_s"].append(tp)
            res[name]["decode_s"].append(td)
            res[name]["tokens"] = out
            log(f"  repeat {r + 1} {name:9s} prefill {len(prompt) / tp:7.1f} tok/s  "
                f"decode {args.decode / td:6.2f} tok/s")
    # Prefill time per part: one more edgellm run in this process (decode's parts come from the
    # first edgellm child, on the benchmark's clock)
    edge.rt.reset()
    edge.rt.timer.parts = {}
    t0 = time.perf_counter()
    edge.rt.forward(prompt)
    wall = time.perf_counter() - t0
    prefill_parts = dict(edge.rt.timer.parts)
    prefill_parts["other"] = wall - sum(prefill_parts.values())

    out = {"encoding": enc, "gguf_type": qname, "edgellm_dir": edge_path, "gguf": gguf_path,
           "equivalence": eq, "edgellm_decode_parts_s_per_token": parts,
           "edgellm_kernel_parts_s_per_token": kparts,
           "edgellm_kernel_part_bytes_per_token": kernel_part_bytes(edge.rt),
           "edgellm_prefill_parts_s": prefill_parts,
           "edgellm_bytes_per_token": edgellm_matrix_bytes(edge.rt),
           "edgellm_part_bytes_per_token": edgellm_part_bytes(edge.rt),
           "llama_bytes_per_token": gguf_matrix_bytes(gguf_path),
           "same_tokens_last_run": res["edgellm"]["tokens"] == res["llama.cpp"]["tokens"],
           "common_prefix_last_run": _common_prefix(res["edgellm"]["tokens"],
                                                    res["llama.cpp"]["tokens"])}
    for name, r in res.items():
        key = {"edgellm": "edgellm", "edgellm-map": "edgellm_map"}.get(name, "llama")
        out[key] = {"prefill_tok_s": len(prompt) / statistics.median(r["prefill_s"]),
                    "decode_tok_s": args.decode / statistics.median(r["decode_s"]),
                    "best_prefill_tok_s": len(prompt) / min(r["prefill_s"]),
                    "best_decode_tok_s": args.decode / min(r["decode_s"]),
                    "prefill_s": r["prefill_s"], "decode_s": r["decode_s"],
                    "weights": r.get("weights")}
    del edge
    return out


# ---------------------------------------------------------------------------------------------
# 5. Report


def table(results, bw):
    head = ("| encoding | edgellm prefill tok/s | edgellm decode tok/s | llama.cpp prefill tok/s "
            "| llama.cpp decode tok/s | prefill ratio | decode ratio | weight MB/token (e / l) "
            "| bound tok/s (e / l) | fraction of bound (e / l) | decode GB/s (e / l) |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in results:
        e, l = r["edgellm"], r["llama"]
        be, bl = bw / r["edgellm_bytes_per_token"], bw / r["llama_bytes_per_token"]
        for ek, label in (("edgellm", ""), ("edgellm_map", " (edgellm mapped)")):
            if ek not in r:
                continue
            e = r[ek]
            if ek == "edgellm" and e.get("weights"):  # what the default load chose
                label = f" (edgellm {e['weights']['load']})"
            lines.append(
                f"| {r['encoding']} / {r['gguf_type']}{label} | {e['prefill_tok_s']:.1f} "
                f"| {e['decode_tok_s']:.2f} | {l['prefill_tok_s']:.1f} | {l['decode_tok_s']:.2f} "
                f"| {e['prefill_tok_s'] / l['prefill_tok_s']:.2f} "
                f"| {e['decode_tok_s'] / l['decode_tok_s']:.2f} "
                f"| {r['edgellm_bytes_per_token'] / 1e6:.0f} / "
                f"{r['llama_bytes_per_token'] / 1e6:.0f} "
                f"| {be:.1f} / {bl:.1f} "
                f"| {e['decode_tok_s'] / be:.2f} / {l['decode_tok_s'] / bl:.2f} "
                f"| {e['decode_tok_s'] * r['edgellm_bytes_per_token'] / 1e9:.1f} / "
                f"{l['decode_tok_s'] * r['llama_bytes_per_token'] / 1e9:.1f} |")
    return "\n".join(lines)


def best_table(results):
    """Best of the repeats: on a shared machine, the run least disturbed by other work."""
    lines = ["| encoding | edgellm prefill | edgellm decode | llama.cpp prefill | llama.cpp decode "
             "| prefill ratio | decode ratio |", "|---|---|---|---|---|---|---|"]
    for r in results:
        e, l = r["edgellm"], r["llama"]
        lines.append(f"| {r['encoding']} / {r['gguf_type']} | {e['best_prefill_tok_s']:.1f} "
                     f"| {e['best_decode_tok_s']:.2f} | {l['best_prefill_tok_s']:.1f} "
                     f"| {l['best_decode_tok_s']:.2f} "
                     f"| {e['best_prefill_tok_s'] / l['best_prefill_tok_s']:.2f} "
                     f"| {e['best_decode_tok_s'] / l['best_decode_tok_s']:.2f} |")
    return "\n".join(lines)


def parts_table(results):
    """ms per token by part, and GB/s of the weights each part reads."""
    keys = ["embed", "attention", "ffn", "head", "other"]
    lines = ["| encoding | " + " | ".join(f"{k} ms" for k in keys)
             + " | total ms | attention GB/s | ffn GB/s | head GB/s |",
             "|" + "|".join(["---"] * (len(keys) + 5)) + "|"]
    for r in results:
        p = r["edgellm_decode_parts_s_per_token"]
        if not p:
            continue
        b = r["edgellm_part_bytes_per_token"]
        rate = [f"{b[k] / p[k] / 1e9:.1f}" if p.get(k) else "-"
                for k in ("attention", "ffn", "head")]
        lines.append(f"| {r['encoding']} | " + " | ".join(f"{p.get(k, 0) * 1e3:.1f}" for k in keys)
                     + f" | {sum(p.values()) * 1e3:.1f} | " + " | ".join(rate) + " |")
    return "\n".join(lines)


def kernel_parts_table(results):
    """The fused path by kernel: ms per token and GB/s of the weights each reads."""
    keys = ["qkv", "o", "ffn", "layer rest", "head", "other"]
    lines = ["| encoding | " + " | ".join(f"{k} ms" for k in keys)
             + " | total ms | qkv GB/s | o GB/s | ffn GB/s | head GB/s |",
             "|" + "|".join(["---"] * (len(keys) + 6)) + "|"]
    for r in results:
        p = r.get("edgellm_kernel_parts_s_per_token")
        if not p:
            continue
        b = r["edgellm_kernel_part_bytes_per_token"]
        rate = [f"{b[k] / p[k] / 1e9:.1f}" if p.get(k) else "-"
                for k in ("qkv", "o", "ffn", "head")]
        lines.append(f"| {r['encoding']} | " + " | ".join(f"{p.get(k, 0) * 1e3:.1f}" for k in keys)
                     + f" | {sum(p.values()) * 1e3:.1f} | " + " | ".join(rate) + " |")
    return "\n".join(lines)


def prefill_parts_table(results, n):
    keys = ["embed", "attention", "ffn", "head", "other"]
    lines = ["| encoding | " + " | ".join(f"{k} s" for k in keys) + f" | total s ({n} tokens) |",
             "|" + "|".join(["---"] * (len(keys) + 2)) + "|"]
    for r in results:
        p = r["edgellm_prefill_parts_s"]
        lines.append(f"| {r['encoding']} | " + " | ".join(f"{p.get(k, 0):.2f}" for k in keys)
                     + f" | {sum(p.values()):.2f} |")
    return "\n".join(lines)


def eq_table(results):
    lines = ["| pair | prompt top-1 agree | greedy top-1 agree (teacher-forced) "
             "| greedy tokens equal (free-running) | last logits corr | max abs diff / std "
             "| prompt top-1 vs f16 (e / l) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        q = r["equivalence"]
        if q is None:
            continue
        lines.append(f"| {r['encoding']} / {r['gguf_type']} | {q['prompt_top1_agreement']:.3f} "
                     f"| {q['greedy_top1_agreement_teacher_forced']:.3f} "
                     f"| {q['greedy_tokens_equal_free_running']}/{q['greedy_tokens']} "
                     f"| {q['last_logits_corr']:.5f} "
                     f"| {q['last_logits_max_abs_diff']:.3f} / {q['last_logits_std']:.2f} "
                     + (f"| {q['edgellm_vs_f16_prompt_top1']:.3f} / "
                        f"{q['llama_vs_f16_prompt_top1']:.3f} |" if "llama_vs_f16_prompt_top1"
                        in q else "| (reference) |"))
    return "\n".join(lines)


def machine():
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        pass
    return info


def git_state():
    """The commit measured (the kernels change often) and whether the tree had local edits."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "runtime"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return {"commit": head, "runtime_modified": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/edgellm-bench"))
    ap.add_argument("--encodings", default="f16,int8,int4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--decode", type=int, default=64, help="decoded tokens")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--check-tokens", type=int, default=16,
                    help="greedy tokens for the equivalence check (0: skip it)")
    ap.add_argument("--prepare-only", action="store_true",
                    help="build the checkpoint, conversions and GGUFs, measure nothing")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="wall time, or each child process's CPU time (on a shared machine, "
                    "the engine's own work; use it with --threads 1: on more threads CPU time "
                    "adds up the threads, spinning ones included)")
    ap.add_argument("--ffn-down", choices=["matrix", "bundle"], default="matrix",
                    help="edgellm's FFN layout (edgellm convert --ffn-down): the down "
                    "projection as a matrix (default, the resident layout) or in the bundles")
    ap.add_argument("--mapped", action="store_true",
                    help="also time edgellm with its weights mapped (load(mmap=True)); the "
                    "default row uses the default load, which reads them into memory when "
                    "they fit (replaces --in-memory, now the default's choice)")
    ap.add_argument("--child", nargs=2, metavar=("ENGINE", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--parts", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    encs = [e.strip() for e in args.encodings.split(",") if e.strip()]
    for e in encs:
        if e not in PAIRS:
            ap.error(f"unknown encoding {e!r} (choose from {', '.join(PAIRS)})")
    if args.prompt + args.decode + 1 > args.n_ctx:
        ap.error("--prompt + --decode must fit in --n-ctx")

    os.makedirs(args.workdir, exist_ok=True)
    hf = build_checkpoint(args.workdir)
    paths = {e: (converted(args.workdir, hf, e, args.ffn_down),
                 write_gguf(args.workdir, hf, PAIRS[e])) for e in encs}
    log(f"work dir {args.workdir}: {_du(args.workdir) / 1e9:.1f} GB")
    if args.prepare_only:
        return 0

    import numba

    numba.set_num_threads(args.threads)
    load_before = os.getloadavg()
    copy_bw = copy_bandwidth()
    read_bw = read_bandwidth()
    bw = max(copy_bw, read_bw)
    log(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s, parallel read {read_bw / 1e9:.1f} GB/s")
    prompt = make_prompt(args.prompt)

    reference = None
    if args.check_tokens and any(e != "f16" for e in encs):
        ref_dir = paths["f16"][0] if "f16" in paths else converted(args.workdir, hf, "f16")
        ref = Edge(ref_dir, args.n_ctx, args.threads)
        reference = ref.all_logits(prompt)
        del ref
    results = [bench_pair(e, *paths[e], args, prompt, reference) for e in encs]
    # The probes read with simple loops; an engine may read faster (llama.cpp's F16 decode does
    # on this machine). The bound uses the best read rate observed, whichever measured it.
    bw_source = "parallel read probe" if read_bw >= copy_bw else "copy probe"
    for r in results:
        for eng, key, label in (("edgellm", "edgellm", r["encoding"]),
                                ("llama.cpp", "llama", r["gguf_type"])):
            rate = r[key + "_bytes_per_token"] * r[key]["decode_tok_s"]
            if rate > bw:
                bw, bw_source = rate, f"{eng} {label} decode"
    report = {
        "benchmark": "decode", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/decode.py " + " ".join(sys.argv[1:] if argv is None
                                                             else argv),
        "machine": machine(), "git": git_state(), "threads": args.threads,
        "clock": args.clock, "ffn_down": args.ffn_down,
        "prompt_tokens": args.prompt,
        "decode_tokens": args.decode, "repeats": args.repeats, "n_ctx": args.n_ctx,
        "load_average_before_after": [load_before, os.getloadavg()],
        "copy_bandwidth_Bps": copy_bw, "read_bandwidth_Bps": read_bw,
        "bound_bandwidth_Bps": bw, "bound_bandwidth_source": bw_source,
        "workdir": args.workdir, "workdir_bytes": _du(args.workdir), "results": results,
    }
    print(json.dumps(report, indent=1))
    if args.json:
        _write_json(args.json, report)
    print(f"\ncommit {report['git']}, {report['date']}, load average (1, 5, 15 min) "
          f"before {', '.join(f'{v:.1f}' for v in load_before)}, after "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    print(f"\nBound = bandwidth {bw / 1e9:.1f} GB/s ({bw_source}) / weight bytes per token. "
          f"Probes: parallel read {read_bw / 1e9:.1f} GB/s, NumPy copy (read + write) "
          f"{copy_bw / 1e9:.1f} GB/s; the bandwidth is the highest of these and of the engines' "
          f"decode read rates. e = edgellm, l = llama.cpp; "
          f"ratio = edgellm / llama.cpp; {args.threads} threads, prompt {args.prompt}, "
          f"decode {args.decode}, median of {args.repeats}, {args.clock} clock, edgellm FFN "
          f"down as a {args.ffn_down}.\n")
    print(table(results, bw))
    print("\nBest of the repeats (tokens/s):\n")
    print(best_table(results))
    if any(r["equivalence"] for r in results):  # (none with --check-tokens 0)
        print("\nEngines compute the same model:\n")
        print(eq_table(results))
    print(f"\nedgellm decode, time per token by part ({args.clock} clock, per-operation path, "
          "first repeat):\n")
    print(parts_table(results))
    print(f"\nedgellm decode by kernel ({args.clock} clock, the fused path as timed above; the "
          "matrix kernels run alone, in layer order, on the model's weights):\n")
    print(kernel_parts_table(results))
    print("\nedgellm prefill, time by part:\n")
    print(prefill_parts_table(results, args.prompt))
    return 0


if __name__ == "__main__":
    sys.exit(main())

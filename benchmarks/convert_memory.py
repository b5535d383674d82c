"""Peak RAM and time of converting a TinyLlama-1.1B-shaped checkpoint (random bf16 weights).

Builds the checkpoint in a temporary directory, written tensor by tensor (never all in RAM): d 2048,
22 layers, d_ff 5632, 32 heads, 4 kv heads, vocab 32000, untied head, bf16 (~2.2 GB). Then runs
`convert` in a child process and reports the child's peak resident set size (from wait4's rusage,
ru_maxrss) and wall time, plus the same for a child that only imports the converter (the baseline:
interpreter, NumPy, safetensors). Prints JSON. Needs ~3 GB free in the temporary directory; deletes
everything afterwards unless --keep.

    python benchmarks/convert_memory.py --quant int4
    python benchmarks/convert_memory.py --layers 4        # a quicker, smaller run
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

SHAPE = dict(d=2048, layers=22, d_ff=5632, heads=32, kv_heads=4, vocab=32000, max_pos=2048)


# NumPy is imported inside the functions that run in the child: the parent only launches children.


def bf16_bits(x):
    import numpy as np

    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def tensor_list(s):
    d, f, V = s["d"], s["d_ff"], s["vocab"]
    hd = d // s["heads"]
    kv = s["kv_heads"] * hd
    out = [("model.embed_tokens.weight", (V, d))]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (d, d)),
                (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.v_proj.weight", (kv, d)),
                (p + "self_attn.o_proj.weight", (d, d)),
                (p + "post_attention_layernorm.weight", (d,)),
                (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                (p + "mlp.down_proj.weight", (d, f))]
    out += [("model.norm.weight", (d,)), ("lm_head.weight", (V, d))]
    return out


def build(path, s, seed=0):
    """Write the checkpoint: header first, then each tensor's bf16 bytes, one at a time."""
    import numpy as np

    os.makedirs(path)
    tensors = tensor_list(s)
    meta, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header = json.dumps(meta, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    rng = np.random.default_rng(seed)
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for name, shape in tensors:
            if len(shape) == 1:
                x = (1 + 0.1 * rng.standard_normal(shape, dtype=np.float32))
            else:
                x = rng.standard_normal(shape, dtype=np.float32)
                x *= 1 / np.sqrt(shape[1])
            f.write(bf16_bits(x).tobytes())
            del x
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": s["d"], "intermediate_size": s["d_ff"],
              "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
              "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"],
              "max_position_embeddings": s["max_pos"], "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    from tokenizers import Tokenizer, models  # the converter only copies it

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(97 + i): 3 + i for i in range(26)}}
    Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")).save(
        os.path.join(path, "tokenizer.json"))
    return off + 8 + len(header)


def run_child(code):
    """Run python -c code; returns (seconds, peak RSS in MiB) of that child alone.

    ru_maxrss of a child also counts what it shares with the parent at fork time, so the parent
    keeps itself small: it imports nothing heavy and builds the checkpoint in a child too."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code])
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"child failed with exit code {p.returncode}")
    return time.perf_counter() - t, usage.ru_maxrss / 1024  # Linux: ru_maxrss in KiB


def du(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quant", default="int4", choices=["f32", "f16", "int8", "int4"])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--layers", type=int, default=SHAPE["layers"])
    ap.add_argument("--dir", default=None, help="where to build (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    s = dict(SHAPE, layers=a.layers)
    root = tempfile.mkdtemp(prefix="edgellm-convmem-", dir=a.dir)
    try:
        src, dst = os.path.join(root, "hf"), os.path.join(root, "out")
        here = os.path.dirname(os.path.abspath(__file__))
        build_s, _ = run_child(f"import sys; sys.path.insert(0, {here!r}); import convert_memory; "
                               f"convert_memory.build({src!r}, {s!r})")
        src_bytes = du(src)
        base_s, base_rss = run_child("import edgellm.converters.convert")
        code = (f"from edgellm.converters.convert import convert; "
                f"convert({src!r}, {dst!r}, quant={a.quant!r}, group_size={a.group_size}, "
                f"progress=False)")
        conv_s, conv_rss = run_child(code)
        hd = s["d"] // s["heads"]
        layer_params = 2 * s["d"] * s["d"] + 2 * s["d"] * hd * s["kv_heads"] + 3 * s["d"] * s[
            "d_ff"]
        result = {
            "shape": s, "quant": a.quant, "group_size": a.group_size,
            "source_gb": round(src_bytes / 1e9, 3), "output_gb": round(du(dst) / 1e9, 3),
            "build_s": round(build_s, 1), "convert_s": round(conv_s, 1),
            "peak_rss_mb": round(conv_rss), "baseline_rss_mb": round(base_rss),
            "one_layer_f32_mb": round(layer_params * 4 / 2**20),
            "embedding_f32_mb": round(s["vocab"] * s["d"] * 4 / 2**20),
        }
        print(json.dumps(result, indent=1))
    finally:
        if a.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

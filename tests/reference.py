"""An independent forward pass in plain NumPy, straight from a Hugging Face checkpoint.

It reads config.json and the safetensors files itself (no edgellm code at all) and computes in
float64, one obvious step at a time, following transformers' modeling_llama.py / modeling_opt.py.
Slow and short on purpose: it is the yardstick the converter and the runtime are measured against.

    logits = reference.forward("path/to/hf_model", [1, 5, 9])   # float32 [3, vocab]
"""

import json
import os
import struct

import numpy as np


def load_tensors(path):
    """dict name -> float64 array for every tensor of a single or sharded safetensors checkpoint."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for file in files:
        with open(os.path.join(path, file), "rb") as f:
            data = f.read()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        header.pop("__metadata__", None)
        for name, h in header.items():
            b, e = h["data_offsets"]
            raw = data[8 + n + b:8 + n + e]
            if h["dtype"] == "BF16":
                x = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                x = np.frombuffer(raw, {"F32": np.float32, "F16": np.float16}[h["dtype"]])
            out[name] = x.astype(np.float64).reshape(h["shape"])
    return out


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def rope_inv_freq(head_dim, theta, scaling):
    """transformers' default / linear / llama3 rope frequencies."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled)
    return inv


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x, inv_freq):
    """x [T, H, hd] at positions 0..T-1."""
    ang = np.arange(x.shape[0])[:, None] * inv_freq[None, :]  # [T, hd/2]
    emb = np.concatenate([ang, ang], axis=-1)[:, None, :]  # [T, 1, hd]
    return x * np.cos(emb) + rotate_half(x) * np.sin(emb)


def attention(q, k, v):
    """Causal attention. q [T, H, hd], k/v [T, KVH, hd] -> [T, H * hd]."""
    T, H, hd = q.shape
    group = H // k.shape[1]
    out = np.zeros_like(q)
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    for h in range(H):
        s = q[:, h] @ k[:, h // group].T / np.sqrt(hd) + mask
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        out[:, h] = p @ v[:, h // group]
    return out.reshape(T, H * hd)


def silu(x):
    return x / (1 + np.exp(-x))


def relu(x):
    return np.maximum(x, 0)


def forward(path, ids):
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    W = load_tensors(path)
    ids = np.asarray(ids)
    if c["model_type"] == "opt":
        return _opt(c, W, ids).astype(np.float32)
    return _llama(c, W, ids).astype(np.float32)


def _llama(c, W, ids):
    H, KVH = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    hd = c.get("head_dim") or c["hidden_size"] // H
    eps = c.get("rms_norm_eps", 1e-6)
    rp = c.get("rope_parameters")
    if rp:
        theta, scaling = rp["rope_theta"], rp
    else:
        theta, scaling = c.get("rope_theta", 10000.0), c.get("rope_scaling")
    inv = rope_inv_freq(hd, theta, scaling)
    act = {"silu": silu, "relu": relu}[c.get("hidden_act", "silu")]
    T = len(ids)

    def lin(x, name):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    x = W["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, W[p + "input_layernorm.weight"], eps)
        q = apply_rope(lin(h, p + "self_attn.q_proj").reshape(T, H, hd), inv)
        k = apply_rope(lin(h, p + "self_attn.k_proj").reshape(T, KVH, hd), inv)
        v = lin(h, p + "self_attn.v_proj").reshape(T, KVH, hd)
        x = x + lin(attention(q, k, v), p + "self_attn.o_proj")
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        g = act(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj")
        x = x + lin(g, p + "mlp.down_proj")
    x = rms_norm(x, W["model.norm.weight"], eps)
    head = W.get("lm_head.weight") if not c.get("tie_word_embeddings") else None
    return x @ (head if head is not None else W["model.embed_tokens.weight"]).T


def _opt(c, W, ids):
    pre = "model.decoder." if "model.decoder.embed_tokens.weight" in W else "decoder."
    H = c["num_attention_heads"]
    hd = c["hidden_size"] // H
    T = len(ids)

    def lin(x, name):
        return x @ W[name + ".weight"].T + W[name + ".bias"]

    def ln(x, name):
        return layer_norm(x, W[name + ".weight"], W[name + ".bias"])

    # learned positions: position p is row p + 2 (OPT keeps two padding rows first)
    x = W[pre + "embed_tokens.weight"][ids] + W[pre + "embed_positions.weight"][np.arange(T) + 2]
    for i in range(c["num_hidden_layers"]):
        p = f"{pre}layers.{i}."
        h = ln(x, p + "self_attn_layer_norm")
        q = lin(h, p + "self_attn.q_proj").reshape(T, H, hd)
        k = lin(h, p + "self_attn.k_proj").reshape(T, H, hd)
        v = lin(h, p + "self_attn.v_proj").reshape(T, H, hd)
        x = x + lin(attention(q, k, v), p + "self_attn.out_proj")
        h = ln(x, p + "final_layer_norm")
        x = x + lin(relu(lin(h, p + "fc1")), p + "fc2")
    x = ln(x, pre + "final_layer_norm")
    head = W.get("lm_head.weight") if not c.get("tie_word_embeddings", True) else None
    return x @ (head if head is not None else W[pre + "embed_tokens.weight"]).T

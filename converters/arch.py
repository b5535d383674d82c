"""Supported source architectures, as data.

One table row per architecture family: which Hugging Face `model_type`s it covers, how its
config.json becomes a runtime ModelConfig, and which checkpoint tensor holds each canonical tensor
(docs/INTERNALS.md). Tensor names are templates with an `{i}` layer slot; a name that exists only for
some configurations names the ModelConfig flag it depends on. Everything a conversion needs to know
about an architecture is here, and every refusal happens here, before anything is written.

Intermediate canonical names used only inside the converter (the writer bundles them):
ffn_gate [d_ff, d], ffn_up [d_ff, d], ffn_down [d, d_ff] (the checkpoint's own layout).

>>> spec = from_hf_config({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
...     "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
...     "vocab_size": 300, "max_position_embeddings": 128})
>>> spec.config.head_dim, spec.config.kv_dim, spec.arch.family
(16, 32, 'llama')
>>> spec.layer_tensors(1)["attn_k"]
'model.layers.1.self_attn.k_proj.weight'
"""

import json
import os
from dataclasses import dataclass, field

from edgellm.runtime.config import ModelConfig
from edgellm.runtime.errors import ConvertError, FormatError


@dataclass(frozen=True)
class Name:
    canonical: str  # canonical tensor name (inside embed.safetensors or a layer chunk)
    hf: str  # checkpoint name; layer names carry an {i} slot
    when: str | None = None  # ModelConfig flag the tensor depends on ("!flag": must be false)


@dataclass(frozen=True)
class Arch:
    family: str
    model_types: tuple
    parse: object  # function(hf config dict, model_type) -> (ModelConfig kwargs, notes)
    globals: tuple  # Names in embed.safetensors
    layer: tuple  # Names in each layer chunk
    ffn_parts: tuple  # bundle parts, in row order: ("gate", "up", "down") or ("up", "down")
    add_bos: dict  # model_type -> does its tokenizer prepend BOS (when tokenizer_config is silent)


@dataclass
class Spec:
    """What the converter needs: the config, the architecture row and the resolved tensor names."""

    arch: Arch
    model_type: str
    config: ModelConfig
    hf_max_positions: int  # max_position_embeddings as the checkpoint states it
    notes: list = field(default_factory=list)  # deliberate, exact choices worth recording

    def _wanted(self, when):
        if when is None:
            return True
        if when.startswith("!"):
            return not getattr(self.config, when[1:])
        return bool(getattr(self.config, when))

    def _present(self, names):
        return {n.canonical: n.hf for n in names if self._wanted(n.when)}

    def global_tensors(self):
        """canonical -> checkpoint name for embed.safetensors (output only when untied)."""
        return self._present(self.arch.globals)

    def layer_tensors(self, i):
        """canonical -> checkpoint name for layer i."""
        return {c: hf.format(i=i) for c, hf in self._present(self.arch.layer).items()}

    def shape(self, canonical):
        """The shape the checkpoint tensor for a canonical name must have."""
        c = self.config
        d, V, f = c.d_model, c.vocab_size, c.d_ff
        shapes = {
            "tok_embeddings": (V, d), "output": (V, d),
            "pos_embeddings": (self.n_positions, d),
            "attn_q": (c.q_dim, d), "attn_k": (c.kv_dim, d), "attn_v": (c.kv_dim, d),
            "attn_o": (d, c.q_dim),
            "attn_q.bias": (c.q_dim,), "attn_k.bias": (c.kv_dim,), "attn_v.bias": (c.kv_dim,),
            "attn_o.bias": (d,),
            "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f),
            "ffn_up.bias": (f,), "ffn_down.bias": (d,),
        }
        if canonical in shapes:
            return shapes[canonical]
        if canonical.endswith((".weight", ".bias")):  # norms
            return (d,)
        raise KeyError(canonical)

    @property
    def n_positions(self):
        """Rows of the learned position table (including the offset rows)."""
        return self.hf_max_positions + self.config.pos_offset


# ---------------------------------------------------------------------------------------------
# Config parsing helpers


def _need(hf, *keys, where="config.json"):
    missing = [k for k in keys if hf.get(k) is None]
    if missing:
        raise ConvertError(f"{where}: missing required key(s) {', '.join(missing)}")
    return [hf[k] for k in keys]


def _int(hf, key, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConvertError(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


ACTIVATIONS = {"silu": "silu", "swish": "silu", "relu": "relu"}


def _activation(value, key):
    if value not in ACTIVATIONS:
        raise ConvertError(f"config.json: {key}={value!r} is not supported (supported: silu, relu)")
    return ACTIVATIONS[value]


ROPE_TYPES = ("linear", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def parse_rope(hf):
    """(theta, scaling) from a transformers 4.x config (rope_theta, rope_scaling) or a 5.x one
    (rope_parameters dict holding rope_theta, rope_type and the scaling fields).

    scaling is None for plain RoPE, else {"rope_type": "linear", "factor"} or
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}.
    """
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params and "rope_theta" not in params:
        raise ConvertError("config.json: per-layer-type rope_parameters are not supported")
    if isinstance(params, dict):
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf.get("rope_scaling") or {})
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ConvertError(f"config.json: rope_theta must be a positive number, got {theta!r}")
    if hf.get("partial_rotary_factor", 1.0) != 1.0 or scaling.get("partial_rotary_factor",
                                                                   1.0) != 1.0:
        raise ConvertError("config.json: partial_rotary_factor != 1 is not supported")
    if kind == "default":
        return float(theta), None
    if kind not in ROPE_TYPES:
        raise ConvertError(f"config.json: rope scaling type {kind!r} is not supported "
                           f"(supported: {', '.join(ROPE_TYPES)})")
    keys = ("factor",) if kind == "linear" else LLAMA3_KEYS
    missing = [k for k in keys if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise ConvertError(f"config.json: {kind} rope scaling needs {', '.join(missing)}")
    out = {"rope_type": kind}
    for k in keys:
        out[k] = float(scaling[k]) if k != "original_max_position_embeddings" else int(scaling[k])
    return float(theta), out


def _check_not_quantized(hf):
    q = hf.get("quantization_config")
    if q:
        method = q.get("quant_method", "?") if isinstance(q, dict) else "?"
        raise ConvertError(f"config.json: the checkpoint is already quantized ({method}); "
                           "convert the original floating-point checkpoint")


# ---------------------------------------------------------------------------------------------
# Llama family: llama (SmolLM, TinyLlama), mistral, qwen2


def _parse_llama(hf, model_type):
    d, n_layers, n_heads, d_ff, vocab, max_pos = _need(
        hf, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "vocab_size", "max_position_embeddings")
    for k, v in (("hidden_size", d), ("num_hidden_layers", n_layers),
                 ("num_attention_heads", n_heads), ("intermediate_size", d_ff),
                 ("vocab_size", vocab), ("max_position_embeddings", max_pos)):
        _int(hf, k, v)
    n_kv = _int(hf, "num_key_value_heads", hf.get("num_key_value_heads") or n_heads)
    head_dim = hf.get("head_dim")
    if head_dim is None:
        if d % n_heads:
            raise ConvertError(f"config.json: hidden_size {d} is not a multiple of "
                               f"num_attention_heads {n_heads} and head_dim is not given")
        head_dim = d // n_heads
    _int(hf, "head_dim", head_dim)
    if n_heads % n_kv:
        raise ConvertError(f"config.json: num_attention_heads {n_heads} is not a multiple of "
                           f"num_key_value_heads {n_kv}")
    if hf.get("mlp_bias"):
        raise ConvertError("config.json: mlp_bias=true (biases on gate/up/down) is not supported")
    theta, scaling = parse_rope(hf)
    notes = []
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False  # Qwen2 always has q/k/v biases, never an o bias
    elif model_type == "mistral":
        qkv_bias = o_bias = False
    else:
        qkv_bias = o_bias = bool(hf.get("attention_bias", False))
    max_context = max_pos
    # Sliding-window attention is not implemented: capping the context at the window makes every
    # attention in range a full attention, so the conversion stays exact.
    window = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    if window is not None and _int(hf, "sliding_window", window) < max_context:
        max_context = window
        notes.append(f"context capped at sliding_window={window} (max_position_embeddings "
                     f"{max_pos}): within the window, sliding attention equals full attention")
    kwargs = dict(
        arch=model_type, d_model=d, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, d_ff=d_ff, vocab_size=vocab, max_context=max_context, norm="rms",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation=_activation(hf.get("hidden_act", "silu"), "hidden_act"), gated_ffn=True,
        positions="rope", pos_offset=0, rope_theta=theta, rope_scaling=scaling,
        qkv_bias=qkv_bias, o_bias=o_bias, ffn_bias=False,
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    return kwargs, notes, max_pos


L = "model.layers.{i}."
LLAMA = Arch(
    family="llama",
    model_types=("llama", "mistral", "qwen2"),
    parse=_parse_llama,
    globals=(
        Name("tok_embeddings", "model.embed_tokens.weight"),
        Name("norm.weight", "model.norm.weight"),
        Name("output", "lm_head.weight", when="!tied_embeddings"),
    ),
    layer=(
        Name("attn_norm.weight", L + "input_layernorm.weight"),
        Name("attn_q", L + "self_attn.q_proj.weight"),
        Name("attn_k", L + "self_attn.k_proj.weight"),
        Name("attn_v", L + "self_attn.v_proj.weight"),
        Name("attn_o", L + "self_attn.o_proj.weight"),
        Name("attn_q.bias", L + "self_attn.q_proj.bias", when="qkv_bias"),
        Name("attn_k.bias", L + "self_attn.k_proj.bias", when="qkv_bias"),
        Name("attn_v.bias", L + "self_attn.v_proj.bias", when="qkv_bias"),
        Name("attn_o.bias", L + "self_attn.o_proj.bias", when="o_bias"),
        Name("ffn_norm.weight", L + "post_attention_layernorm.weight"),
        Name("ffn_gate", L + "mlp.gate_proj.weight"),
        Name("ffn_up", L + "mlp.up_proj.weight"),
        Name("ffn_down", L + "mlp.down_proj.weight"),
    ),
    ffn_parts=("gate", "up", "down"),
    add_bos={"llama": True, "mistral": True, "qwen2": False},
)


# ---------------------------------------------------------------------------------------------
# OPT (pre-norm variants: every size except 350m)


def _parse_opt(hf, model_type):
    d, n_layers, n_heads, d_ff, vocab, max_pos = _need(
        hf, "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "vocab_size",
        "max_position_embeddings")
    for k, v in (("hidden_size", d), ("num_hidden_layers", n_layers),
                 ("num_attention_heads", n_heads), ("ffn_dim", d_ff), ("vocab_size", vocab),
                 ("max_position_embeddings", max_pos)):
        _int(hf, k, v)
    if not hf.get("do_layer_norm_before", True):
        raise ConvertError("config.json: do_layer_norm_before=false (post-norm OPT, e.g. opt-350m) "
                           "is not supported")
    proj = hf.get("word_embed_proj_dim", d)
    if proj != d:
        raise ConvertError(f"config.json: word_embed_proj_dim {proj} != hidden_size {d} "
                           "(projected embeddings, e.g. opt-350m) is not supported")
    if hf.get("_remove_final_layer_norm", False):
        raise ConvertError("config.json: _remove_final_layer_norm=true is not supported")
    if not hf.get("layer_norm_elementwise_affine", True):
        raise ConvertError("config.json: layer_norm_elementwise_affine=false is not supported")
    if d % n_heads:
        raise ConvertError(f"config.json: hidden_size {d} is not a multiple of "
                           f"num_attention_heads {n_heads}")
    bias = bool(hf.get("enable_bias", True))
    kwargs = dict(
        arch="opt", d_model=d, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
        head_dim=d // n_heads, d_ff=d_ff, vocab_size=vocab, max_context=max_pos, norm="layer",
        norm_eps=1e-5,  # torch.nn.LayerNorm's default, which OPT uses
        activation=_activation(hf.get("activation_function", "relu"), "activation_function"),
        gated_ffn=False, positions="learned", pos_offset=2, rope_theta=10000.0,
        rope_scaling=None, qkv_bias=bias, o_bias=bias, ffn_bias=bias,
        tied_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )
    return kwargs, [], max_pos


D = "model.decoder."
O = D + "layers.{i}."
OPT = Arch(
    family="opt",
    model_types=("opt",),
    parse=_parse_opt,
    globals=(
        Name("tok_embeddings", D + "embed_tokens.weight"),
        Name("pos_embeddings", D + "embed_positions.weight"),
        Name("norm.weight", D + "final_layer_norm.weight"),
        Name("norm.bias", D + "final_layer_norm.bias"),
        Name("output", "lm_head.weight", when="!tied_embeddings"),
    ),
    layer=(
        Name("attn_norm.weight", O + "self_attn_layer_norm.weight"),
        Name("attn_norm.bias", O + "self_attn_layer_norm.bias"),
        Name("attn_q", O + "self_attn.q_proj.weight"),
        Name("attn_k", O + "self_attn.k_proj.weight"),
        Name("attn_v", O + "self_attn.v_proj.weight"),
        Name("attn_o", O + "self_attn.out_proj.weight"),
        Name("attn_q.bias", O + "self_attn.q_proj.bias", when="qkv_bias"),
        Name("attn_k.bias", O + "self_attn.k_proj.bias", when="qkv_bias"),
        Name("attn_v.bias", O + "self_attn.v_proj.bias", when="qkv_bias"),
        Name("attn_o.bias", O + "self_attn.out_proj.bias", when="o_bias"),
        Name("ffn_norm.weight", O + "final_layer_norm.weight"),
        Name("ffn_norm.bias", O + "final_layer_norm.bias"),
        Name("ffn_up", O + "fc1.weight"),
        Name("ffn_down", O + "fc2.weight"),
        Name("ffn_up.bias", O + "fc1.bias", when="ffn_bias"),
        Name("ffn_down.bias", O + "fc2.bias", when="ffn_bias"),
    ),
    ffn_parts=("up", "down"),
    add_bos={"opt": True},
)

ARCHS = (LLAMA, OPT)
BY_MODEL_TYPE = {t: a for a in ARCHS for t in a.model_types}

# Checkpoints saved from the bare decoder (LlamaModel, OPTModel) lack this prefix.
OPTIONAL_PREFIXES = ("model.",)


def from_hf_config(hf, generation_config=None):
    """Spec from a parsed config.json (and generation_config.json, for the eos ids)."""
    if not isinstance(hf, dict):
        raise ConvertError("config.json: must be a JSON object")
    model_type = hf.get("model_type")
    if model_type is None:
        raise ConvertError("config.json: missing required key model_type")
    arch = BY_MODEL_TYPE.get(model_type)
    if arch is None:
        supported = ", ".join(sorted(BY_MODEL_TYPE))
        raise ConvertError(f"config.json: model_type {model_type!r} is not supported "
                           f"(supported: {supported})")
    _check_not_quantized(hf)
    kwargs, notes, max_pos = arch.parse(hf, model_type)
    bos, eos = _special_ids(hf, generation_config or {})
    kwargs.update(bos_token_id=bos, eos_token_ids=eos)
    try:
        cfg = ModelConfig(**kwargs)
    except FormatError as e:
        raise ConvertError(f"config.json: {str(e).split(': ', 1)[-1]}") from None
    return Spec(arch=arch, model_type=model_type, config=cfg, hf_max_positions=max_pos,
                notes=notes)


def _special_ids(hf, gen):
    """bos id and eos ids: generation_config.json wins over config.json, as in transformers."""
    def ids(v):
        if v is None:
            return []
        v = v if isinstance(v, list) else [v]
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
            raise ConvertError(f"config.json: bad token id(s) {v!r}")
        return list(dict.fromkeys(v))

    bos = gen.get("bos_token_id", hf.get("bos_token_id"))
    bos_ids = ids(bos)
    eos = gen.get("eos_token_id", hf.get("eos_token_id"))
    return (bos_ids[0] if bos_ids else None), ids(eos)


def read_json(path, required=True):
    if not os.path.isfile(path):
        if required:
            raise ConvertError(f"{path}: missing")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: cannot read JSON ({e})") from None


def from_hf_dir(src):
    """Spec from a Hugging Face model directory (config.json, optional generation_config.json)."""
    src = os.fspath(src)
    if not os.path.isdir(src):
        raise ConvertError(f"{src}: not a directory (expected a Hugging Face model directory)")
    hf = read_json(os.path.join(src, "config.json"))
    gen = read_json(os.path.join(src, "generation_config.json"), required=False)
    try:
        return from_hf_config(hf, gen)
    except ConvertError as e:
        msg = str(e)
        if msg.startswith("config.json"):
            msg = os.path.join(src, msg)
        raise ConvertError(msg) from None

"""`edgellm distill`: train a smaller student from a teacher, or heal a compressed model.

Workstation side, behind the optional `[train]` extra (torch). Both models run as Hugging Face
transformers models in float32: a teacher given as an edgellm model directory is first exported
to a float32 Hugging Face directory (edgellm/export.py; exact: the values edgellm computes with),
a Hugging Face checkpoint directory is loaded as it is. The trained student is saved as a Hugging
Face directory and converted back by the ordinary converter (converters/convert.py), then staged
and renamed into place with its provenance (teacher, options, losses, held-out figures) in the
manifest: nothing half-written on failure.

The student is either
- selected from the teacher's weights (weight selection): a subset of its layers (`keep_layers`,
  or `layers=N` spread evenly, first and last kept), of each layer's attention heads (`heads`,
  whole key/value groups, chosen by how much they add to the attention output on the text) and of
  each layer's FFN neurons (`neurons`, the fraction kept, chosen by mean |activation| times the
  norm of the neuron's down-projection column on the text); or
- an existing model (`student`): healing, a short fine-tune of a pruned or layer-dropped model
  against its original as the teacher.

Objective, per predicted token, averaged over the batch's tokens (Hinton et al. 2015):

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, next token)

with s, t the student's and the teacher's logits and T the temperature (T^2 keeps the KL term's
gradients at the scale of the CE term's). alpha defaults to 1 (KL only) when healing and to 0.5
for a selected student: the CE term pulls the student towards the text, not towards the
teacher, and its gradient does not vanish when the student equals the teacher (on SmolLM2 with
two layers dropped its gradient was 3x the KL term's at alpha 0.5; a 40-step LoRA heal lowered
the cross-entropy on the Austen text and left the KL to the teacher where it was).
`freeze_embeddings` keeps the token embedding (and the head) as they are: fewer weights to
update, and the gradient of a tied 49152-row head is a fifth of a small model's step. With `lora=r` only low-rank adapters on every linear of
the decoder layers train (W + (alpha_lora / r) B A, B zero at the start, so the student starts as
the model it adapts); they are merged into the weights before writing.

The last tenth of the text's tokens (at least one window, at most MAX_HELDOUT) is held out: the KL to the teacher (at
T = 1) and the student's perplexity on it are measured before and after training and recorded.
"""

import copy
import dataclasses
import math
import os
import re
import shutil
import tempfile
import time

import numpy as np

from edgellm.runtime import format
from edgellm.runtime.errors import ConvertError, EdgeLLMError

from . import quantize, structural, writer

TRAIN_HINT = "pip install 'edgellm[train]' (torch, transformers)"
WEIGHT_FILES = re.compile(r"(\.safetensors|\.bin|\.safetensors\.index\.json|\.bin\.index\.json|"
                          r"^config\.json)$")
MAX_HELDOUT = 8192  # held-out tokens scored before and after training
LAYER_KEY = re.compile(r"^(model\.(?:decoder\.)?layers\.)(\d+)\.(.*)$")


@dataclasses.dataclass
class Options:
    steps: int = 200
    seq_len: int = 128
    batch: int = 4
    lr: float = None  # default: 2e-4, or 1e-3 with LoRA
    temperature: float = 2.0
    alpha: float = None  # weight of the KL term; default: 1.0 when healing, else 0.5
    lora: int = 0  # rank; 0: train every weight
    lora_alpha: float = None  # default: 2 * rank
    threads: int = 1
    seed: int = 0
    max_tokens: int = None  # use at most this many tokens of the text
    freeze_embeddings: bool = False  # train the layers only (the tied head stays too)

    def check(self):
        def bad(name, what):
            raise ConvertError(f"--{name.replace('_', '-')} {what}, got "
                               f"{getattr(self, name)!r}")

        for name, lo in (("steps", 0), ("seq_len", 2), ("batch", 1), ("threads", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                bad(name, f"must be an integer >= {lo}")
        if not isinstance(self.lora, int) or self.lora < 0:
            bad("lora", "must be a rank >= 0 (0: no LoRA)")
        if self.lr is None:
            self.lr = 1e-3 if self.lora else 2e-4
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            bad("lr", "must be between 0 and 1")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            bad("temperature", "must be positive")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float))
                                           and 0 <= self.alpha <= 1):
            bad("alpha", "must be between 0 and 1")
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * max(self.lora, 1)
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", "must be positive")
        return self


def train_options(step):
    """Options from a recipe step's training keys (converters/recipe.py TRAIN), checked."""
    names = {f.name for f in dataclasses.fields(Options)}
    return Options(**{k: v for k, v in step.items() if k in names}).check()


def step_plan(step, cfg):
    """The selection plan of a recipe `distill` step against cfg (its keep_layers may be a
    list)."""
    keep = step.get("keep_layers")
    if isinstance(keep, list):
        keep = ",".join(str(i) for i in keep)
    return plan_selection(cfg, step.get("layers"), keep, step.get("neurons"), step.get("heads"))


def require_torch():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ConvertError(f"edgellm distill needs torch and transformers ({e.name} is not "
                           f"installed): {TRAIN_HINT}") from None


# ---------------------------------------------------------------------------------------------
# Checks before any work


def model_info(path, what):
    """(config dict, tokenizer) of a teacher/student: an edgellm model directory or a Hugging
    Face checkpoint directory (GGUF: convert it first)."""
    from .recipe import source_info

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConvertError(f"{what} {path}: no such file or directory")
    if not (structural.is_model_dir(path)
            or os.path.isfile(os.path.join(path, "config.json"))):
        raise ConvertError(f"{what} {path}: not an edgellm model directory or a Hugging Face "
                           "checkpoint directory (convert a GGUF file with `edgellm convert` "
                           "first)")
    try:
        return source_info(path)
    except ConvertError as e:
        raise ConvertError(f"{what}: {e}") from None


def _refuse_sparse(path):
    """A weight-pruned student (sparse encodings) would come back dense: training moves the
    zeros. Heal before pruning instead."""
    if not structural.is_model_dir(path):
        return
    m, _ = format.read_manifest(path)
    for c in m["chunks"]:
        for name, e in c["tensors"].items():
            encs = [e.get("encoding")] + [p.get("encoding") for p in e.get("parts") or []]
            if any(str(x).startswith(("sp24_", "sp50_")) for x in encs):
                raise ConvertError(f"student {path}: {name} is stored pruned (sparse "
                                   "encoding); training would refill the pruned weights. Heal "
                                   "before pruning (`edgellm convert --prune` on the healed "
                                   "model)")


def parse_layers(spec, n_layers):
    """--keep-layers "0,2,5" -> [0, 2, 5] (sorted, distinct, in range)."""
    try:
        layers = [int(x) for x in str(spec).split(",") if x.strip()]
    except ValueError:
        raise ConvertError(f"--keep-layers {spec!r}: give layer indices separated by commas, "
                           "e.g. 0,2,5") from None
    if not layers:
        raise ConvertError(f"--keep-layers {spec!r}: no layers given")
    if len(set(layers)) != len(layers):
        raise ConvertError(f"--keep-layers {spec!r}: a layer is repeated")
    out = sorted(layers)
    if out[0] < 0 or out[-1] >= n_layers:
        raise ConvertError(f"--keep-layers {spec!r}: the teacher has layers 0 to {n_layers - 1}")
    return out


def spread_layers(n, n_layers):
    """n of n_layers layer indices spread evenly, the first and the last kept."""
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= n_layers:
        raise ConvertError(f"--layers {n!r}: must be between 1 and the teacher's {n_layers} "
                           "layers")
    if n == 1:
        return [0]
    return sorted(set(int(round(x)) for x in np.linspace(0, n_layers - 1, n)))


def plan_selection(cfg, layers=None, keep_layers=None, neurons=None, heads=None):
    """The student's shape from the teacher's config: {"layers", "d_ff", "heads", "kv_heads"}."""
    n = cfg["n_layers"]
    if layers is not None and keep_layers is not None:
        raise ConvertError("give --layers N or --keep-layers LIST, not both")
    kept = (parse_layers(keep_layers, n) if keep_layers is not None
            else spread_layers(layers, n) if layers is not None else list(range(n)))
    d_ff = cfg["d_ff"]
    if neurons is not None:
        if isinstance(neurons, bool) or not isinstance(neurons, (int, float)) \
                or not 0 < neurons <= 1:
            raise ConvertError(f"--neurons {neurons!r}: the fraction of FFN neurons the student "
                               "keeps must be in (0, 1]")
        d_ff = structural.kept_neurons(cfg["d_ff"], 1.0 - neurons) if neurons < 1 else d_ff
    n_heads, n_kv = cfg["n_heads"], cfg["n_kv_heads"]
    if heads is not None:
        group = n_heads // n_kv
        if not cfg["gated_ffn"]:
            raise ConvertError("--heads: head selection supports the llama family (llama, "
                               "mistral, qwen2), not OPT")
        if (isinstance(heads, bool) or not isinstance(heads, int) or not 1 <= heads <= n_heads
                or heads % group):
            raise ConvertError(f"--heads {heads!r}: must be a multiple of {group} (the teacher "
                               f"shares each key/value head among {group} query heads) between "
                               f"{group} and {n_heads}")
        n_heads, n_kv = heads, heads // group
    return {"layers": kept, "d_ff": d_ff, "heads": n_heads, "kv_heads": n_kv}


def token_ids(tokenizer, text):
    from .recipe import encode_text

    return np.asarray(encode_text(tokenizer, text), dtype=np.int64)


def split_tokens(ids, seq_len):
    """(train, held-out) token ids: the last tenth (at least one window of seq_len + 1) held
    out. Too few tokens for two training windows and one held-out window: a ConvertError."""
    need = 3 * (seq_len + 1)
    if len(ids) < need:
        raise ConvertError(f"the text is too short: {len(ids)} tokens with the teacher's "
                           f"tokenizer, at least {need} are needed for --seq-len {seq_len} "
                           "(two training windows and one held-out)")
    n_held = max(seq_len + 1, min(len(ids) // 10, MAX_HELDOUT))
    return ids[:-n_held], ids[-n_held:]


# ---------------------------------------------------------------------------------------------
# Torch models


def load_hf(path, work, name):
    """A float32 transformers model of an edgellm directory (exported) or an HF checkpoint."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()  # ours is the training bar
    path = os.fspath(path)
    hf = path
    if structural.is_model_dir(path):
        from edgellm.export import export

        hf = os.path.join(work, name + "-hf")
        export(path, hf, to="hf", progress=False)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    model.config.use_cache = False
    return model, hf


def decoder_layers(model):
    inner = model.model
    return inner.decoder.layers if hasattr(inner, "decoder") else inner.layers


def _ffn(layer):
    """(up-like linears whose rows are neurons, the down-like linear whose columns are)."""
    if hasattr(layer, "mlp"):
        return [layer.mlp.gate_proj, layer.mlp.up_proj], layer.mlp.down_proj
    return [layer.fc1], layer.fc2  # OPT


def _ffn_names(model):
    if hasattr(decoder_layers(model)[0], "mlp"):
        return ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"
    return ("fc1",), "fc2"


def input_means(model, batches, modules):
    """Mean |input| per feature of each module over the batches (forward hooks)."""
    import torch

    sums = [None] * len(modules)
    counts = [0] * len(modules)

    def hook(k):
        def f(mod, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).double()
            sums[k] = x.sum(0) if sums[k] is None else sums[k] + x.sum(0)
            counts[k] += x.shape[0]
        return f

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in enumerate(modules)]
    try:
        with torch.no_grad():
            for x in batches:
                model(input_ids=x)
    finally:
        for h in handles:
            h.remove()
    return [(s / c).float() for s, c in zip(sums, counts)]


def select_student(teacher, plan, batches):
    """A student model of the teacher's class with the planned shape, its weights selected from
    the teacher's. Returns (student, record of what was kept)."""
    import torch

    cfg = copy.deepcopy(teacher.config)
    layers = decoder_layers(teacher)
    kept = plan["layers"]
    record = {"kept_layers": kept}
    neuron_keep, head_keep = {}, {}
    d_ff = _d_ff(cfg)
    if plan["d_ff"] < d_ff:  # mean |activation| x ||down column|| per neuron, on the text
        downs = [_ffn(layers[i])[1] for i in kept]
        means = input_means(teacher, batches, downs)
        for i, down, m in zip(kept, downs, means):
            score = m * down.weight.detach().norm(dim=0)
            neuron_keep[i] = torch.sort(torch.topk(score, plan["d_ff"]).indices).values
        record["neurons"] = {"kept": plan["d_ff"], "of": d_ff,
                             "score": "mean |down input| x ||down column|| on the text"}
    n_heads, n_kv = cfg.num_attention_heads, _kv_heads(cfg)
    if plan["heads"] < n_heads:
        hd = _head_dim(cfg)
        group = n_heads // n_kv
        os_ = [layers[i].self_attn.o_proj for i in kept]
        means = input_means(teacher, batches, os_)
        for i, o, m in zip(kept, os_, means):  # per key/value group: its share of o's output
            contrib = (m * o.weight.detach().norm(dim=0)).reshape(n_kv, group * hd).sum(1)
            head_keep[i] = torch.sort(torch.topk(contrib, plan["kv_heads"]).indices).values
        record["heads"] = {"kept": plan["heads"], "of": n_heads, "kv_kept": plan["kv_heads"],
                           "score": "mean |o input| x ||o column|| summed per key/value group"}
    cfg.num_hidden_layers = len(kept)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    if neuron_keep:
        _set_d_ff(cfg, plan["d_ff"])
    if head_keep:
        cfg.head_dim = _head_dim(cfg)  # explicit: d_model / heads changes
        cfg.num_attention_heads, cfg.num_key_value_heads = plan["heads"], plan["kv_heads"]
    sd = {}
    ups, down = _ffn_names(teacher)
    for key, w in teacher.state_dict().items():
        m = LAYER_KEY.match(key)
        if not m:
            sd[key] = w
            continue
        i = int(m.group(2))
        if i not in kept:
            continue
        rest = m.group(3)
        if i in neuron_keep:
            idx = neuron_keep[i]
            if rest.startswith(ups):
                w = w[idx]
            elif rest == down + ".weight":
                w = w[:, idx]
        if i in head_keep:
            w = _select_heads(rest, w, head_keep[i], n_heads, n_kv, _head_dim(teacher.config))
        sd[f"{m.group(1)}{kept.index(i)}.{rest}"] = w.clone()
    student = type(teacher)(cfg).to(torch.float32)
    student.load_state_dict(sd, strict=True)
    student.config.use_cache = False
    return student, record


def _select_heads(rest, w, groups, n_heads, n_kv, hd):
    """Rows of q/k/v (and their biases) and columns of o for the kept key/value groups."""
    import torch

    group = n_heads // n_kv
    q_rows = torch.cat([torch.arange(g * group * hd, (g + 1) * group * hd) for g in groups])
    kv_rows = torch.cat([torch.arange(g * hd, (g + 1) * hd) for g in groups])
    if rest.startswith("self_attn.q_proj."):
        return w[q_rows]
    if rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
        return w[kv_rows]
    if rest == "self_attn.o_proj.weight":
        return w[:, q_rows]
    return w


def _d_ff(cfg):
    return cfg.ffn_dim if cfg.model_type == "opt" else cfg.intermediate_size


def _set_d_ff(cfg, n):
    if cfg.model_type == "opt":
        cfg.ffn_dim = n
    else:
        cfg.intermediate_size = n


def _kv_heads(cfg):
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def _head_dim(cfg):
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


# ---------------------------------------------------------------------------------------------
# LoRA


def _lora_class():
    import torch
    from torch import nn

    class LoRALinear(nn.Module):
        """A frozen linear plus a trainable low-rank update: y = W x + b + scale * B (A x)."""

        def __init__(self, base, rank, alpha, generator=None):
            super().__init__()
            self.base = base
            for p in base.parameters():
                p.requires_grad_(False)
            self.scale = alpha / rank
            a = torch.empty(rank, base.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # as nn.Linear
            self.lora_a = nn.Parameter(a)
            self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

        def forward(self, x):
            return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

        def merged(self):
            with torch.no_grad():
                self.base.weight += self.scale * (self.lora_b @ self.lora_a)
            for p in self.base.parameters():
                p.requires_grad_(True)
            return self.base

    return LoRALinear


def add_lora(model, rank, alpha, seed=0):
    """Wrap every nn.Linear of the decoder layers in a LoRA adapter; freeze everything else.
    Returns the number of trainable parameters."""
    import torch
    from torch import nn

    LoRALinear = _lora_class()
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in decoder_layers(model):
        for name, mod in list(layer.named_modules()):
            for cname, child in list(mod.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(mod, cname, LoRALinear(child, rank, alpha, g))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def freeze_embeddings(model):
    """Stop training the token embedding and the output head (one matrix when tied)."""
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        if emb is not None:
            emb.weight.requires_grad_(False)


def merge_lora(model):
    """Replace every LoRA adapter by its base linear with B A merged into the weight."""
    for layer in decoder_layers(model):
        for name, mod in list(layer.named_modules()):
            for cname, child in list(mod.named_children()):
                if hasattr(child, "lora_a"):
                    setattr(mod, cname, child.merged())
    return model


# ---------------------------------------------------------------------------------------------
# Objective and training


def objective(s_logits, t_logits, targets, temperature, alpha):
    """(loss, kl, ce): alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE, means over tokens."""
    import torch.nn.functional as F

    V = s_logits.shape[-1]
    s = s_logits.reshape(-1, V)
    t = t_logits.reshape(-1, V)
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    ce = F.cross_entropy(s, targets.reshape(-1))
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce, kl, ce


def batches(ids, seq_len, batch, rng):
    """A batch of random windows of seq_len + 1 tokens [batch, seq_len + 1]."""
    import torch

    starts = rng.integers(0, len(ids) - seq_len, size=batch)
    return torch.from_numpy(np.stack([ids[s:s + seq_len + 1] for s in starts]))


def heldout(teacher, student, ids, seq_len):
    """KL(teacher || student) at T = 1 and the student's perplexity over consecutive windows of
    the held-out ids (means over predicted tokens)."""
    import torch

    kl_sum = nll_sum = 0.0
    n = 0
    with torch.no_grad():
        for b in range(0, len(ids) - 1, seq_len):
            w = torch.from_numpy(ids[b:b + seq_len + 1])[None]
            if w.shape[1] < 2:
                break
            x, y = w[:, :-1], w[:, 1:]
            s = student(input_ids=x).logits
            t = teacher(input_ids=x).logits
            _, kl, ce = objective(s, t, y, 1.0, 1.0)
            k = y.numel()
            kl_sum += float(kl) * k
            nll_sum += float(ce) * k
            n += k
    return {"kl": round(kl_sum / n, 6), "ce": round(nll_sum / n, 6),
            "ppl": round(math.exp(nll_sum / n), 4), "tokens": n}


def train(teacher, student, train_ids, opts, progress=True):
    """opts.steps of AdamW on the objective (linear warm-up over the first tenth, then linear
    decay to a tenth of opts.lr). Returns the loss log (every step's loss, kl, ce)."""
    import torch
    from tqdm.auto import tqdm

    rng = np.random.default_rng(opts.seed)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    warm = max(1, opts.steps // 10)

    def lr_at(k):
        if k < warm:
            return (k + 1) / warm
        return 1.0 - 0.9 * (k - warm) / max(1, opts.steps - warm)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    teacher.eval()
    student.train()
    log = []
    bar = tqdm(range(opts.steps), desc="distill", unit="step", disable=not progress)
    for _ in bar:
        w = batches(train_ids, opts.seq_len, opts.batch, rng)
        x, y = w[:, :-1], w[:, 1:]
        with torch.no_grad():
            t = teacher(input_ids=x).logits
        s = student(input_ids=x).logits
        loss, kl, ce = objective(s, t, y, opts.temperature, opts.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        log.append((loss.item(), kl.item(), ce.item()))
        bar.set_postfix(loss=f"{log[-1][0]:.3f}", kl=f"{log[-1][1]:.3f}", ce=f"{log[-1][2]:.3f}")
    student.eval()
    return log


def _loss_summary(log, points=20):
    """A short loss curve for the manifest: means over `points` equal spans of the steps."""
    out = []
    if not log:
        return out
    spans = np.array_split(np.arange(len(log)), min(points, len(log)))
    for sp in spans:
        a = np.asarray([log[k] for k in sp])
        out.append({"steps": [int(sp[0]), int(sp[-1])], "loss": round(float(a[:, 0].mean()), 5),
                    "kl": round(float(a[:, 1].mean()), 5), "ce": round(float(a[:, 2].mean()), 5)})
    return out


# ---------------------------------------------------------------------------------------------
# The command


def distill(teacher, dst, text, student=None, layers=None, keep_layers=None, neurons=None,
            heads=None, options=None, quant="f16", group_size=32, overwrite=False,
            progress=True, command=None):
    """Train a student from teacher on the UTF-8 text file `text`, write it to dst as an edgellm
    model (quant, group_size as `edgellm convert`). student: an existing model to fine-tune
    (healing) instead of a selection from the teacher's weights (layers / keep_layers /
    neurons / heads). Returns the provenance record of the run."""
    from edgellm.evaluate import read_text

    from .convert import convert

    teacher, dst = os.fspath(teacher), os.fspath(dst)
    opts = copy.copy(options or Options()).check()
    if opts.alpha is None:  # healing: match the teacher; a new student: also the text
        opts.alpha = 1.0 if student is not None else 0.5
    quantize.check_quant(quant, group_size)
    if quant == quantize.KEEP:
        raise ConvertError("--quant keep keeps a GGUF file's blocks; a trained student has "
                           "float weights (choose f32, f16, int8, int4 or int3)")
    t_cfg, tok = model_info(teacher, "teacher")
    if student is not None:
        if any(v is not None for v in (layers, keep_layers, neurons, heads)):
            raise ConvertError("--student fine-tunes an existing model: --layers, "
                               "--keep-layers, --neurons and --heads select one from the "
                               "teacher instead; give one or the other")
        s_cfg, _ = model_info(student, "student")
        _refuse_sparse(student)
        if s_cfg["vocab_size"] != t_cfg["vocab_size"]:
            raise ConvertError(f"student {student}: its vocabulary ({s_cfg['vocab_size']}) is "
                               f"not the teacher's ({t_cfg['vocab_size']})")
        plan = None
    else:
        plan = plan_selection(t_cfg, layers, keep_layers, neurons, heads)
    if opts.seq_len > t_cfg["max_context"]:
        raise ConvertError(f"--seq-len {opts.seq_len} is longer than the teacher's context "
                           f"({t_cfg['max_context']})")
    try:
        ids = token_ids(tok, read_text(text))
    except EdgeLLMError as e:  # read_text's error names the file
        raise ConvertError(f"--text: {e}") from None
    if opts.max_tokens:
        ids = ids[:opts.max_tokens]
    train_ids, held_ids = split_tokens(ids, opts.seq_len)
    require_torch()
    writer.check_destination(dst, overwrite, teacher)

    import torch

    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    t0 = time.perf_counter()
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".distill-", dir=parent)
    try:
        t_model, t_hf = load_hf(teacher, work, "teacher")
        t_model.eval()
        for p in t_model.parameters():
            p.requires_grad_(False)
        if student is None:
            rng = np.random.default_rng(opts.seed + 1)
            calib = [batches(train_ids, opts.seq_len, opts.batch, rng)[:, :-1]
                     for _ in range(4)]
            s_model, record = select_student(t_model, plan, calib)
            record["init"] = "weight selection from the teacher"
        else:
            s_model, _ = load_hf(student, work, "student")
            record = {"init": os.path.abspath(student)}
        before = heldout(t_model, s_model, held_ids, opts.seq_len)
        if opts.freeze_embeddings:
            freeze_embeddings(s_model)
        if opts.lora:
            record["lora_trainable_params"] = add_lora(s_model, opts.lora, opts.lora_alpha,
                                                       opts.seed)
        log = train(t_model, s_model, train_ids, opts, progress)
        if opts.lora:
            merge_lora(s_model)
        after = heldout(t_model, s_model, held_ids, opts.seq_len)
        s_hf = os.path.join(work, "student-hf")
        s_model.save_pretrained(s_hf)
        for name in os.listdir(t_hf):  # the tokenizer and its settings, from the teacher
            src = os.path.join(t_hf, name)
            if os.path.isfile(src) and not WEIGHT_FILES.search(name) \
                    and not os.path.exists(os.path.join(s_hf, name)):
                shutil.copy2(src, os.path.join(s_hf, name))
        out = os.path.join(work, "student")
        convert(s_hf, out, quant=quant, group_size=group_size, progress=False)
        m, _ = format.read_manifest(out)
        info = {"teacher": os.path.abspath(teacher),
                "text": os.path.abspath(text),
                "train_tokens": int(len(train_ids)), "heldout_tokens": int(len(held_ids)),
                **record,
                "options": dataclasses.asdict(opts),
                "objective": "alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE",
                "heldout_before": before, "heldout_after": after,
                "losses": _loss_summary(log),
                "seconds": round(time.perf_counter() - t0, 1)}
        prov = dict(m.get("provenance") or {})
        prov.update({"source": os.path.abspath(teacher), "distill": info})
        if command:
            prov["command"] = command
        structural.copy_model(out, dst, overwrite=overwrite, provenance=prov)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return info

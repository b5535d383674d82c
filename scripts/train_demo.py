#!/usr/bin/env python3
"""Train the packaged demo model: a tiny Llama with a ReLU-gated FFN on Jane Austen's novels.

    python scripts/get_demo_text.py        # text -> ~/.cache/edgellm-demo/text
    python scripts/train_demo.py           # model -> ~/.cache/edgellm-demo/hf

Steps: train a sentencepiece BPE tokenizer (byte fallback, so any input encodes) on train.txt;
train transformers' LlamaForCausalLM (hidden_act="relu": down(relu(gate x) * up x), so FFN
activations are really sparse) for a fixed number of steps with a fixed seed; report train and
held-out loss/perplexity and the fraction of FFN neurons that are zero on held-out text; write a
standard Hugging Face directory (config.json, model.safetensors, tokenizer.model,
tokenizer_config.json, generation_config.json) plus train_log.json.

Sparser FFNs (issue 3: streaming reads only the rows a token needs, so fewer active rows means
fewer bytes per token):

    python scripts/train_relu_large.py --init ~/.cache/edgellm-demo/hf-large \
        --out ~/.cache/edgellm-demo/hf-large-sparse --act-l1 1.0 --steps 40 --batch 4 --lr 3e-4 \
        --warmup 3 --seed 4321 --eval-every 1000   # 72% -> 87% zeros, ppl 106.5 -> 111.5

--init DIR starts from an existing HF checkpoint (its config and tokenizer.model are used; the
size options are ignored and no tokenizer is trained) instead of random weights. --act-l1 LAMBDA
adds LAMBDA * (mean over layers of sum relu(g) / sum |g|) to the loss, where g = gate(x) is the
FFN's gate pre-activation over the batch: the share of the gate's mass that is positive. It is an
L1 penalty on relu(g) divided by the mass of g, so that it cannot be met by scaling g down (a
plain L1 on relu(g) can be, by shrinking W_gate or the FFN norm and growing W_up or W_down, which
changes nothing about which neurons fire); it pushes g below zero, i.e. more exact zeros.

torch and transformers are used here only; nothing on the device path imports them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

DEFAULTS = dict(
    vocab_size=4096,
    d_model=256,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    d_ff=1024,
    context=512,
    batch=8,
    steps=400,
    lr=2e-3,
    min_lr_ratio=0.1,
    warmup=30,
    weight_decay=0.1,
    seed=1234,
    threads=1,  # 1 thread beat 2 on the 2 shared cores here (see scripts/README.md)
)


def default_cache() -> Path:
    return Path(os.environ.get("EDGELLM_DEMO_CACHE", Path.home() / ".cache" / "edgellm-demo"))


def train_tokenizer(train_txt: Path, out_dir: Path, vocab_size: int, threads: int) -> Path:
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / "tokenizer"
    # Llama-style settings: BPE, byte fallback, digits split, no normalization, dummy prefix.
    spm.SentencePieceTrainer.train(
        input=str(train_txt),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        character_coverage=1.0,
        max_sentence_length=100000,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=threads,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def encode_file(sp, path: Path) -> list[np.ndarray]:
    """One token array per novel (novels are separated by blank lines in the text files)."""
    docs = path.read_text(encoding="utf-8").strip("\n").split("\n\n")
    return [np.asarray(sp.encode(d), dtype=np.int64) for d in docs]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="train the edgellm demo model")
    ap.add_argument("--cache", type=Path, default=default_cache())
    ap.add_argument("--out", type=Path, default=None, help="HF output dir (default CACHE/hf)")
    for k, v in DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--init", type=Path, default=None,
                    help="start from this HF checkpoint (with its tokenizer.model) instead of "
                         "random weights; the size options are then ignored")
    ap.add_argument("--act-l1", type=float, default=0.0, metavar="LAMBDA",
                    help="activation-sparsity penalty: LAMBDA * mean over layers of "
                         "sum relu(gate x) / sum |gate x| (see the docstring)")
    args = ap.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    import sentencepiece as spm

    cache = args.cache.expanduser()
    out_dir = (args.out or cache / "hf").expanduser()
    text_dir = cache / "text"
    if not (text_dir / "train.txt").exists():
        sys.exit(f"{text_dir}/train.txt missing: run scripts/get_demo_text.py first")

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()

    # ---------------------------------------------------------------- tokenizer and data
    init_dir = args.init.expanduser() if args.init else None
    if init_dir is not None:
        sp_model = init_dir / "tokenizer.model"
        if not sp_model.exists():
            sys.exit(f"--init {init_dir}: no tokenizer.model there")
        if out_dir.resolve() == init_dir.resolve():
            sys.exit(f"--out {out_dir} is the --init checkpoint: write to a new directory")
    else:
        tok_dir = cache / "tokenizer"
        sp_model = train_tokenizer(text_dir / "train.txt", tok_dir, args.vocab_size, args.threads)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    bos, eos = sp.bos_id(), sp.eos_id()
    train_docs = encode_file(sp, text_dir / "train.txt")
    held_docs = encode_file(sp, text_dir / "heldout.txt")
    # one stream, novels separated by EOS; every training window starts with BOS (as inference
    # does), followed by context-1 tokens of running text
    train_stream = np.concatenate([np.append(d, eos) for d in train_docs])
    held_stream = np.concatenate([np.append(d, eos) for d in held_docs])
    n_chars = len((text_dir / "train.txt").read_text(encoding="utf-8"))
    print(f"tokenizer: vocab {sp.get_piece_size()}, train {len(train_stream)} tokens "
          f"({n_chars / len(train_stream):.2f} chars/token), held-out {len(held_stream)} tokens "
          f"[{time.time() - t_start:.0f}s]", flush=True)

    T = args.context
    span = T - 1  # running-text tokens per window; +1 for the shifted target

    def window_batch(stream: np.ndarray, starts) -> torch.Tensor:
        rows = [np.concatenate(([bos], stream[s:s + span])) for s in starts]
        return torch.from_numpy(np.stack(rows))

    gen = np.random.default_rng(args.seed)

    def held_windows(limit=None):
        starts = list(range(0, len(held_stream) - span + 1, span))
        return starts[:limit] if limit else starts

    # ---------------------------------------------------------------- model
    cfg = LlamaConfig(
        vocab_size=sp.get_piece_size(),
        hidden_size=args.d_model,
        intermediate_size=args.d_ff,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        head_dim=args.d_model // args.n_heads,
        hidden_act="relu",
        max_position_embeddings=T,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=None,
        attention_bias=False,
        mlp_bias=False,
    )
    cfg._attn_implementation = "sdpa"
    if init_dir is not None:
        model = LlamaForCausalLM.from_pretrained(init_dir, torch_dtype=torch.float32,
                                                 attn_implementation="sdpa")
        cfg = model.config
        if cfg.vocab_size != sp.get_piece_size() or cfg.max_position_embeddings < T:
            sys.exit(f"--init {init_dir}: vocab {cfg.vocab_size} / context "
                     f"{cfg.max_position_embeddings} do not fit its tokenizer / --context {T}")
        args.d_model, args.n_layers, args.d_ff = (cfg.hidden_size, cfg.num_hidden_layers,
                                                  cfg.intermediate_size)
        args.n_heads, args.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    else:
        model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters (tied embeddings): d_model {args.d_model}, "
          f"{args.n_layers} layers, {args.n_heads} heads / {args.n_kv_heads} kv heads, "
          f"d_ff {args.d_ff}, relu, context {T}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))

    # the sparsity penalty reads each layer's gate pre-activation g (the input of act_fn) while
    # training: sum relu(g) / sum |g| per layer, averaged over layers
    penalty_terms: list = []
    train_zeros: list = []  # the batch's zero fraction per layer, for the log
    if args.act_l1 > 0:
        def penalty_hook(mod, inp, out):
            if mod.training:
                g = inp[0][:, 1:]  # BOS positions excluded, as in the sparsity report
                penalty_terms.append(torch.relu(g).sum() / g.abs().sum().clamp_min(1e-6))
                train_zeros.append(float((g.detach() <= 0).float().mean()))
        for layer in model.model.layers:
            layer.mlp.act_fn.register_forward_hook(penalty_hook)

    @torch.no_grad()
    def evaluate(stream, starts, bs=16):
        model.eval()
        tot, n = 0.0, 0
        for i in range(0, len(starts), bs):
            x = window_batch(stream, starts[i:i + bs])
            logits = model(input_ids=x).logits[:, :-1].float()
            tgt = x[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum")
            tot += loss.item()
            n += tgt.numel()
        model.train()
        return tot / n

    # ---------------------------------------------------------------- train
    history = []
    t_train = time.time()
    ema = None
    tokens_seen = 0
    model.train()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = gen.integers(0, len(train_stream) - span, size=args.batch)
        x = window_batch(train_stream, starts)
        penalty_terms.clear()
        train_zeros.clear()
        ce = model(input_ids=x, labels=x).loss
        loss = ce
        if penalty_terms:
            pen = torch.stack(penalty_terms).mean()
            loss = ce + args.act_l1 * pen
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += x.numel()
        lv = ce.item()  # the language-model loss; the penalty is logged apart
        ema = lv if ema is None else 0.9 * ema + 0.1 * lv
        rec = {"step": step + 1, "loss": round(lv, 4)}
        if penalty_terms:
            rec["positive_mass"] = round(pen.item(), 4)
            rec["zeros"] = round(sum(train_zeros) / len(train_zeros), 4)
        if (step + 1) % args.log_every == 0 or step == 0:
            el = time.time() - t_train
            extra = (f"  positive mass {pen.item():.3f}  zeros {rec['zeros']:.3f}"
                     if penalty_terms else "")
            print(f"step {step + 1:5d}  loss {lv:.3f}  ema {ema:.3f}  lr {lr_at(step):.2e}{extra}  "
                  f"{tokens_seen / el:.0f} tok/s  {el / 60:.1f} min", flush=True)
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            hl = evaluate(held_stream, held_windows(16))
            rec["heldout_loss_subset"] = round(hl, 4)
            print(f"  held-out loss (16 windows) {hl:.3f}  ppl {math.exp(hl):.1f}", flush=True)
        history.append(rec)
    train_time = time.time() - t_train

    # ---------------------------------------------------------------- final evaluation
    eval_rng = np.random.default_rng(args.seed + 1)
    train_starts = list(eval_rng.integers(0, len(train_stream) - span, size=64))
    train_loss = evaluate(train_stream, train_starts)

    # ReLU sparsity, measured during the held-out evaluation: fraction of relu(gate x) entries
    # that are exactly zero (BOS positions excluded)
    zeros = [0] * args.n_layers
    counts = [0] * args.n_layers
    ever = [torch.zeros(args.d_ff, dtype=torch.bool) for _ in range(args.n_layers)]
    hooks = []
    for li, layer in enumerate(model.model.layers):
        def hook(mod, inp, out, li=li):
            a = out.detach()[:, 1:].reshape(-1, out.shape[-1])
            zeros[li] += int((a == 0).sum())
            counts[li] += a.numel()
            ever[li] |= (a > 0).any(0)
        hooks.append(layer.mlp.act_fn.register_forward_hook(hook))
    held_loss = evaluate(held_stream, held_windows())
    for h in hooks:
        h.remove()
    print(f"final: train loss {train_loss:.3f} (ppl {math.exp(train_loss):.1f}), held-out loss "
          f"{held_loss:.3f} (ppl {math.exp(held_loss):.1f}); training {train_time / 60:.1f} min, "
          f"{tokens_seen} tokens ({tokens_seen / len(train_stream):.2f} epochs)", flush=True)
    sparsity = [z / c for z, c in zip(zeros, counts)]
    dead = [1 - float(e.float().mean()) for e in ever]
    print("FFN sparsity on held-out text (fraction of zero activations per token), per layer: "
          + ", ".join(f"{s:.3f}" for s in sparsity)
          + f"; mean {sum(sparsity) / len(sparsity):.3f}; never-active neurons per layer: "
          + ", ".join(f"{d:.3f}" for d in dead), flush=True)

    # ---------------------------------------------------------------- save HF directory
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.save_pretrained(out_dir, safe_serialization=True)
    import shutil
    shutil.copy(sp_model, out_dir / "tokenizer.model")
    tok_cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "legacy": False,
        "model_max_length": T,
        "sp_model_kwargs": {},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")
    log = {
        "source": "Jane Austen's six novels (public domain) via Debian r-cran-janeaustenr; "
                  "scripts/get_demo_text.py",
        "hyperparameters": vars(args) | {"cache": str(cache), "out": str(out_dir),
                                         "init": str(init_dir) if init_dir else None},
        "parameters": n_params,
        "train_tokens": int(len(train_stream)), "heldout_tokens": int(len(held_stream)),
        "tokens_seen": tokens_seen, "train_seconds": round(train_time, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "final_train_loss": round(train_loss, 4), "final_train_ppl": round(math.exp(train_loss), 2),
        "final_heldout_loss": round(held_loss, 4),
        "final_heldout_ppl": round(math.exp(held_loss), 2),
        "ffn_zero_fraction_per_layer": [round(s, 4) for s in sparsity],
        "ffn_zero_fraction_mean": round(sum(sparsity) / len(sparsity), 4),
        "ffn_never_active_fraction_per_layer": [round(d, 4) for d in dead],
        "torch": torch.__version__,
        "history": history,
    }
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")

    # a few samples so the log shows what the model writes
    model.eval()
    for prompt in ["It is a truth universally acknowledged", "Mr. Darcy", "\"My dear,\" said she"]:
        ids = torch.tensor([[bos] + sp.encode(prompt)])
        g = model.generate(ids, max_new_tokens=60, do_sample=False, repetition_penalty=1.1,
                           pad_token_id=eos)
        print(f"[greedy] {sp.decode(g[0, 1:].tolist())!r}", flush=True)
    print(f"wrote {out_dir} [{(time.time() - t_start) / 60:.1f} min total]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

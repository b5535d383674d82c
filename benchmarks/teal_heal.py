"""A sparsity-aware heal for a TEAL model (a script, not a test; nothing is asserted).

The dense int8 model (edgellm directory) is both the teacher and the student's start (exported to
float32 Hugging Face models, converters/distill.py load_hf); the student's forward applies TEAL
thresholds, per layer, to the FFN input (the MLP's input, after its norm) and to the down
projection's input, straight-through (forward: values at or below the threshold zeroed;
backward: identity); distill.train then fits it to the teacher (KL only, alpha 1). The healed
student is saved as a Hugging Face directory (thresholds off), to convert again with
`edgellm convert HF -o DIR --quant int8 --calib TEXT --sparsity S --sparsity-mode teal`
(thresholds calibrated again on the healed weights).

Thresholds: those of a TEAL conversion of the same weights (--thresholds-from MODEL, its
ffn_teal_threshold per layer).

    python benchmarks/teal_heal.py DENSE_INT8 --thresholds-from TEAL_MODEL --text train.txt \
        --out HEALED_HF --steps 100
"""

import argparse
import json
import os
import shutil
import sys
import time


def thresholds_of(path):
    """[(t_in, t_hid)] per layer of a TEAL model directory."""
    import edgellm
    from edgellm.runtime import teal

    rt = edgellm.load(path).runtime
    out = [tuple(float(t) for t in L.ffn.stored) for L in rt.layers
           if isinstance(L.ffn, teal.TealFFN)]
    if len(out) != len(rt.layers):
        raise SystemExit(f"{path}: not every layer has TEAL thresholds")
    return out


def add_thresholds(model, thr):
    """Forward pre-hooks on each decoder layer's MLP and down projection: straight-through
    thresholds. Returns the hook handles."""
    from edgellm.converters import distill

    def ste(x, t):
        return x + (x * (x.abs() > t) - x).detach()

    hooks = []
    for layer, (t_in, t_hid) in zip(distill.decoder_layers(model), thr):
        hooks.append(layer.mlp.register_forward_pre_hook(
            lambda m, a, t=t_in: (ste(a[0], t),)))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, t=t_hid: (ste(a[0], t),)))
    return hooks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="the dense edgellm model (teacher and start of the student)")
    ap.add_argument("--thresholds-from", required=True, help="a TEAL conversion of it")
    ap.add_argument("--text", required=True)
    ap.add_argument("--out", required=True, help="the healed Hugging Face directory")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--max-tokens", type=int, default=40000)
    args = ap.parse_args(argv)

    import torch

    from edgellm.converters import distill
    from edgellm.evaluate import read_text

    torch.set_num_threads(1)
    torch.manual_seed(0)
    thr = thresholds_of(args.thresholds_from)
    opts = distill.Options(steps=args.steps, seq_len=args.seq_len, batch=args.batch, alpha=1.0,
                           lr=args.lr, threads=1, max_tokens=args.max_tokens).check()
    _, tok = distill.model_info(args.model, "teacher")
    ids = distill.token_ids(tok, read_text(args.text))[:args.max_tokens]
    train_ids, held_ids = distill.split_tokens(ids, opts.seq_len)
    work = args.out + ".work"
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    try:
        teacher, t_hf = distill.load_hf(args.model, work, "teacher")
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        student, _ = distill.load_hf(args.model, work, "student")
        hooks = add_thresholds(student, thr)
        rec = {"before": distill.heldout(teacher, student, held_ids, opts.seq_len)}
        log = distill.train(teacher, student, train_ids, opts, progress=False)
        rec["after"] = distill.heldout(teacher, student, held_ids, opts.seq_len)
        for h in hooks:
            h.remove()
        rec["after_without_thresholds"] = distill.heldout(teacher, student, held_ids,
                                                          opts.seq_len)
        student.save_pretrained(args.out)
        for name in os.listdir(t_hf):  # tokenizer files, from the teacher's export
            src = os.path.join(t_hf, name)
            if os.path.isfile(src) and not distill.WEIGHT_FILES.search(name) \
                    and not os.path.exists(os.path.join(args.out, name)):
                shutil.copy2(src, os.path.join(args.out, name))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rec.update(seconds=round(time.perf_counter() - t0, 1), losses=distill._loss_summary(log),
               thresholds=thr, options=vars(args))
    with open(args.out + ".json", "w") as f:
        json.dump(rec, f, indent=1)
    print(json.dumps({k: rec[k] for k in ("before", "after", "after_without_thresholds",
                                          "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Print samples from the demo model: the Hugging Face checkpoint through transformers, and
optionally the converted edgellm model, with a greedy agreement check between the two.

    python scripts/sample_demo.py                                  # ~/.cache/edgellm-demo/hf
    python scripts/sample_demo.py --edgellm edgellm/data/demo      # also the converted model
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PROMPTS = [
    "It is a truth universally acknowledged",
    "Mr. Darcy",
    "\"My dear,\" said she",
    "Emma was",
]


def main(argv=None) -> int:
    cache = Path(os.environ.get("EDGELLM_DEMO_CACHE", Path.home() / ".cache" / "edgellm-demo"))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf", type=Path, default=cache / "hf")
    ap.add_argument("--edgellm", type=Path, default=None, help="converted model directory")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--prompt", action="append", default=None)
    args = ap.parse_args(argv)
    prompts = args.prompt or PROMPTS

    import torch
    import sentencepiece as spm
    from transformers import LlamaForCausalLM

    torch.set_num_threads(2)
    sp = spm.SentencePieceProcessor(model_file=str(args.hf / "tokenizer.model"))
    model = LlamaForCausalLM.from_pretrained(args.hf).eval()
    bos, eos = sp.bos_id(), sp.eos_id()
    greedy_ref = {}
    for prompt in prompts:
        ids = torch.tensor([[bos] + sp.encode(prompt)])
        g = model.generate(ids, max_new_tokens=args.max_tokens, do_sample=False, pad_token_id=eos)
        greedy_ref[prompt] = g[0].tolist()
        print(f"[transformers greedy] {sp.decode(g[0, 1:].tolist())!r}")
        torch.manual_seed(0)
        s = model.generate(ids, max_new_tokens=args.max_tokens, do_sample=True, temperature=0.8,
                           top_k=40, pad_token_id=eos)
        print(f"[transformers T=0.8 top-k 40] {sp.decode(s[0, 1:].tolist())!r}")

    if args.edgellm:
        import numpy as np
        import edgellm

        m = edgellm.load(str(args.edgellm))
        agree = total = 0
        worst = 0.0
        for prompt in prompts:
            text = m.complete(prompt, max_tokens=args.max_tokens, temperature=0.0)
            print(f"[edgellm greedy] {prompt + text!r}")
            # logits of both on the transformers greedy sequence
            seq = greedy_ref[prompt]
            ours = np.asarray(m.logits(seq))
            with torch.no_grad():
                ref = model(input_ids=torch.tensor([seq])).logits[0].float().numpy()
            agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
            total += len(seq)
            worst = max(worst, float(np.abs(ours - ref).max()))
        print(f"edgellm vs transformers on the greedy sequences: top-1 agreement {agree}/{total}, "
              f"max |logit difference| {worst:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

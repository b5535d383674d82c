#!/usr/bin/env python3
"""Train a larger ReLU model with the demo's recipe, for the flash benchmarks (issue 3).

The demo model (scripts/train_demo.py) is 5 MB, too small for a DRAM budget to matter. This is
the same recipe (same text, tokenizer, ReLU-gated Llama, optimizer, schedule, seed) scaled up:
d_model 512, 8 layers, 8 heads of 64 with 4 KV heads, d_ff 2048, context 512: 33.6M parameters
(tied embeddings), 67 MB at f16 (the flash benchmark asks for at least 40 MB), d_ff 2048 neurons
per layer for the predictors and the neuron cache to work with.

    python scripts/get_demo_text.py             # text -> ~/.cache/edgellm-demo/text
    python scripts/train_relu_large.py          # model -> ~/.cache/edgellm-demo/hf-large
    edgellm convert ~/.cache/edgellm-demo/hf-large -o models/relu-large --quant f16 --predictor
    python benchmarks/predictor.py models/relu-large --text ~/.cache/edgellm-demo/text/heldout.txt

Expected time (not measured: estimated from the demo's run): a token costs about 6.8x the
demo's compute (33.6M vs 4.9M parameters in the matrix products), so at the demo's ~1,800
tokens/s on one thread this runs ~265 tokens/s; 600 steps of 8 x 512 tokens (2.46M tokens, 1.5x
the demo's) take about 2.5-3 hours on one thread of these shared cores, roughly half that with
--threads 2 on an idle machine. Any option of train_demo.py can be passed through
(e.g. --steps 300 for a quicker, weaker model).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_demo  # noqa: E402  (the recipe itself; this script only changes its sizes)

LARGE = dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=2048, steps=600, lr=1e-3,
             warmup=60)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = []
    for k, v in LARGE.items():
        flag = "--" + k.replace("_", "-")
        if flag not in argv:
            args += [flag, str(v)]
    if "--out" not in argv:
        args += ["--out", str(train_demo.default_cache() / "hf-large")]
    return train_demo.main(args + argv)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Cut the default calibration text, edgellm/data/calib/austen-calib.txt, from the demo's
training text (run scripts/get_demo_text.py first).

From each of Austen's six novels in train.txt it takes whole paragraphs from the middle of the
novel until CHARS_PER_NOVEL characters, novels in order, separated by a blank line. Only
train.txt is used, so the held-out text (heldout.txt, the last 5% of each novel) stays unseen.

    python scripts/make_calib_text.py [--cache DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

CHARS_PER_NOVEL = 12_000
OUT = Path(__file__).resolve().parent.parent / "edgellm" / "data" / "calib" / "austen-calib.txt"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "EDGELLM_DEMO_CACHE", Path.home() / ".cache" / "edgellm-demo")))
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    train = a.cache.expanduser() / "text" / "train.txt"
    if not train.exists():
        sys.exit(f"{train} missing: run scripts/get_demo_text.py first")
    novels = train.read_text(encoding="utf-8").strip("\n").split("\n\n")
    parts = []
    for novel in novels:
        paras = novel.split("\n")
        i, taken = len(paras) // 2, []
        while i < len(paras) and sum(len(p) + 1 for p in taken) < CHARS_PER_NOVEL:
            taken.append(paras[i])
            i += 1
        parts.append("\n".join(taken))
    text = "\n\n".join(parts) + "\n"
    a.out.write_text(text, encoding="utf-8")
    print(f"wrote {a.out}: {len(text)} chars, sha256 "
          f"{hashlib.sha256(text.encode()).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A minimal app: load a model once, generate from a prompt, read the statistics.

    python examples/minimal.py [MODEL_DIR]      (default: the demo model shipped with edgellm)
"""

import sys

import edgellm
from edgellm.models import demo_model_path

model = edgellm.load(sys.argv[1] if len(sys.argv) > 1 else demo_model_path())
text = model.complete("It is a truth universally acknowledged", max_tokens=40, temperature=0)
print(text)
stats = model.last_stats
print(f"[{stats['generated_tokens']} tokens, finish reason {stats['finish_reason']}]")

"""A chat loop in ten lines: one message per line of stdin (python examples/chat_loop.py [MODEL])."""
import sys

import edgellm
from edgellm.models import demo_model_path

model = edgellm.load(sys.argv[1] if len(sys.argv) > 1 else demo_model_path())
template, cache, messages = model.template(), model.new_cache(), []  # a KV cache per conversation
for line in sys.stdin:
    messages.append({"role": "user", "content": line.strip()})
    answer = ""
    for piece in model.generate(template.render(messages), max_tokens=48, stop=template.stop,
                                cache=cache, temperature=0):  # reuses the cached prefix
        print(piece, end="", flush=True)
        answer += piece
    print()
    messages.append({"role": "assistant", "content": answer.strip()})

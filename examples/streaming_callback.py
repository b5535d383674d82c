"""Streaming with a callback: each piece of text is handed to a function as soon as it is
produced; the callback can stop generation early (here: at the end of the first sentence).

    python examples/streaming_callback.py [MODEL_DIR]
"""

import sys
import time

import edgellm
from edgellm.models import demo_model_path


def generate(model, prompt, on_text, max_tokens=200, **sampling):
    """Call on_text(piece) for every piece of text; stop when it returns False. Returns the
    statistics (token counts, timings, finish reason)."""
    pieces = model.generate(prompt, max_tokens=max_tokens, **sampling)
    for piece in pieces:
        if on_text(piece) is False:
            pieces.close()  # ends the generation now (no further tokens are computed)
            break
    return model.last_stats


def main():
    model = edgellm.load(sys.argv[1] if len(sys.argv) > 1 else demo_model_path())
    start = time.perf_counter()
    first = []

    def on_text(piece):
        if not first:
            first.append(time.perf_counter() - start)
        sys.stdout.write(piece)
        sys.stdout.flush()
        return "." not in piece  # stop after the first sentence

    stats = generate(model, "Mr. Darcy", on_text, temperature=0)
    print(f"\n[stopped after {stats['generated_tokens']} tokens; first text after "
          f"{first[0] * 1e3:.0f} ms]")


if __name__ == "__main__":
    main()

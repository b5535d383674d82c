"""The examples in examples/ run as documented against the demo model, and print what the API
computes when called directly (independent references in this process)."""

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

import edgellm
from edgellm.chat import Conversation
from edgellm.models import demo_model_path
from edgellm.sampling import SamplingParams

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def run_example(name, stdin=None):
    """Run an example as a user would (cwd outside the checkout: the installed package)."""
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, name)], input=stdin,
                       capture_output=True, text=True, timeout=300, cwd=tempfile.gettempdir())
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def demo():
    return edgellm.load(demo_model_path())


def test_every_example_is_tested():
    tested = {"minimal.py", "streaming_callback.py", "chat_loop.py", "conversations.py"}
    assert {f for f in os.listdir(EXAMPLES) if f.endswith(".py")} == tested


def test_minimal(demo):
    out = run_example("minimal.py")
    text = demo.complete("It is a truth universally acknowledged", max_tokens=40, temperature=0)
    n = demo.last_stats["generated_tokens"]
    assert out == f"{text}\n[{n} tokens, finish reason {demo.last_stats['finish_reason']}]\n"


def test_streaming_callback_stops_early(demo):
    out = run_example("streaming_callback.py")
    streamed, _, tail = out.rpartition("\n[stopped after ")
    n = int(re.match(r"(\d+) tokens", tail).group(1))
    full = demo.complete("Mr. Darcy", max_tokens=200, temperature=0)
    assert full.startswith(streamed) and len(streamed) < len(full)
    assert "." in streamed[-8:] and "." not in streamed[:-8]  # at the end of the first sentence
    assert n < 200  # the callback stopped it before max_tokens


def test_chat_loop_prints_the_answers_of_a_cached_conversation(demo):
    """The example's output is what the API gives for the same turns, each turn reusing the
    conversation's cache (that cached answers equal uncached ones is tested in test_chat.py)."""
    questions = ["Hello there.", "Who is Mr Darcy?", "And Elizabeth?"]
    out = run_example("chat_loop.py", stdin="".join(q + "\n" for q in questions))
    template, messages, expected, cache = demo.template(), [], "", demo.new_cache()
    for i, q in enumerate(questions):
        messages.append({"role": "user", "content": q})
        ref = demo.complete(template.render(messages), max_tokens=48, stop=template.stop,
                            temperature=0, cache=cache)
        assert (demo.last_stats["cached_tokens"] > 0) == (i > 0)
        expected += ref + "\n"
        messages.append({"role": "assistant", "content": ref.strip()})
    assert out == expected


def test_conversations_share_a_model_but_not_caches(demo):
    """Threads interleave conversations on one model; each answer equals that conversation run
    alone, and each second turn reuses its own conversation's cache."""
    out = run_example("conversations.py")
    rows = re.findall(r"^(\w+) turn (\d) \(cached (\d+), prefilled (\d+)\): (.*)$", out, re.M)
    assert len(rows) == 6
    got = {(u, int(t)): (int(c), json.loads(a)) for u, t, c, _, a in rows}
    sys.path.insert(0, EXAMPLES)
    try:
        from conversations import USERS
    finally:
        sys.path.remove(EXAMPLES)
    for user, questions in USERS.items():
        conv = Conversation(demo, max_tokens=24, params=SamplingParams(temperature=0))
        for i, q in enumerate(questions, 1):
            answer = "".join(conv.ask(q)).strip()
            assert got[user, i] == (conv.turns[-1]["cached_tokens"], answer)
        assert got[user, 2][0] > 0

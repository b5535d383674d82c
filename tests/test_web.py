"""The chat page of `edgellm serve`, driven in a real browser: Playwright for Python with headless
Chromium (Debian's `chromium`) against a server the test starts with the demo model streaming
from flash under a DRAM budget, and an API key (the page asks for it).

The answers are checked against the library's own greedy generation on the same prompt, the stop
button against the server's counters (the generation is cancelled server-side and the next
request runs), and the Markdown renderer against hostile text in two ways: a conversation in
local storage whose earlier answer holds markup (as a model's answer would), and the renderer's
output parsed by the browser itself. Screenshots go to a temporary folder (printed; set
EDGELLM_WEB_ARTIFACTS to keep them elsewhere).
"""

import json
import os
import re
import shutil
import threading

import pytest

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed (pip install -e '.[test]')")
httpx = pytest.importorskip("httpx", reason="the test extra (httpx) is not installed")
CHROMIUM = os.environ.get("EDGELLM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("no chromium browser (Debian: apt-get install chromium; or set EDGELLM_CHROMIUM)",
                allow_module_level=True)

import edgellm  # noqa: E402
from test_server import DEMO, ServerProcess  # noqa: E402

KEY = "test-key-0123"
BUDGET = "6MB"  # the demo model needs 4.6 MB, the server sets aside 1.3 MB (its tokenizer, 9
# requests): most of its FFN rows stream from flash
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-default-apps", "--disable-extensions"]
DESKTOP = {"width": 1180, "height": 720}
PHONE = {"width": 390, "height": 780}


@pytest.fixture(scope="module")
def booting():
    """Starts the server in a thread, so that the browser and the reference model load while it
    boots; returns a function that waits for it."""
    out = {}

    def boot():
        try:
            # one KV cache: the whole budget goes to the model, as in the reference below
            out["server"] = ServerProcess("--dram-budget", BUDGET, "--kv-slots", "1",
                                          "--api-key", KEY)
        except BaseException as e:  # pytest.fail included: raised again in the test's thread
            out["error"] = e

    thread = threading.Thread(target=boot, daemon=True)
    thread.start()

    def wait():
        thread.join()
        if "error" in out:
            raise out["error"]
        return out["server"]

    yield wait
    thread.join()


@pytest.fixture(scope="module")
def server(booting):
    s = booting()
    yield s
    alive = s.proc.poll() is None
    rc = s.stop()
    assert alive, f"the server died during the tests:\n{s.output()}"
    assert rc == 0, s.output()


@pytest.fixture(scope="module")
def reference(booting):
    """The demo model loaded as the server loads it (greedy text under the same budget, less
    what the server sets aside: server.model_budget)."""
    from edgellm.server import model_budget

    return edgellm.load(DEMO, dram_budget=model_budget(DEMO, BUDGET, kv_slots=1), mmap=False)


@pytest.fixture(scope="module")
def browser(booting):
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    path = os.environ.get("EDGELLM_WEB_ARTIFACTS") or str(tmp_path_factory.mktemp("web"))
    os.makedirs(path, exist_ok=True)
    print(f"\nscreenshots of the chat page: {path}")
    return path


def open_page(browser, server, viewport=DESKTOP, key=True):
    """A fresh browser profile (empty local storage) on the page; key: the API key is already
    stored, as after a first visit."""
    # bypass_csp: the page's Content-Security-Policy forbids the eval Playwright's waiting uses;
    # without it, markup that got past the renderer would also run, so the test sees it
    ctx = browser.new_context(viewport=viewport, bypass_csp=True)
    if key:
        ctx.add_init_script(f"localStorage.setItem('edgellm.apiKey', {json.dumps(KEY)})")
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: m.type == "error" and errors.append(m.text))
    page.goto(server.url + "/")
    return page, errors


def stats(server):
    r = httpx.get(server.url + "/v1/edgellm/stats", timeout=10,
                  headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    return r.json()


def set_field(page, selector, value):
    page.fill(selector, str(value))
    page.dispatch_event(selector, "change")


def stored_conversations(page):
    return page.evaluate("JSON.parse(localStorage.getItem('edgellm.conversations'))")


# ---------------------------------------------------------------------------------------------


def test_api_key_streamed_answer_panel_and_reload(browser, reference, server, artifacts):
    assert f"chat page at {server.url}/;" in server.output()
    page, errors = open_page(browser, server, key=False)
    # the server has a key and the page has none: it says so and opens the key field
    page.wait_for_selector("#notice:not([hidden])")
    assert "API key" in page.inner_text("#notice")
    assert page.is_visible("#api-key")
    set_field(page, "#api-key", KEY)
    page.wait_for_function("document.getElementById('model-name').textContent.includes('demo')")
    assert page.is_hidden("#notice"), page.inner_text("#notice")
    # greedy, a fixed length: the answer must be the library's own text
    set_field(page, "#temperature", 0)
    set_field(page, "#max-tokens", 300)
    question = "Once upon a time"
    before = stats(server)["generations"]
    # the text lengths the answer shows while it streams, recorded in the page as they change
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const el = document.querySelector('.msg.assistant.streaming .body');
            const n = el ? el.textContent.length : 0;
            if (n && window.lengths[window.lengths.length - 1] !== n) window.lengths.push(n);
        }).observe(document.getElementById('messages'),
                   {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#input", question)
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant.streaming")
    # a view mid-answer, once the charts are drawn (unless the answer is over by then)
    page.wait_for_function("""() => !document.querySelector('.msg.assistant.streaming') ||
        document.getElementById('chart-bytes').dataset.points > 0""", polling=10)
    if page.locator(".msg.assistant.streaming").count():
        page.screenshot(path=os.path.join(artifacts, "mid-answer.png"))
    page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=60000)
    seen = page.evaluate("window.lengths")
    assert len(seen) >= 3, f"the text did not arrive in pieces: lengths {seen}"
    page.screenshot(path=os.path.join(artifacts, "answered.png"))

    template = reference.template()
    prompt = template.render([{"role": "user", "content": question}])
    expected = reference.complete(prompt, max_tokens=300, stop=template.stop, temperature=0,
                                  repetition_penalty=1.0)
    convs = stored_conversations(page)
    assert len(convs) == 1
    answer = convs[0]["messages"][1]
    assert convs[0]["messages"][0] == {"role": "user", "content": question}
    assert answer["content"] == expected
    assert "stopped" not in answer and "error" not in answer
    gen = reference.last_stats["generated_tokens"]
    server_now = stats(server)
    assert server_now["generations"] == before + 1
    assert server_now["last"]["state"] == "done"
    assert server_now["last"]["completion_tokens"] == gen == answer["stats"]["completion_tokens"]

    # the panel: this answer's figures, and the flash figures with their charts
    assert re.fullmatch(r"\d+ ms", page.inner_text("#ttft"))
    for fig in ("#prefill", "#decode"):
        assert re.fullmatch(r"\d+\.\d tok/s", page.inner_text(fig)), (answer, server_now)
    assert page.inner_text("#tokens") == str(gen)
    assert re.search(rf"{gen} tokens", page.inner_text(".msg.assistant .meta"))
    assert page.is_visible("#flash") and page.is_hidden("#no-flash")
    flash = server_now["flash"]
    per_token = flash["bytes_read_per_token"]
    # the same generation in the library under the same budget reads the same rows (dense mode)
    ref_flash = reference.last_stats["flash"]
    assert per_token == ref_flash["bytes_read_per_token"] > 0
    assert flash["allocated_bytes"] == ref_flash["allocated_bytes"]
    assert flash["dram_budget_bytes"] == 6_000_000  # the server's plan shows the whole budget
    assert page.inner_text("#bytes-per-token") == f"{per_token / 1e6:.2f} MB"
    assert page.inner_text("#hit-rate") == "none (dense mode)"  # the demo has no predictors
    assert page.inner_text("#budget") == (f"{flash['allocated_bytes'] / 1e6:.2f} / "
                                          f"{flash['dram_budget_bytes'] / 1e6:.2f} MB")
    for chart in ("#chart-bytes", "#chart-mem"):
        assert int(page.get_attribute(chart, "data-points")) >= 2
        assert page.locator(f"{chart} polyline").count() >= 1
    assert page.locator("#chart-mem line.ref").count() == 1  # the budget

    # reload: the conversation, its answer and its figures come back from local storage
    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert page.locator("#conversations li").count() == 1
    assert page.inner_text("#conversations li.current .open") == question
    assert page.inner_text(".msg.user .body") == question
    assert stored_conversations(page)[0]["messages"][1]["content"] == expected
    assert page.inner_text("#tokens") == str(gen)
    assert page.input_value("#temperature") == "0"
    errors = [e for e in errors if "status of 401" not in e]  # the first visit, without the key
    assert not errors, errors
    page.context.close()


def test_stop_cancels_the_generation_on_the_server(browser, reference, server, artifacts):
    page, errors = open_page(browser, server)
    page.wait_for_function("document.getElementById('model-name').textContent.includes('demo')")
    page.click("#toggle-settings")
    set_field(page, "#temperature", 0)  # no end-of-sequence by chance: it would run to the end
    # The demo's whole context (about 490 tokens) takes a second or so: the Stop button is
    # pressed as soon as the first text shows. Should the answer still finish first (a loaded
    # machine), that is no stop to test: a new conversation tries again.
    for attempt in range(3):
        before = server.health()
        page.fill("#input", "Tell me a story about a cat.")
        page.click("#send")
        page.wait_for_function("""() => {
            const el = document.querySelector('.msg.assistant.streaming .body');
            return el && el.textContent.length > 0; }""", polling=5)
        assert page.is_visible("#stop") and page.is_hidden("#send")
        page.click("#stop")
        page.wait_for_selector(".msg.assistant:not(.streaming)")
        after = server.wait_idle(timeout=30)
        if page.locator(".msg.assistant.stopped").count():
            break
        page.click("#new-chat")
    else:
        pytest.fail("every answer ended before the Stop button took effect")
    assert page.inner_text(".msg.assistant .meta").endswith("stopped")
    assert page.is_visible("#send")
    # the server stopped it: not running, counted as cancelled, short of the end
    last = stats(server)["last"]
    assert after["cancelled"] == before["cancelled"] + 1, (before, after, last)
    assert after["completed"] == before["completed"]
    assert last["state"] == "stopped"
    room = reference.n_ctx - last["prompt_tokens"]  # no max_tokens: all of the rest
    assert last["completion_tokens"] < room, last
    print(f"stopped on attempt {attempt + 1} after {last['completion_tokens']} of {room} tokens")
    stopped = stored_conversations(page)[0]["messages"][1]
    assert stopped["stopped"] is True and stopped["content"]
    page.screenshot(path=os.path.join(artifacts, "stopped.png"))

    # the worker is free: the conversation goes on, the stopped text sent as the earlier answer
    set_field(page, "#max-tokens", 8)
    page.fill("#input", "And then?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 2 && "
                           "!document.querySelector('.msg.assistant.streaming')")
    convs = stored_conversations(page)[0]["messages"]
    assert [m["role"] for m in convs] == ["user", "assistant", "user", "assistant"]
    assert "error" not in convs[3] and convs[3]["stats"]["completion_tokens"] >= 1
    assert server.wait_idle()["completed"] == before["completed"] + 1
    assert not errors, errors
    page.context.close()


HOSTILE = ("Here is <script>window.__pwned = 1</script> and "
           "<img src=x onerror=\"window.__pwned = 2\"> **bold <b>x</b>** `<i>code</i>`\n\n"
           "```html\n<script>window.__pwned = 3</script>\n<svg onload=\"window.__pwned = 4\">\n"
           "```\n\n- item <a href=\"javascript:window.__pwned=5\">link</a>\n"
           "- <iframe srcdoc=\"<script>parent.__pwned=6</script>\"></iframe>")


def test_markup_in_answers_is_text_and_phone_layout(browser, server, artifacts):
    # an earlier answer holding markup, as a model could write it, kept in local storage
    conv = {"id": "x1", "title": "markup", "system": "", "updated": 1,
            "messages": [{"role": "user", "content": "<b>show</b> me <script>"},
                         {"role": "assistant", "content": HOSTILE}]}
    page, errors = open_page(browser, server, viewport=PHONE)
    page.evaluate(f"""() => {{
        localStorage.setItem('edgellm.conversations', JSON.stringify([{json.dumps(conv)}]));
        localStorage.setItem('edgellm.current', 'x1'); }}""")
    response = page.reload()
    assert "script-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_selector(".msg.assistant")
    page.wait_for_timeout(200)  # room for an injected handler to run, were there one
    assert page.evaluate("window.__pwned") is None
    box = page.locator("#messages")
    for tag in ("script", "img", "svg", "a", "iframe", "b", "i"):
        assert box.locator(tag).count() == 0, tag
    body = page.inner_text(".msg.assistant .body")
    for text in ("<script>window.__pwned = 1</script>",
                 "<img src=x onerror=\"window.__pwned = 2\">",
                 "<script>window.__pwned = 3</script>",
                 "<a href=\"javascript:window.__pwned=5\">", "<i>code</i>"):
        assert text in body, text
    # the Markdown around it still renders
    assert page.inner_text(".msg.assistant strong") == "bold <b>x</b>"
    assert page.inner_text(".msg.assistant code >> nth=0") == "<i>code</i>"
    assert "<svg onload" in page.inner_text(".msg.assistant pre code")
    assert page.locator(".msg.assistant li").count() == 2
    assert page.inner_text(".msg.user .body") == "<b>show</b> me <script>"

    # the renderer alone, on many hostile strings: the browser's own parser finds only the
    # renderer's tags, no attribute other than its one class, and every character as text
    report = page.evaluate("""(samples) => samples.map((s) => {
        const t = document.createElement('template');
        t.innerHTML = renderMarkdown(s);
        const els = [...t.content.querySelectorAll('*')];
        return {tags: [...new Set(els.map((e) => e.tagName.toLowerCase()))],
                attrs: els.flatMap((e) => [...e.attributes].map((a) => a.name + '=' + a.value)),
                text: t.content.textContent};
    })""", [HOSTILE, "<", "a < b > c & d \"'", "``` \n<x>", "**<b>** *<i>* _<u>_",
            "1. <li>\n2. </ol><script>", "# <h1>head</h1>", "`</code><script>`",
            "&lt;script&gt; stays &amp;lt;", "\u202e<bdo>\u0000</bdo>"])
    # and what it is for: Markdown's common marks
    plain = page.evaluate("""(text) => {
        const t = document.createElement('template');
        t.innerHTML = renderMarkdown(text);
        return [...t.content.querySelectorAll('*')].map((e) => e.tagName.toLowerCase() + ':' +
                                                          e.textContent).join('|');
    }""", "**b** *i* `c` snake_case_name\n\n```\nx < 1\n```\n\n1. one\n2. two")
    assert plain == ("p:b i c snake_case_name|strong:b|em:i|code:c|pre:x < 1|code:x < 1|"
                     "ol:onetwo|li:one|li:two"), plain
    allowed = {"p", "br", "pre", "code", "strong", "em", "ul", "ol", "li"}
    for r in report:
        assert set(r["tags"]) <= allowed, r
        assert set(r["attrs"]) <= {"class=heading"}, r
    assert "a < b > c & d \"'" in report[2]["text"]
    assert "&lt;script&gt; stays &amp;lt;" in report[8]["text"]

    # a phone-sized screen: one column, no sideways scrolling, the panel behind a button
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert page.is_hidden("#panel") and page.is_hidden("#sidebar")
    assert page.is_visible("#input") and page.is_visible("#send")
    page.screenshot(path=os.path.join(artifacts, "phone.png"))
    page.click("#toggle-panel")
    assert page.is_visible("#panel")
    page.screenshot(path=os.path.join(artifacts, "phone-panel.png"))
    assert not errors, errors
    page.context.close()

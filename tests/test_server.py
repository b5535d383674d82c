"""`edgellm serve`, driven as a program would: the real `openai` client and plain httpx against a
server the test starts (`edgellm serve` in a subprocess, the demo model), with the answers checked
against the library's own Model.generate on the same prompt."""

import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

openai = pytest.importorskip("openai", reason="the test extra (openai) is not installed")
httpx = pytest.importorskip("httpx", reason="the test extra (httpx) is not installed")
pytest.importorskip("fastapi", reason="fastapi is not installed")
pytest.importorskip("uvicorn", reason="uvicorn is not installed")

import edgellm  # noqa: E402
from edgellm.cli import demo_model_path  # noqa: E402

DEMO = demo_model_path()
PROMPT = "It is a truth universally acknowledged"
LONG = 480  # tokens: most of the demo's 512-token context, about a second of generation
GREEDY = dict(temperature=0, repetition_penalty=1.0)  # the server's temperature 0: plain argmax


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`edgellm serve DEMO` in a subprocess on a free port; output goes to a temporary file."""

    def __init__(self, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgellm.cli", "serve", DEMO, "--port", str(self.port),
             "--log-level", "warning", *args],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"edgellm serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        pytest.fail(f"edgellm serve did not start:\n{self.output()}")

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def health(self):
        r = httpx.get(self.url + "/health", timeout=10)
        assert r.status_code == 200
        return r.json()

    def wait_idle(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            if not h["running"] and not h["waiting"]:
                return h
            time.sleep(0.02)
        pytest.fail(f"the server is still busy after {timeout} s: {h}")

    def stop(self):
        """Ctrl-C; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server():
    s = ServerProcess()
    yield s
    alive = s.proc.poll() is None
    health = s.health() if alive else None
    rc = s.stop()
    assert alive, f"the server died during the tests:\n{s.output()}"
    assert health["failed"] == 0, f"unexpected generation failures: {health}\n{s.output()}"
    assert rc == 0, s.output()


@pytest.fixture(scope="module")
def model():
    return edgellm.load(DEMO)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def sse_events(response):
    """The data payloads of a server-sent event stream (an httpx streaming response)."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


# ---------------------------------------------------------------------------------------------
# Answers


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["demo"]
    assert client.models.retrieve("demo").id == "demo"
    h = server.health()
    assert h["status"] == "ok" and h["model"] == "demo"
    r = httpx.get(server.url + "/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_openapi_description(server):
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health"):
        assert path in spec["paths"]
    assert "400" in spec["paths"]["/v1/chat/completions"]["post"]["responses"]


def test_completion_at_temperature_0_is_the_librarys_greedy_output(client, model):
    expected = model.complete(PROMPT, max_tokens=40, **GREEDY)
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=40, temperature=0)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(PROMPT))
    assert r.usage.completion_tokens == model.last_stats["generated_tokens"] == 40
    assert r.usage.total_tokens == r.usage.prompt_tokens + 40


def test_chat_at_temperature_0_is_the_librarys_greedy_output(client, model):
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "Who is Mr. Darcy?"}]
    template = model.template()
    prompt = template.render(messages)
    expected = model.complete(prompt, max_tokens=30, stop=template.stop, **GREEDY)
    r = client.chat.completions.create(model="demo", messages=messages, max_tokens=30,
                                       temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == model.last_stats["finish_reason"]
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(prompt))
    assert r.usage.completion_tokens == model.last_stats["generated_tokens"]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_streaming_gives_the_same_text_and_usage(client, chat):
    kw = dict(model="demo", max_tokens=25, temperature=0)
    if chat:
        kw["messages"] = [{"role": "user", "content": PROMPT}]
        whole = client.chat.completions.create(**kw)
        chunks = list(client.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        expected = whole.choices[0].message.content
    else:
        kw["prompt"] = PROMPT
        whole = client.completions.create(**kw)
        chunks = list(client.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        expected = whole.choices[0].text
    assert text == expected and len(chunks) > 3
    last_choice = [c for c in chunks if c.choices][-1].choices[0]
    assert last_choice.finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    u, w = chunks[-1].usage, whole.usage  # cached_tokens differ: the second call reuses the first
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == \
        (w.prompt_tokens, w.completion_tokens, w.total_tokens)


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"prompt": PROMPT, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in chunks[-1]  # only with stream_options.include_usage


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_stop_strings(client, model, stream):
    full = model.complete(PROMPT, max_tokens=40, **GREEDY)
    words = full.split()
    stop = words[len(words) // 2]  # a word from the middle of the greedy answer
    expected = full[:full.find(stop)]
    for stops in (stop, ["no such text", stop]):
        r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=40, temperature=0,
                                      stop=stops, stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert text == expected
        assert finish == "stop"


def test_seed_gives_the_same_text(client, model):
    def sample(seed):
        return client.completions.create(model="demo", prompt=PROMPT, max_tokens=30,
                                         temperature=1.0, seed=seed).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert len({first, sample(8), sample(9)}) > 1  # the seed matters
    # the server's defaults for unset fields are OpenAI's: no top-k/min-p/penalty
    assert first == model.complete(PROMPT, max_tokens=30, temperature=1.0, top_k=0, top_p=1.0,
                                   min_p=0.0, repetition_penalty=1.0, seed=7)


def test_next_chat_turn_reuses_the_kv_cache(client):
    messages = [{"role": "user", "content": "Tell me about the weather."}]
    r1 = client.chat.completions.create(model="demo", messages=messages, max_tokens=20,
                                        temperature=0)
    messages += [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": "And tomorrow?"}]
    r2 = client.chat.completions.create(model="demo", messages=messages, max_tokens=5,
                                        temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    # the whole first prompt (generate runs at least the last token again) and some answer
    assert r1.usage.prompt_tokens - 1 <= cached < r2.usage.prompt_tokens


def test_interleaved_conversations_keep_their_own_kv_cache(client):
    """Two chats taking turns: each turn reuses its own conversation's cache (the pool keeps
    one per conversation) rather than only the prefix the two share."""
    chats = {k: [{"role": "system", "content": "You are helpful."},
                 {"role": "user", "content": f"Tell me about {k}."}] for k in ("cats", "ships")}
    first = {}
    for turn in range(2):
        for k, messages in chats.items():
            r = client.chat.completions.create(model="demo", messages=messages, max_tokens=10,
                                               temperature=0)
            if turn == 0:
                first[k] = r.usage.prompt_tokens
            else:
                assert r.usage.prompt_tokens_details.cached_tokens >= first[k] - 1
            messages += [{"role": "assistant", "content": r.choices[0].message.content},
                         {"role": "user", "content": "Go on."}]


def test_accepted_and_ignored_fields(server):
    body = {"prompt": PROMPT, "max_tokens": 3, "user": "someone", "presence_penalty": 0,
            "frequency_penalty": 0.0, "logit_bias": {}, "n": 1, "best_of": 1, "echo": False,
            "logprobs": None, "unknown_field": {"x": 1}}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


# ---------------------------------------------------------------------------------------------
# Bad input: every malformed request gets a 4xx with OpenAI's error body, and the server stays up

MSG = [{"role": "user", "content": "Hello"}]
OVER = " ".join(["word"] * 600)  # more tokens than the demo's 512-token context

ROUTES = {"chat": "chat/completions"}
BAD = [
    # (id, path, body: dict or raw str, status, code, param)
    ("malformed JSON", "chat", '{"messages": [', 400, "invalid_json", None),
    ("body not an object", "chat", "[1, 2]", 400, "invalid_type", None),
    ("empty body", "chat", "", 400, "missing_required_parameter", None),
    ("missing messages", "chat", {"model": "demo"}, 400, "missing_required_parameter",
     "messages"),
    ("messages not a list", "chat", {"messages": "hi"}, 400, "invalid_type", "messages"),
    ("messages empty", "chat", {"messages": []}, 400, "invalid_value", "messages"),
    ("bad role", "chat", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "invalid_value", "messages[0].role"),
    ("tool role", "chat", {"messages": [{"role": "tool", "content": "x"}]}, 400,
     "invalid_value", "messages[0].role"),
    ("content a number", "chat", {"messages": [{"role": "user", "content": 5}]}, 400,
     "invalid_type", "messages[0].content"),
    ("content missing", "chat", {"messages": [{"role": "user"}]}, 400,
     "missing_required_parameter", "messages[0].content"),
    ("image content", "chat", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "invalid_value",
     "messages[0].content"),
    ("temperature a string", "chat", {"messages": MSG, "temperature": "hot"}, 400,
     "invalid_type", "temperature"),
    ("temperature < 0", "chat", {"messages": MSG, "temperature": -0.5}, 400, "invalid_value",
     "temperature"),
    ("temperature > 2", "chat", {"messages": MSG, "temperature": 3}, 400, "invalid_value",
     "temperature"),
    ("temperature NaN", "completions", '{"prompt": "x", "temperature": NaN}', 400,
     "invalid_value", "temperature"),
    ("top_p 0", "chat", {"messages": MSG, "top_p": 0}, 400, "invalid_value", "top_p"),
    ("top_p > 1", "chat", {"messages": MSG, "top_p": 1.5}, 400, "invalid_value", "top_p"),
    ("max_tokens 0", "chat", {"messages": MSG, "max_tokens": 0}, 400, "invalid_value",
     "max_tokens"),
    ("max_tokens negative", "completions", {"prompt": "x", "max_tokens": -5}, 400,
     "invalid_value", "max_tokens"),
    ("max_tokens a float", "completions", {"prompt": "x", "max_tokens": 1.5}, 400,
     "invalid_type", "max_tokens"),
    ("max_tokens a bool", "completions", {"prompt": "x", "max_tokens": True}, 400,
     "invalid_type", "max_tokens"),
    ("max_tokens above context", "completions", {"prompt": "x", "max_tokens": 100000}, 400,
     "invalid_value", "max_tokens"),
    ("max_completion_tokens 0", "chat", {"messages": MSG, "max_completion_tokens": 0}, 400,
     "invalid_value", "max_completion_tokens"),
    ("stop a number", "completions", {"prompt": "x", "stop": 5}, 400, "invalid_type", "stop"),
    ("five stop strings", "completions", {"prompt": "x", "stop": list("abcde")}, 400,
     "invalid_value", "stop"),
    ("seed a string", "completions", {"prompt": "x", "seed": "s"}, 400, "invalid_type", "seed"),
    ("seed negative", "completions", {"prompt": "x", "seed": -1}, 400, "invalid_value", "seed"),
    ("lone surrogate in prompt", "completions", '{"prompt": "a\\ud800b"}', 400, "invalid_value",
     "prompt"),
    ("lone surrogate in content", "chat", '{"messages": [{"role": "user", "content": '
     '"a\\ud800b"}]}', 400, "invalid_value", "messages[0].content"),
    ("stream a string", "completions", {"prompt": "x", "stream": "yes"}, 400, "invalid_type",
     "stream"),
    ("n = 2", "chat", {"messages": MSG, "n": 2}, 400, "unsupported_value", "n"),
    ("presence_penalty", "chat", {"messages": MSG, "presence_penalty": 0.5}, 400,
     "unsupported_value", "presence_penalty"),
    ("logprobs", "chat", {"messages": MSG, "logprobs": True}, 400, "unsupported_value",
     "logprobs"),
    ("tools", "chat", {"messages": MSG, "tools": [{"type": "function"}]}, 400,
     "unsupported_value", "tools"),
    ("json response_format", "chat", {"messages": MSG, "response_format": {
        "type": "json_object"}}, 400, "unsupported_value", "response_format"),
    ("unknown model", "chat", {"messages": MSG, "model": "gpt-4"}, 404, "model_not_found",
     "model"),
    ("missing prompt", "completions", {"max_tokens": 3}, 400, "missing_required_parameter",
     "prompt"),
    ("empty token list", "completions", {"prompt": []}, 400, "invalid_value", "prompt"),
    ("two prompts", "completions", {"prompt": ["a", "b"]}, 400, "invalid_value", "prompt"),
    ("token id out of range", "completions", {"prompt": [99999]}, 400, "invalid_value",
     "prompt"),
    ("prompt over the context", "completions", {"prompt": OVER}, 400,
     "context_length_exceeded", "prompt"),
    ("messages over the context", "chat", {"messages": [{"role": "user", "content": OVER}]},
     400, "context_length_exceeded", "messages"),
    ("prompt + max_tokens over", "completions", {"prompt": PROMPT, "max_tokens": 510}, 400,
     "context_length_exceeded", "prompt"),
    ("not JSON content type", "completions-form", '{"prompt": "x"}', 400, "invalid_json", None),
    ("unknown URL", "/v1/nothing", {}, 404, "unknown_url", None),
    ("GET on a POST route", "GET /v1/chat/completions", None, 405, "method_not_allowed", None),
]


@pytest.mark.parametrize("name,path,body,status,code,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input(server, name, path, body, status, code, param):
    headers = {"Content-Type": "application/json"}
    if path == "completions-form":
        path, headers = "completions", {"Content-Type": "application/x-www-form-urlencoded"}
    if path.startswith("GET "):
        r = httpx.get(server.url + path[4:], timeout=30)
    else:
        url = server.url + (path if path.startswith("/") else f"/v1/{ROUTES.get(path, path)}")
        raw = body if isinstance(body, str) else json.dumps(body)
        r = httpx.post(url, content=raw.encode(), headers=headers, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and len(err["message"]) > 10
    assert err["type"] == "invalid_request_error"
    assert err["code"] == code and err["param"] == param
    assert server.health()["status"] == "ok"


def test_bad_input_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=MSG, temperature=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt=OVER)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=MSG)


# ---------------------------------------------------------------------------------------------
# Cancellation, the queue, shutdown


def test_disconnected_stream_cancels_its_generation(server, client):
    server.wait_idle()
    before = server.health()
    body = {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # the first token arrived: hang up
    t = time.monotonic()
    after = server.wait_idle()
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]
    assert time.monotonic() - t < 5.0  # freed long before 480 tokens would have been generated
    t = time.monotonic()
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5
    assert time.monotonic() - t < 10.0


def test_disconnected_waiting_request_never_runs(server):
    """A non-streaming request whose client gives up while it waits is dropped from the queue."""
    server.wait_idle()
    before = server.health()
    body = {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # (keep it: a dropped iterator closes the stream)
        next(lines)  # the long one is running
        with pytest.raises(httpx.ReadTimeout):  # the waiting one gives up
            httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 5},
                       timeout=0.2)
    after = server.wait_idle()
    assert after["cancelled"] == before["cancelled"] + 2
    assert after["completed"] == before["completed"]


@pytest.fixture(scope="module")
def small_queue_server():
    s = ServerProcess("--queue-size", "1")
    yield s
    assert s.stop() == 0, s.output()


def test_full_queue_answers_503(small_queue_server):
    s = small_queue_server
    body = {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True}
    waiting = {}
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)

    def second():
        waiting["r"] = httpx.post(s.url + "/v1/completions", timeout=120,
                                  json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0})

    with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)  # the first request runs
        t = threading.Thread(target=second)
        t.start()
        deadline = time.monotonic() + 10
        while s.health()["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        # one running, one waiting: a third is refused at once
        third = httpx.post(s.url + "/v1/completions", json={"prompt": PROMPT}, timeout=10)
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="demo", prompt=PROMPT, max_tokens=3)
    t.join(60)
    assert third.status_code == 503
    assert third.headers["retry-after"] == "1"
    err = third.json()["error"]
    assert err["code"] == "server_busy" and err["type"] == "server_error" and err["message"]
    assert e.value.status_code == 503
    # the waiting request is served once the first one is gone
    assert waiting["r"].status_code == 200
    assert waiting["r"].json()["usage"]["completion_tokens"] == 5
    assert s.wait_idle()["rejected"] == 2


def test_ctrl_c_stops_the_server_during_a_stream():
    s = ServerProcess()
    body = {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        t = time.monotonic()
        s.proc.send_signal(signal.SIGINT)
        # the stream ends (with an error event) instead of running on to its last token
        events = [x[len("data: "):] for x in lines if x.startswith("data: ")]
    assert s.proc.wait(30) == 0
    assert time.monotonic() - t < 15
    assert events and "shutting down" in events[-1]
    out = s.output()
    assert f"edgellm serve: demo at http://127.0.0.1:{s.port}/v1" in out
    assert "edgellm serve: stopped" in out


# ---------------------------------------------------------------------------------------------
# An unexpected failure inside a generation: 500, and the server goes on (in-process server, so
# the fault can be injected into its model)


def test_unexpected_error_is_a_500_and_the_server_keeps_serving(model, monkeypatch):
    import uvicorn

    from edgellm.server import create_app

    real = model.generate
    calls = {"n": 0}

    def failing_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError("injected fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", failing_once)
    port = free_port()
    app = create_app(model, "demo")
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    url = f"http://127.0.0.1:{port}/v1/completions"
    try:
        deadline = time.monotonic() + 30
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        r = httpx.post(url, json={"prompt": PROMPT, "max_tokens": 3}, timeout=30)
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["type"] == "server_error" and err["code"] == "internal_error"
        assert "RuntimeError" in err["message"]
        with httpx.stream("POST", url, json={"prompt": PROMPT, "max_tokens": 3, "stream": True},
                          timeout=30) as s:
            events = sse_events(s)
        assert json.loads(events[-1])["error"]["code"] == "internal_error"
        r = httpx.post(url, json={"prompt": PROMPT, "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert app.state.engine.counts["failed"] == 2
    finally:
        srv.should_exit = True
        th.join(30)
    assert not th.is_alive()


def test_port_in_use_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "edgellm.cli", "serve", DEMO, "--port",
                            str(port), "--log-level", "error"], capture_output=True, text=True,
                           timeout=120, cwd=tempfile.gettempdir())
    assert r.returncode == 1
    assert f"edgellm: error: could not listen on http://127.0.0.1:{port}" in r.stderr

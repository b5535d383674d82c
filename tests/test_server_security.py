"""`edgellm serve` keeps strangers out (issue 9, part 3): loopback by default, an API key on every
/v1 route (constant-time comparison, OpenAI's 401 body), a request body limit (413), limits on
max_tokens, n, stop and the prompt (400 each), chat templates only in Jinja's sandbox, and no
endpoint opening a file the client names. The app runs in-process (Starlette's TestClient) on the
demo model, except one test that starts `edgellm serve` with the key in the environment."""

import inspect
import os
import subprocess
import sys
import tempfile
import time

import pytest

pytest.importorskip("fastapi", reason="fastapi is not installed")
httpx = pytest.importorskip("httpx", reason="the test extra (httpx) is not installed")

from fastapi.testclient import TestClient  # noqa: E402

import edgellm  # noqa: E402
from edgellm import guard, server  # noqa: E402
from edgellm.cli import build_parser, demo_model_path  # noqa: E402

DEMO = demo_model_path()
KEY = "s3cret-key-ü"  # not ASCII: the comparison is on bytes
AUTH = {"Authorization": f"Bearer {KEY}".encode()}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
BOTH = {**CHAT, "prompt": "Hi"}  # a body every /v1 POST route takes (unknown fields are ignored)


@pytest.fixture(scope="module")
def model():
    return edgellm.load(DEMO)


@pytest.fixture(scope="module")
def app(model):
    return server.create_app(model, "demo", api_key=KEY, max_body=4096)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def v1_requests(app):
    """(method, path) for every /v1 route the app describes, path parameters filled in."""
    return [(method.upper(), path.replace("{model_id}", "demo"))
            for path, ops in app.openapi()["paths"].items() if path.startswith("/v1")
            for method in ops]


def assert_openai_error(r, status, code):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["message"] and err["type"] == "invalid_request_error"
    return err


# ---------------------------------------------------------------------------------------------
# Listening address


def test_listens_on_loopback_unless_told_otherwise():
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    assert inspect.signature(server.serve).parameters["host"].default == "127.0.0.1"


# ---------------------------------------------------------------------------------------------
# API key


def test_every_v1_route_needs_the_key(app, client):
    routes = v1_requests(app)
    assert {("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
            ("POST", "/v1/completions")} <= set(routes)
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"
                                                                .encode()},
                        {"Authorization": "Bearer"}, {"Authorization": f"Bearer {KEY}x"
                                                      .encode()}):
            r = client.request(method, path, json=BOTH, headers=headers)
            err = assert_openai_error(r, 401, "invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
            assert ("missing" in err["message"]) == (not headers)
        r = client.request(method, path, json=BOTH, headers=AUTH)
        assert r.status_code == 200, (method, path, r.text)
    # the scheme is case-insensitive (RFC 7235)
    r = client.get("/v1/models", headers={"Authorization": f"bearer {KEY}".encode()})
    assert r.status_code == 200


def test_the_key_covers_paths_spelled_differently_and_routes_added_later(model):
    app = server.create_app(model, "demo", api_key=KEY)

    @app.get("/v1/added-later")
    async def later():
        return {"secret": 1}

    with TestClient(app) as c:
        for path in ("/v1/added-later", "/V1/models", "/v1", "/v1/",
                     "/v1/nothing"):
            assert_openai_error(c.get(path), 401, "invalid_api_key")
        assert c.get("/v1/added-later", headers=AUTH).json() == {"secret": 1}
        # outside /v1 stays public: health checks and the API description
        assert c.get("/health").status_code == 200
        assert c.get("/openapi.json").status_code == 200
    # (an HTTP client reads "//v1/models" as a host name: the check itself)
    assert guard.protected("//v1//models") and guard.protected("/v1")
    assert not guard.protected("/v10") and not guard.protected("/static/v1")


def test_the_key_is_compared_in_constant_time(client, monkeypatch):
    calls = []
    real = guard.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(guard.hmac, "compare_digest", spy)
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/models", headers=AUTH).status_code == 200
    assert calls == [(b"nope", KEY.encode()), (KEY.encode(), KEY.encode())]


def test_no_key_means_no_check(model):
    with TestClient(server.create_app(model, "demo")) as c:
        assert c.get("/v1/models").status_code == 200


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_edgellm_serve_takes_the_key_from_the_environment():
    openai = pytest.importorskip("openai", reason="the test extra (openai) is not installed")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "EDGELLM_API_KEY": "from-env"}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", DEMO, "--port",
                                 str(port), "--log-level", "warning"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, "did not start"
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) \
                    .models.list()
            ok = openai.OpenAI(base_url=url + "/v1", api_key="from-env", max_retries=0)
            r = ok.completions.create(model="demo", prompt="It is", max_tokens=2)
            assert r.usage.completion_tokens == 2
        finally:
            proc.terminate()
            proc.wait(30)
            log.seek(0)
            out = log.read()
    assert "edgellm serve: demo at http://127.0.0.1:" in out, out


# ---------------------------------------------------------------------------------------------
# Body size (the fixture's limit: 4096 bytes)


def test_request_body_limit(client):
    big = {"prompt": "x" * 5000, "max_tokens": 1}
    err = assert_openai_error(client.post("/v1/completions", json=big, headers=AUTH), 413,
                              "request_too_large")
    assert "4096 bytes" in err["message"]

    def chunks():  # no Content-Length: the limit holds while the body arrives
        for _ in range(10):
            yield b'{"prompt": "' + b"x" * 1000
    r = client.post("/v1/completions", content=chunks(), headers={**AUTH,
                    "Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_openai_error(r, 413, "request_too_large")
    # just under the limit: read and answered as usual
    ok = {"prompt": "It is", "max_tokens": 1, "user": "u" * 3900}
    assert len(httpx.Request("POST", "/", json=ok).content) < 4096
    assert client.post("/v1/completions", json=ok, headers=AUTH).status_code == 200
    # a lying Content-Length is refused before anything is read
    r = client.post("/v1/completions", content=b"{}", headers={**AUTH, "Content-Length": "x1"})
    assert r.status_code == 400


# ---------------------------------------------------------------------------------------------
# Limits on the generation parameters


@pytest.mark.parametrize("path,body,param,words", [
    ("/v1/completions", {"prompt": "a", "max_tokens": 100000}, "max_tokens", "512"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 600}, "max_tokens", "context"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 513}, "max_tokens", "context"),
    ("/v1/completions", {"prompt": "a", "n": 2}, "n", "n=1"),
    ("/v1/chat/completions", {**CHAT, "n": 0}, "n", "n=1"),
    ("/v1/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop", "4"),
    ("/v1/completions", {"prompt": "a", "stop": "s" * 257}, "stop", "256"),
    ("/v1/chat/completions", {**CHAT, "stop": ["s" * 257]}, "stop", "256"),
    ("/v1/completions", {"prompt": "a" * 10000}, "prompt", "characters"),
    ("/v1/completions", {"prompt": [1] * 600}, "prompt", "512"),
])
def test_generation_limits_are_400_with_a_clear_message(model, path, body, param, words):
    with TestClient(server.create_app(model, "demo")) as c:  # no key, the default body limit
        r = c.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_prompt_character_limit_is_what_the_context_could_hold(model):
    app = server.create_app(model, "demo")
    limit = app.state.service.max_prompt_chars
    tok = model.tokenizer
    longest = max(len(tok.token_text(i)) for i in range(model.config.vocab_size))
    assert limit == model.n_ctx * longest
    with TestClient(app) as c:
        chat = {"messages": [{"role": "user", "content": "a" * (limit // 2)},
                             {"role": "user", "content": "a" * (limit // 2 + 1)}]}
        err = c.post("/v1/chat/completions", json=chat).json()["error"]
        assert err["param"] == "messages" and f"{limit + 1} characters" in err["message"]
        # at the limit it is tokenized, and refused for its tokens, not its characters
        err = c.post("/v1/completions", json={"prompt": "a " * (limit // 2)}).json()["error"]
        assert "tokens" in err["message"] and "characters" not in err["message"]


# ---------------------------------------------------------------------------------------------
# Chat templates come from model files: rendered only in the sandbox

HOSTILE_TEMPLATES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}{{ messages }}",
    "{% include '/etc/passwd' %}",
    "{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}",
    "{{ 1 // 0 }}",
]


@pytest.mark.parametrize("source", HOSTILE_TEMPLATES)
def test_hostile_chat_template_is_a_400_not_code(model, source, monkeypatch):
    monkeypatch.setattr(model, "chat_template", source)  # as if read from the model's files
    with TestClient(server.create_app(model, "demo")) as c:
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 400, r.text
        assert "chat template" in r.json()["error"]["message"]
        assert "pwned" not in r.text and "root:" not in r.text
        assert c.post("/v1/completions", json={"prompt": "It is", "max_tokens": 1}) \
            .status_code == 200  # and the server goes on


def test_templates_compile_in_the_immutable_sandbox():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from edgellm.template import ChatTemplate

    assert isinstance(ChatTemplate("{{ 1 }}")._template.environment,
                      ImmutableSandboxedEnvironment)
    assert isinstance(ChatTemplate(None)._template.environment, ImmutableSandboxedEnvironment)


# ---------------------------------------------------------------------------------------------
# No endpoint opens a file the client names


def test_no_endpoint_opens_a_file_named_in_the_request(model, tmp_path):
    bait = tmp_path / "bait.txt"
    bait.write_text("secret")
    names = [str(bait), "../" * 8 + str(bait).lstrip("/"), f"file://{bait}", "manifest.json",
             "tokenizer.json", "/etc/passwd"]
    opened = []
    watching = [False]

    def hook(event, args):
        if watching[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)  # (cannot be removed: it records only while watching)
    app = server.create_app(model, "demo")
    with TestClient(app) as c:
        for name in names:
            watching[0] = True
            try:
                rs = [c.get(f"/v1/models/{name}"), c.get(f"/{name}"),
                      c.post("/v1/completions", json={"prompt": name, "model": name,
                                                      "user": name, "stop": name}),
                      c.post("/v1/completions", json={"prompt": name, "max_tokens": 1,
                                                      "suffix": "", "user": name}),
                      c.post("/v1/chat/completions", json={
                          "model": "demo", "max_tokens": 1, "user": name, "messages": [
                              {"role": "user", "content": name, "name": name}]})]
            finally:
                watching[0] = False
            assert rs[-1].status_code == 200 and "secret" not in "".join(r.text for r in rs)
    named = [p for p in opened if any(os.path.basename(n) in p for n in names)]
    assert not named, named

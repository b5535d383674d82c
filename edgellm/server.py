"""`edgellm serve`: an OpenAI-compatible HTTP API for one loaded model (FastAPI on uvicorn).

    edgellm serve MODEL --host 127.0.0.1 --port 8080

Routes: POST /v1/chat/completions, POST /v1/completions (streaming as server-sent events or not),
GET /v1/models, GET /v1/models/{id}, GET /health. Errors use OpenAI's body:
{"error": {"message", "type", "param", "code"}}. docs/SERVER.md lists parameters and limits.

How requests share the model: the Engine owns one worker thread, the only thread that runs the
model. Each request becomes a Job in a bounded queue (full: 503). The worker iterates
Model.generate and hands each text piece to the request's asyncio queue with
call_soon_threadsafe; a request whose client goes away sets the job's cancel flag and the worker
stops at its next piece. KV caches come from a small pool (KVPool), chosen by common prefix, so a
conversation continued through the API only runs its new tokens.
"""

import asyncio
import json
import logging
import os
import queue
import threading
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .runtime.errors import ContextLengthError, EdgeLLMError
from .sampling import SamplingParams

log = logging.getLogger("edgellm.server")

DEFAULT_QUEUE = 8  # requests waiting behind the running one
DEFAULT_KV_SLOTS = 4  # KV caches kept for reuse (allocated when first needed)
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context
MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_STOP_CHARS = 256  # each stop string is searched for in the text's tail after every token

# Server-side defaults follow OpenAI's meaning of an absent field: plain sampling at temperature 1,
# no truncation, no penalty (not the CLI's defaults, which suit a person typing prompts).
API_SAMPLING = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0)


# ---------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status, message, param=None, code=None, type="invalid_request_error",
                 headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)
        self.headers = headers

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self):
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def busy_error():
    return APIError(503, "the server is busy: too many requests are waiting; retry later",
                    code="server_busy", type="server_error", headers={"Retry-After": "1"})


def error_for(exc):
    """The APIError for an exception raised while generating."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, EdgeLLMError):
        return APIError(400, str(exc), code="invalid_value")
    return APIError(500, f"internal error ({type(exc).__name__}); the server keeps running",
                    code="internal_error", type="server_error")


def _param(loc):
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def validation_error(errors):
    """One OpenAI error from pydantic's list: the first field that failed. A union that fails
    reports one error per member; they share the field's location, which becomes the param."""
    errors = list(errors)
    first = errors[0]
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({detail})", code="invalid_json")
    field = tuple(first["loc"][:2])
    group = [e for e in errors if tuple(e["loc"][:2]) == field]
    loc = list(group[0]["loc"])
    for e in group[1:]:
        n = 0
        while n < min(len(loc), len(e["loc"])) and loc[n] == e["loc"][n]:
            n += 1
        loc = loc[:n]
    if loc and loc[0] == "body":
        loc = loc[1:]
    param = _param(loc)
    kinds = {e["type"] for e in group}
    if kinds == {"missing"}:
        what = f"'{param}'" if param else "the request body"
        return APIError(400, f"missing required parameter: {what}", param=param,
                        code="missing_required_parameter")
    if param is None and isinstance(first.get("input"), (bytes, str)):
        return APIError(400, "the request body must be JSON, sent with Content-Type: "
                        "application/json", code="invalid_json")
    specific = [e for e in group if not e["type"].endswith(("_type", "_parsing"))]
    if specific and len(specific) < len(group):  # a union member that got past the type check
        group, kinds = specific, {e["type"] for e in specific}
    msgs = " or ".join(dict.fromkeys(e["msg"][0].lower() + e["msg"][1:] for e in group))
    got = repr(group[0].get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    code = ("invalid_type" if all(k.endswith(("_type", "_parsing")) for k in kinds)
            else "invalid_value")
    name = f"'{param}'" if param else "request body"
    return APIError(400, f"invalid {name}: {msgs} (got {got})", param=param, code=code)


# ---------------------------------------------------------------------------------------------
# Request bodies (strict types: "0.5" is not a number; unknown fields are ignored)


def _encodable(text):
    """JSON can carry lone UTF-16 surrogates ("\\ud800"); tokenizers cannot take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode ({e.reason} at index {e.start})") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = None

    def text(self):
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool | None = False


class CommonRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    model: str | None = Field(None, description="the served model's id (default: that one)")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Annotated[str, Field(max_length=MAX_STOP_CHARS)] | \
        Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]],
                  Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, description="only 1 is supported")
    user: str | None = None
    # accepted only at their neutral value (see NEUTRAL)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # edgellm's sampler options, as llama.cpp's server also takes them
    top_k: int | None = Field(None, ge=0, description="edgellm extension; 0 = off")
    min_p: float | None = Field(None, ge=0, lt=1, description="edgellm extension; 0 = off")
    repetition_penalty: float | None = Field(None, gt=0, description="edgellm extension")


class ChatRequest(CommonRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(CommonRequest):
    prompt: Text | Annotated[list[int], Field(min_length=1)] | \
        Annotated[list[Text], Field(min_length=1, max_length=1)]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


# Fields taken only at a value that changes nothing: (field, accepted?, what we say otherwise).
NEUTRAL = [
    ("n", lambda v: v in (None, 1), "only n=1 is supported"),
    ("best_of", lambda v: v in (None, 1), "only best_of=1 is supported"),
    ("presence_penalty", lambda v: not v, "presence_penalty is not supported "
     "(use repetition_penalty)"),
    ("frequency_penalty", lambda v: not v, "frequency_penalty is not supported "
     "(use repetition_penalty)"),
    ("logit_bias", lambda v: not v, "logit_bias is not supported"),
    ("logprobs", lambda v: not v, "logprobs are not supported"),
    ("top_logprobs", lambda v: not v, "logprobs are not supported"),
    ("echo", lambda v: not v, "echo is not supported"),
    ("suffix", lambda v: not v, "suffix is not supported"),
    ("tools", lambda v: not v, "tools are not supported"),
    ("tool_choice", lambda v: v in (None, "none", "auto"), "tools are not supported"),
    ("response_format", lambda v: not v or v.get("type") == "text",
     "only response_format {\"type\": \"text\"} is supported"),
]


def check_neutral(req):
    for name, ok, message in NEUTRAL:
        if not ok(getattr(req, name, None)):
            raise APIError(400, message, param=name, code="unsupported_value")


# ---------------------------------------------------------------------------------------------
# The worker


class Job:
    """One generation: its inputs, and the asyncio queue its events go to.

    Events (kind, value): ("text", str) for each piece, then ("done", stats) or ("error", exc).
    """

    def __init__(self, ids, max_tokens, stop, params):
        self.ids, self.max_tokens, self.stop, self.params = ids, max_tokens, stop, params
        self.loop = asyncio.get_running_loop()
        self.events = asyncio.Queue()
        self.cancelled = threading.Event()
        self.reason = None

    def cancel(self, reason="cancelled"):
        if not self.cancelled.is_set():
            self.reason = reason
            self.cancelled.set()

    def emit(self, kind, value=None):
        """Called from the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed: nobody is listening
            self.cancel()


class KVPool:
    """A few KV caches reused across requests (only the worker thread touches them).

    Policy: a request continues the cache whose previous prompt its prompt extends (a chat's
    next turn; the longest shared prefix if several); else it gets a new cache while slots
    remain; else the least recently used cache. Model.generate then computes only the tokens
    after the prefix the prompt shares with that cache.
    """

    def __init__(self, model, slots):
        self.model, self.slots = model, max(1, slots)
        self.caches = [model.default_cache]
        self.prompt_len = [0]  # length of the last prompt run on each cache
        self.used = [0.0]

    def pick(self, ids):
        def shared(c):
            n, toks = 0, c.tokens
            m = min(len(toks), len(ids))
            while n < m and toks[n] == ids[n]:
                n += 1
            return n

        common = [shared(c) for c in self.caches]
        continuing = [i for i, n in enumerate(common) if n >= self.prompt_len[i]]
        if continuing:
            best = max(continuing, key=lambda i: common[i])
        elif len(self.caches) < self.slots:
            self.caches.append(self.model.new_cache())
            self.prompt_len.append(0)
            self.used.append(0.0)
            best = len(self.caches) - 1
        else:
            best = min(range(len(self.caches)), key=lambda i: self.used[i])
        self.prompt_len[best] = len(ids)
        self.used[best] = time.monotonic()
        return self.caches[best]


class Engine:
    """One model, one generation at a time, requests waiting in a bounded queue."""

    def __init__(self, model, queue_size=DEFAULT_QUEUE, kv_slots=DEFAULT_KV_SLOTS):
        self.model = model
        self.queue = queue.Queue(maxsize=max(1, queue_size))
        self.pool = KVPool(model, kv_slots)
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self.running = None
        self.stopping = False
        self.thread = threading.Thread(target=self._work, name="edgellm-generate", daemon=True)

    def start(self):
        self.thread.start()

    def submit(self, job):
        if self.stopping:
            raise APIError(503, "the server is shutting down", code="shutting_down",
                           type="server_error")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self.counts["rejected"] += 1
            raise busy_error() from None

    def stop(self, timeout=10.0):
        """Cancel the running and waiting jobs and end the worker."""
        self.stopping = True
        if self.running is not None:
            self.running.cancel("the server is shutting down")
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel("the server is shutting down")
                self._finish_cancelled(job)
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        if self.thread.is_alive():
            self.thread.join(timeout)

    def status(self):
        return {"waiting": self.queue.qsize(), "queue_size": self.queue.maxsize,
                "running": self.running is not None, "kv_slots": len(self.pool.caches),
                "kv_slots_max": self.pool.slots, **self.counts}

    def _work(self):
        while True:
            job = self.queue.get()
            if job is None:
                return
            if self.stopping:
                job.cancel("the server is shutting down")
            if job.cancelled.is_set():  # its client left while it waited, or we are stopping
                self._finish_cancelled(job)
                continue
            self.running = job
            try:
                self._run(job)
            finally:
                self.running = None

    def _finish_cancelled(self, job):
        self.counts["cancelled"] += 1
        job.emit("error", APIError(503, job.reason or "cancelled", code="cancelled",
                                   type="server_error"))

    def _run(self, job):
        try:
            gen = self.model.generate(job.ids, max_tokens=job.max_tokens, stop=job.stop,
                                      params=job.params, cache=self.pool.pick(job.ids))
            try:
                for piece in gen:
                    if job.cancelled.is_set():
                        break
                    job.emit("text", piece)
            finally:
                gen.close()
        except Exception as e:  # the request gets the error; the worker goes on
            if not isinstance(e, EdgeLLMError):
                log.exception("generation failed")
            self.counts["failed"] += 1
            job.emit("error", e)
            return
        if job.cancelled.is_set():
            self._finish_cancelled(job)
            return
        self.counts["completed"] += 1
        s = self.model.last_stats
        job.emit("done", {"prompt_tokens": s["prompt_tokens"],
                          "cached_tokens": s.get("cached_tokens", 0),
                          "completion_tokens": s["generated_tokens"],
                          "finish_reason": s["finish_reason"]})


# ---------------------------------------------------------------------------------------------
# The app


async def disconnected(request):
    """Returns when the client has gone."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def usage_of(stats):
    p, c = stats["prompt_tokens"], stats["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": stats["cached_tokens"]}}


def _sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class Service:
    """Turns validated requests into jobs and jobs into OpenAI responses."""

    def __init__(self, model, name, engine):
        self.model, self.name, self.engine = model, name, engine
        self.template = model.template()
        self.created = int(time.time())
        # Refuse before tokenizing (which runs on the event loop) a prompt with more characters
        # than the context could hold were every token the vocabulary's longest.
        tok = model.tokenizer
        longest = max(len(tok.token_text(i)) for i in range(model.config.vocab_size))
        self.max_prompt_chars = model.n_ctx * max(longest, 1)

    def check_prompt_chars(self, n, param):
        if n > self.max_prompt_chars:
            raise APIError(400, f"the prompt has {n} characters; this server takes at most "
                           f"{self.max_prompt_chars} (the context of {self.model.n_ctx} tokens "
                           "could not hold more)", param=param, code="context_length_exceeded")

    def model_card(self):
        return {"id": self.name, "object": "model", "created": self.created,
                "owned_by": "edgellm", "context_length": self.model.n_ctx}

    def check_model(self, name):
        if name is not None and name != self.name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves "
                           f"'{self.name}'", param="model", code="model_not_found")

    def job(self, req, ids, max_tokens, default_max, stop, prompt_param):
        """Check limits and sampling options; a Job ready for the queue."""
        n_ctx = self.model.n_ctx
        if len(ids) >= n_ctx:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context holds "
                           f"{n_ctx} tokens", param=prompt_param, code="context_length_exceeded")
        if max_tokens is not None and max_tokens > n_ctx:
            raise APIError(400, f"max_tokens is {max_tokens}; the context holds {n_ctx} tokens",
                           param="max_tokens", code="invalid_value")
        if max_tokens is not None and len(ids) + max_tokens > n_ctx:
            raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) "
                           f"exceed this model's context of {n_ctx} tokens",
                           param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max or n_ctx, n_ctx - len(ids))
        user_stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        sampling = {k: getattr(req, k) for k in API_SAMPLING if getattr(req, k) is not None}
        try:
            params = SamplingParams(**{**API_SAMPLING, **sampling, "seed": req.seed})
        except EdgeLLMError as e:
            raise APIError(400, str(e), code="invalid_value") from None
        return Job(ids, max_tokens, list(stop) + user_stop, params)

    def chat_job(self, req):
        check_neutral(req)
        self.check_model(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        self.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
        try:
            prompt = self.template.render(messages)
        except EdgeLLMError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from None
        ids = self.model.tokenizer.encode(prompt)
        max_tokens = req.max_completion_tokens or req.max_tokens
        return self.job(req, ids, max_tokens, None, self.template.stop, "messages")

    def completion_job(self, req):
        check_neutral(req)
        self.check_model(req.model)
        prompt = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], str) \
            else req.prompt
        if isinstance(prompt, str):
            self.check_prompt_chars(len(prompt), "prompt")
            ids = self.model.tokenizer.encode(prompt)
        else:
            vocab = self.model.config.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is out of range 0..{vocab - 1}",
                               param="prompt", code="invalid_value")
            ids = list(prompt)
        return self.job(req, ids, req.max_tokens, COMPLETIONS_MAX_TOKENS, (), "prompt")

    # --- responses ---

    async def respond(self, request, req, job, chat):
        self.engine.submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(request, job, rid, chat, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        text, stats = await self._collect(request, job)
        if text is None:  # the client has gone
            return JSONResponse({}, status_code=499)
        created = int(time.time())
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": stats["finish_reason"]}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None,
                      "finish_reason": stats["finish_reason"]}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": self.name,
                             "choices": [choice], "usage": usage_of(stats)})

    async def _collect(self, request, job):
        """The whole text and stats; (None, None) if the client disconnects first."""

        async def gather():
            parts = []
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    parts.append(value)
                elif kind == "done":
                    return "".join(parts), value
                else:
                    raise value if isinstance(value, Exception) else APIError(500, str(value))

        work = asyncio.ensure_future(gather())
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # the client left (or this handler was cancelled)
                work.cancel()
                job.cancel()
        if not work.done() or work.cancelled():
            return None, None
        if work.exception() is not None:
            raise error_for(work.exception())
        return work.result()

    async def _stream(self, request, job, rid, chat, include_usage):
        # a client that hangs up cancels its job at once, not at the next piece sent to it
        gone = asyncio.ensure_future(disconnected(request))
        gone.add_done_callback(lambda f: f.cancelled() or job.cancel())
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta=None, finish=None, text=None):
            if chat:
                choice = {"index": 0, "delta": delta or {}, "logprobs": None,
                          "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None,
                          "finish_reason": finish}
            out = {"id": rid, "object": obj, "created": created, "model": self.name,
                   "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return _sse(out)

        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            while True:
                # Pieces that queued up while the loop was busy would be written in one burst
                # without yielding to it; when the first write finds the connection reset, asyncio
                # logs "socket.send() raised exception." for each further write. Yielding once
                # per piece lets the lost connection be noticed: uvicorn then drops writes
                # silently, and the job is cancelled (gone).
                await asyncio.sleep(0)
                if gone.done():
                    return
                kind, value = await job.events.get()
                if kind == "text":
                    yield chunk({"content": value}, text=value)
                elif kind == "done":
                    yield chunk(finish=value["finish_reason"])
                    if include_usage:
                        yield _sse({"id": rid, "object": obj, "created": created,
                                    "model": self.name, "choices": [],
                                    "usage": usage_of(value)})
                    yield "data: [DONE]\n\n"
                    return
                else:  # headers are sent: the error travels as an event, as OpenAI's does
                    yield _sse(error_for(value).body())
                    return
        finally:
            gone.cancel()
            job.cancel()  # no-op when finished; stops the worker when the client has gone


def create_app(model, name, queue_size=DEFAULT_QUEUE, kv_slots=DEFAULT_KV_SLOTS, api_key=None,
               max_body=None):
    """The FastAPI app serving a loaded Model under the id `name`. The engine's worker starts
    with the app (lifespan) and stops with it; app.state.engine is the Engine. api_key: every
    /v1 route needs `Authorization: Bearer api_key`; max_body: bytes (default 1 MiB), 413
    beyond (edgellm/guard.py)."""
    from contextlib import asynccontextmanager

    from .guard import DEFAULT_MAX_BODY, Guard

    engine = Engine(model, queue_size=queue_size, kv_slots=kv_slots)
    service = Service(model, name, engine)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    from . import __version__

    # no /docs or /redoc: those pages load their scripts from a CDN
    app = FastAPI(title="edgellm", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None,
                  description="OpenAI-compatible API of edgellm serve (docs/SERVER.md)")
    app.state.engine, app.state.service = engine, service
    errors = {s: {"description": d, "content": {"application/json": {"example": APIError(
        s, d).body()}}} for s, d in [(400, "invalid request"), (404, "unknown model"),
                                    (503, "queue full"), (500, "internal error")]}
    v1 = APIRouter(prefix="/v1", responses=errors)  # the API key: Guard, below

    @app.exception_handler(APIError)
    async def on_api_error(request, exc):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc):
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc):
        if exc.status_code == 404:
            msg, code = f"unknown URL: {request.method} {request.url.path}", "unknown_url"
        elif exc.status_code == 405:
            msg, code = f"method {request.method} not allowed on {request.url.path}", \
                "method_not_allowed"
        else:
            msg, code = str(exc.detail), None
        return APIError(exc.status_code, msg, code=code).response()

    @app.exception_handler(Exception)
    async def on_unexpected(request, exc):
        log.exception("request failed")
        return error_for(exc).response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, **engine.status()}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [service.model_card()]}

    @v1.get("/models/{model_id}")
    async def model_info(model_id: str):
        service.check_model(model_id)
        return service.model_card()

    @v1.post("/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        return await service.respond(request, req, service.chat_job(req), chat=True)

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await service.respond(request, req, service.completion_job(req), chat=False)

    from .web import add_routes  # the chat page at / and its panel's GET /v1/edgellm/stats

    add_routes(app, v1, model, engine, name)
    app.include_router(v1)
    # outside the routes: it covers every route, including ones added after this line
    app.add_middleware(Guard, api_key=api_key, max_body=max_body or DEFAULT_MAX_BODY)
    return app


# ---------------------------------------------------------------------------------------------
# The command


def _url(host, port):
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def request_bytes(n_ctx):
    """Allowance for one request held (running or queued): its body, token ids (up to n_ctx, as
    Python ints in a few lists), the pieces waiting for a slow client and the connection's
    buffers. An allowance, not a ledger: 16 streaming clients on SmolLM2 at 512 positions held
    under 1.5 MB outside the plan, tokenizer and KV caches (benchmarks/serve_budget.py)."""
    return (64 << 10) + 128 * n_ctx



def set_aside(model_path, kv_slots, n_ctx=None, queue_size=DEFAULT_QUEUE):
    """What `serve --dram-budget` sets aside before planning the model, as (part, bytes): the
    pool's other KV caches (the planner counts the model's own), the tokenizer (an estimate) and
    the requests held (REQUEST_BYTES each; the planner covers weights, KV cache, buffers and
    scratch). The process's code (interpreter, libraries, compiled kernels) is the baseline
    outside the budget (docs/SERVER.md)."""
    from .model import DEFAULT_CONTEXT
    from .runtime import format, plan

    path = os.fspath(model_path)
    manifest, config = format.read_manifest(path)
    n = n_ctx or min(config.max_context, DEFAULT_CONTEXT)
    slots = max(1, kv_slots)
    return [(f"{slots - 1} more KV caches ({n} positions)", (slots - 1) * plan.kv_bytes(config, n)),
            ("tokenizer", plan.tokenizer_bytes(path, manifest)),
            (f"requests ({queue_size} queued + 1 running)", (queue_size + 1) * request_bytes(n))]


def model_budget(model_path, dram_budget, kv_slots, n_ctx=None, queue_size=DEFAULT_QUEUE):
    """The DRAM budget left for the model once set_aside's parts are taken out of it."""
    from .runtime import plan

    total = plan.parse_budget(dram_budget)
    parts = set_aside(model_path, kv_slots, n_ctx, queue_size)
    extra = sum(b for _, b in parts)
    if total - extra <= 0:
        raise EdgeLLMError(f"--dram-budget {dram_budget}: "
                           + ", ".join(f"{name} {plan.human(b)}" for name, b in parts)
                           + " already take it; lower --kv-slots or --ctx")
    return total - extra


def serve(model_path, host="127.0.0.1", port=8080, name=None, queue_size=DEFAULT_QUEUE,
          kv_slots=DEFAULT_KV_SLOTS, n_ctx=None, threads=None, log_level="info", api_key=None,
          max_body=None, dram_budget=None, mode=None, mmap="auto"):
    """Load a model and serve it until Ctrl-C (SIGINT) or SIGTERM. dram_budget covers the
    model and all kv_slots KV caches (model_budget). mmap: as edgellm.load's."""
    import uvicorn

    from . import load
    from .cli import weights_text
    from .runtime.plan import human

    stream = {}
    if dram_budget is not None or mode is not None:
        budget = None if dram_budget is None else model_budget(model_path, dram_budget,
                                                                 kv_slots, n_ctx, queue_size)
        stream = {"dram_budget": budget, "mode": mode}
    # auto: chunks read into memory when they fit (edgellm.load's rule), else mapped; a mapped
    # file truncated by another process would kill the server with SIGBUS (docs/SERVER.md)
    model = load(model_path, n_ctx=n_ctx, threads=threads, mmap=mmap, **stream)
    if dram_budget is not None:  # the plan shows all the budget covers, set-aside parts too
        from .runtime.plan import Part, parse_budget

        model.plan.parts += [Part(n, b, "buffer", note="set aside by the server")
                             for n, b in set_aside(model_path, kv_slots, n_ctx, queue_size)]
        model.plan.budget = parse_budget(dram_budget)
    from .cli import warm_up

    warm_up(model)
    name = name or os.path.basename(os.path.normpath(os.fspath(model_path)))
    app = create_app(model, name, queue_size=queue_size, kv_slots=kv_slots, api_key=api_key,
                     max_body=max_body)
    url = _url(host, port)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                kv = model.default_cache.nbytes() / 1e6
                print(f"edgellm serve: {name} at {url}/v1 (n_ctx {model.n_ctx}, queue "
                      f"{queue_size}, up to {kv_slots} KV caches of {kv:.1f} MB); chat page at "
                      f"{url}/; Ctrl-C stops", flush=True)
                print(f"edgellm serve: weights {weights_text(model.weights)}", flush=True)
                if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
                    print(f"warning: listening on {host} with no --api-key: anyone who can reach "
                          "this address can use the model", flush=True)
                if dram_budget is not None:
                    aside = [p for p in model.plan.parts if p.note == "set aside by the server"]
                    print(f"edgellm serve: DRAM budget {human(model.plan.budget)}: plan "
                          f"{human(model.plan.total)}, of which set aside "
                          + ", ".join(f"{p.name} {human(p.nbytes)}" for p in aside), flush=True)

        async def shutdown(self, sockets=None):
            engine = app.state.engine
            engine.stopping = True
            if engine.running is not None:  # open streams end now instead of at their last token
                engine.running.cancel("the server is shutting down")
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5)
    server = Server(config)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after shutting down
        pass
    except SystemExit:  # uvicorn exits this way when it cannot bind (its log says why)
        if server.started:
            raise
    if not server.started:
        raise EdgeLLMError(f"could not listen on {url} (is the port in use?)")
    print("edgellm serve: stopped", flush=True)


def serve_command(a):
    """Body of `edgellm serve` (arguments parsed by cli.py). No MODEL: the default model
    (edgellm.models.resolve_model)."""
    from .cli import load_from_args
    from .models import resolve_model

    serve(resolve_model(a.model), host=a.host, port=a.port, name=a.name,
          queue_size=a.queue_size, kv_slots=a.kv_slots, n_ctx=a.ctx, threads=a.threads,
          log_level=a.log_level, api_key=a.api_key or os.environ.get("EDGELLM_API_KEY") or None,
          max_body=a.max_body, dram_budget=a.dram_budget, mode=a.mode,
          **load_from_args(a))

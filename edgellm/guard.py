"""What `edgellm serve` checks before a request reaches the API: the API key and the body size.

An ASGI middleware, so it covers every route the app has, including routes added later: any
path under /v1 needs `Authorization: Bearer KEY` when a key is set (compared in constant time);
other paths (/health, /openapi.json, the chat page and its static files) stay public. Every body
is read here first, up to max_body bytes (413 beyond, whether or not Content-Length says so),
then handed to the app as one message.
"""

import hmac
import json
import re

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: a full 4096-token context is ~20 kB of text


def _error(status, message, code, headers=()):
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": code}}).encode()
    return status, body, [(b"content-type", b"application/json"),
                          (b"content-length", str(len(body)).encode()), *headers]


def protected(path):
    """True for the API's paths: /v1 and below. Repeated slashes and case do not get around it
    (the router would answer 404 to those anyway, but without asking for the key)."""
    p = re.sub(r"/+", "/", path).lower()
    return p == "/v1" or p.startswith("/v1/")


def authorized(header, key):
    """header: the Authorization header's bytes (or None); key: the API key's bytes."""
    if not header:
        return False
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(token.strip(), key)


class Guard:
    def __init__(self, app, api_key=None, max_body=DEFAULT_MAX_BODY):
        self.app = app
        self.key = api_key.encode("utf-8") if api_key else None
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # ASGI header names are lower case
        if self.key is not None and protected(scope["path"]) and \
                not authorized(headers.get(b"authorization"), self.key):
            given = b"authorization" in headers
            msg = ("invalid API key" if given else
                   "missing API key: send it as the header 'Authorization: Bearer KEY'")
            return await self._answer(send, *_error(
                401, msg, "invalid_api_key", [(b"www-authenticate", b"Bearer")]))
        too_big = _error(413, f"the request body is larger than the server's limit of "
                         f"{self.max_body} bytes (edgellm serve --max-body)", "request_too_large")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            if not length.isdigit():
                return await self._answer(send, *_error(
                    400, "invalid Content-Length header", "invalid_request"))
            return await self._answer(send, *too_big)
        # read the whole body (chunked bodies have no Content-Length to trust)
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await self._answer(send, *too_big)
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(parts), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the client's disconnect, as the app expects

        await self.app(scope, replay, send)

    @staticmethod
    async def _answer(send, status, body, headers):
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

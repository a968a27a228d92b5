"""A small OpenAI-compatible Chat Completions server on 127.0.0.1, for tests.

Point the official ``openai`` SDK at it (``AsyncOpenAI(base_url=server.base_url, api_key=...)``)
and the AI sink, or any plugin that talks to OpenAI, runs its real client code against a real
HTTP server::

    async with OpenAIServer(api_key="sk-test", reply="Hello!") as server:
        client = AsyncOpenAI(base_url=server.base_url, api_key="sk-test")
        answer = await client.chat.completions.create(model="gpt-4o-mini", messages=[...])
        assert server.requests[0]["messages"][-1]["content"] == ...

It speaks ``POST /v1/chat/completions`` (non-streaming) with OpenAI's response shape (``id``,
``object``, ``created``, ``model``, ``choices[0].message``, ``finish_reason``, ``usage``) and its
error shape (``{"error": {"message", "type", "param", "code"}}``): 401 for a wrong or missing key,
400 for a body without ``model`` or ``messages``, and 429 / 500 / 503 on demand
(:meth:`OpenAIServer.fail_next`). ``GET /v1/models`` lists the configured model. An answer may
end otherwise than whole (``finish_reason`` ``length`` or ``content_filter``, a ``refusal``: the
attributes of the same names), and the next answer may be a body that is no JSON at all
(:meth:`OpenAIServer.answer_next_raw`, as a proxy's error page).

Replies: a fixed string (``reply="..."``), a callable receiving the request body and returning the
text, or, by default, an echo of the last user message (``"echo: <text>"``).
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import web

ReplyFn = Callable[[dict[str, Any]], str]

_ERRORS: dict[int, tuple[str, str | None, str]] = {
    # status: (type, code, message)
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key",
          "Incorrect API key provided: {key}. You can find your API key at "
          "https://platform.openai.com/account/api-keys."),
    429: ("requests", "rate_limit_exceeded",
          "Rate limit reached for {model} on requests per min (RPM): Limit 3, Used 3, "
          "Requested 1. Please try again in 20ms."),
    500: ("server_error", None,
          "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


class OpenAIServer:
    """An aiohttp server that answers like OpenAI's Chat Completions endpoint.

    Args:
        api_key: the only key accepted (``Authorization: Bearer <key>``); None accepts any.
        reply: the assistant's text: a string, a callable ``(request_body) -> str``, or None to
            echo the last user message.
        model: reported in ``/v1/models`` (responses echo the requested model).
        delay: seconds to wait before answering (to exercise client timeouts).
        host, port: where to listen (port 0: a free port).

    Attributes:
        requests: every request body received on ``/v1/chat/completions`` (JSON-decoded), in order,
            including the ones answered with an error.
        headers: the request headers of each of those requests.
    """

    def __init__(self, api_key: str | None = "sk-test", reply: str | ReplyFn | None = None,
                 model: str = "gpt-4o-mini", delay: float = 0.0, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.api_key = api_key
        self.reply = reply
        self.model = model
        self.delay = delay
        self.host = host
        self.port = port
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._faults: deque[int] = deque()
        self._raw: deque[tuple[int, bytes, str]] = deque()
        self.finish_reason = "stop"  # of every answer: "length", "content_filter", ...
        self.refusal: str | None = None  # the model's refusal (content then null)
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What to pass as the SDK's ``base_url``: ``http://127.0.0.1:<port>/v1``."""
        return f"{self.url}/v1"

    def fail_next(self, status: int, times: int = 1) -> None:
        """Answer the next ``times`` requests with ``status`` (400, 401, 429, 500 or 503)."""
        if status not in _ERRORS:
            raise ValueError(f"unsupported fault status {status}; choose from {sorted(_ERRORS)}")
        self._faults.extend([status] * times)

    def answer_next_raw(self, body: bytes, content_type: str = "text/html",
                        status: int = 200) -> None:
        """Answer the next request with these bytes as they are (a proxy's page, cut JSON)."""
        self._raw.append((status, body, content_type))

    async def start(self) -> OpenAIServer:
        """Listen on ``host:port`` (a free port when 0)."""
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> OpenAIServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- handlers ------------------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        self.headers.append(dict(request.headers))
        self.requests.append(body if isinstance(body, dict) else {"_invalid": True})
        if self.delay:
            await asyncio.sleep(self.delay)
        key = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if self.api_key is not None and not secrets.compare_digest(key, self.api_key):
            return self._error(401, key=_mask(key))
        if not isinstance(body, dict):
            return self._error(400, message="We could not parse the JSON body of your request.")
        model = body.get("model")
        if self._faults:
            return self._error(self._faults.popleft(), model=model or self.model)
        if self._raw:
            status, raw, content_type = self._raw.popleft()
            return web.Response(status=status, body=raw, content_type=content_type)
        problem = _invalid(body)
        if problem:
            return self._error(400, message=problem[0], param=problem[1])
        text = self._reply_text(body)
        return web.json_response(self._completion(body, text), headers=_ratelimit_headers())

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 1700000000, "owned_by": "system"}]})

    # -- shapes --------------------------------------------------------------------------------

    def _reply_text(self, body: dict[str, Any]) -> str:
        if callable(self.reply):
            return self.reply(body)
        if isinstance(self.reply, str):
            return self.reply
        users = [m for m in body["messages"] if m.get("role") == "user"]
        last = users[-1].get("content") if users else ""
        if isinstance(last, list):  # content parts
            last = " ".join(p.get("text", "") for p in last if isinstance(p, dict))
        return f"echo: {last}"

    def _completion(self, body: dict[str, Any], text: str) -> dict[str, Any]:
        prompt = sum(_tokens(m.get("content")) for m in body["messages"])
        completion = _tokens(text)
        return {
            "id": f"chatcmpl-{secrets.token_hex(12)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": None if self.refusal else text,
                            "refusal": self.refusal, "annotations": []},
                "logprobs": None,
                "finish_reason": self.finish_reason,
            }],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0,
                                              "rejected_prediction_tokens": 0},
            },
            "service_tier": "default",
            "system_fingerprint": f"fp_test{next(self._ids):06d}",
        }

    def _error(self, status: int, *, key: str = "", model: str = "", message: str | None = None,
               param: str | None = None) -> web.Response:
        kind, code, template = _ERRORS[status]
        text = message or template.format(key=key, model=model or self.model)
        headers = {"x-request-id": f"req_{secrets.token_hex(8)}"}
        if status == 429:
            headers.update(_ratelimit_headers(remaining=0))
            headers["retry-after-ms"] = "20"
        return web.json_response(
            {"error": {"message": text, "type": kind, "param": param, "code": code}},
            status=status, headers=headers)


def _invalid(body: dict[str, Any]) -> tuple[str, str | None] | None:
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter", None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array", "messages"
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in (
                "system", "developer", "user", "assistant", "tool"):
            return f"Invalid value for 'messages[{index}].role'", f"messages.[{index}].role"
    if body.get("stream"):
        return "streaming is not supported by this test server", "stream"
    return None


def _tokens(content: Any) -> int:
    """A rough token count (about four characters per token), good enough for ``usage``."""
    if isinstance(content, list):
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return max(1, len(str(content or "")) // 4)


def _ratelimit_headers(remaining: int = 9999) -> dict[str, str]:
    return {"x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": "6ms",
            "openai-processing-ms": "12"}


def _mask(key: str) -> str:
    return f"{key[:3]}{'*' * 8}{key[-4:]}" if len(key) > 8 else "*" * len(key)

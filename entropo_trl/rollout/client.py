"""An async client for OpenAI-compatible chat-completion servers (vLLM, the local stubs in `serve`, hosted APIs).

[`ChatClient.complete`] sends one chat request and returns a [`Completion`]. It retries transient failures
(connection errors, timeouts, HTTP 429 and 5xx) with exponential backoff and jitter, raises [`LLMError`] at once on
other 4xx answers and [`ContextLimitExceeded`] when the conversation cannot fit in the model's context, and keeps
running totals in [`ChatClient.usage`].

Context accounting is deliberately simple: the prompt's size is estimated as (characters / 3) plus a few tokens per
message, unless the caller passes an exact or better count as `prompt_tokens_hint` (for an agent loop, the previous
response's `prompt_tokens + completion_tokens` plus an estimate of the new observation). If that prompt estimate
leaves no room for a single generated token, the request is not sent; otherwise its `max_tokens` is capped to what
is left of `max_context_tokens`. A server that still rejects the request for its length (HTTP 400 saying so) also
raises [`ContextLimitExceeded`].

Several endpoints (replicas of one model, `base_url` a list or `"url1,url2"`): a request with a `session_id` carries
it as the `X-Session-ID` header and goes to the endpoint that rendezvous hashing of the id picks; a failing endpoint
is out of rotation for a while, and [`LLMError`] comes only when every endpoint failed (`rollout/endpoints.py`).

Example::

    async with ChatClient("http://127.0.0.1:8000/v1", "Qwen/Qwen3-8B", max_concurrency=64) as client:
        completion = await client.complete([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=64))
        print(completion.text, completion.finish_reason, client.usage)
    # several replicas: every request of one session to one of them (`completion.endpoint` says which)
    async with ChatClient("http://10.0.0.1:8000/v1,http://10.0.0.2:8000/v1", "Qwen/Qwen3-8B") as client:
        completion = await client.complete(messages, session_id="astropy__astropy-12907/policy/3")
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import certifi

from .endpoints import EndpointPool, parse_endpoints

__all__ = [
    "ChatClient",
    "Completion",
    "ContextLimitExceeded",
    "LLMError",
    "SamplingParams",
    "estimate_prompt_tokens",
]

CHARS_PER_TOKEN = 3.0
"""Characters per token assumed when estimating a prompt's size (conservative for code and English text)."""

TOKENS_PER_MESSAGE = 4
"""Tokens added per message for the chat template's role markers when estimating a prompt's size."""

MAX_BACKOFF = 60.0
"""Longest single wait between retries, in seconds."""

MAX_HEADER_BYTES = 65_536
"""Longest response header line or field accepted."""

CHAT_PATH = "/chat/completions"
"""The chat-completions path under an endpoint's API root."""

SESSION_HEADER = "X-Session-ID"
"""The request header that carries a request's `session_id` (what session-aware routers hash or look up)."""

# phrases in an HTTP 400 body that mean "the prompt plus max_tokens is longer than the model's context"
_CONTEXT_ERROR_MARKERS = (
    "context length",
    "maximum context",
    "context_length",
    "context window",
    "max_model_len",
    "prompt is too long",
)


@dataclass
class SamplingParams:
    """Sampling settings for one request (defaults: the recommended settings of Qwen3-Coder-style instruct models).

    `top_k` and `repetition_penalty` are not OpenAI fields; vLLM (and the local servers in `serve`) read them from
    the top level of the request body. `None` leaves a field out of the request, so the server's default applies.
    """

    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int | None = 20
    repetition_penalty: float | None = 1.05
    max_tokens: int = 16_384
    seed: int | None = None
    stop: list[str] | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):  # one stop string, not its characters
            self.stop = [self.stop]
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (self.top_k < 1 and self.top_k != -1):
            raise ValueError(f"top_k must be >= 1 (or -1 / None for no limit), got {self.top_k}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def to_request(self) -> dict[str, Any]:
        """The request-body fields for these settings (OpenAI fields plus vLLM's top-level extras)."""
        body: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}
        if self.top_k is not None:
            body["top_k"] = self.top_k
        if self.repetition_penalty is not None:
            body["repetition_penalty"] = self.repetition_penalty
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stop:
            body["stop"] = list(self.stop)
        return body


@dataclass
class Completion:
    """One chat completion: the assistant's text and what it cost.

    `finish_reason` is the server's (`"stop"`, `"length"`, ...). `latency` is the wall-clock seconds of the attempt
    that succeeded (retries and backoff waits excluded). `endpoint` is the API root that answered.
    """

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency: float
    logprobs: list[dict] | None = None  # `choices[0].logprobs.content` when the request asked for log-probs
    endpoint: str | None = None


class ContextLimitExceeded(RuntimeError):
    """The conversation does not fit in the model's context (found before sending, or reported by the server)."""


class LLMError(RuntimeError):
    """A request failed for good: a non-retryable answer, retries exhausted, or a response that is not a chat
    completion. `status` is the last HTTP status (`None` for a connection error or timeout) and `body` the start of
    the last response body.

    No model answered, so this says nothing about the model: the rollout runner records no trajectory for an episode
    that ends in one, but a line in the pool's errors file, and runs the episode again on a rerun."""

    def __init__(self, message: str, status: int | None = None, body: str = ""):
        super().__init__(message)
        self.status = status
        self.body = body


def _content_chars(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": ...}, ...]
        return sum(len(part.get("text", "")) if isinstance(part, dict) else len(str(part)) for part in content)
    return len(str(content))


def estimate_prompt_tokens(messages: list[dict]) -> int:
    """A rough prompt size: `CHARS_PER_TOKEN` characters per token plus `TOKENS_PER_MESSAGE` per message."""
    chars = sum(_content_chars(message.get("content")) for message in messages)
    return math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * len(messages)


def _snippet(text: str, limit: int = 500) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class _LoopState:
    loop: asyncio.AbstractEventLoop
    session: aiohttp.ClientSession
    semaphore: asyncio.Semaphore | None
    proxies: dict[str, str | None] = field(default_factory=dict)  # per URL, looked up on its first request


def _env_proxy(url: str) -> str | None:
    """The proxy the environment sets for `url` (`http_proxy` / `https_proxy`, unless `no_proxy` matches)."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies()
    if parts.scheme not in proxies or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxies[parts.scheme]


@dataclass
class _Response:
    """A finished HTTP response, read whole (chat completions are not streamed here)."""

    status_code: int
    headers: Any
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class ChatClient:
    """An async client for `POST {base_url}/chat/completions` on one or several OpenAI-compatible servers.

    Args:
        base_url: the API root, e.g. `"http://127.0.0.1:8000/v1"`; or several, as a list or one comma-separated
            string, serving the same model (see `rollout/endpoints.py` for which one a request goes to).
        model: the model name sent in every request.
        api_key: sent as `Authorization: Bearer ...`; defaults to the `OPENAI_API_KEY` environment variable, and no
            header is sent when neither is set.
        timeout: seconds allowed to connect, and to wait for each read of the response (a whole non-streamed
            completion counts as one wait).
        max_retries: retries after the first attempt for connection errors, timeouts, HTTP 429 and 5xx.
        backoff: the first retry waits `backoff` seconds, then 2x, 4x, ... (capped at `MAX_BACKOFF`), each times a
            random factor in [1, 1.5); a numeric `Retry-After` header makes the wait at least that long.
        max_context_tokens: the model's context length (prompt + completion), used to refuse prompts that cannot fit
            and to cap `max_tokens`.
        max_concurrency: at most this many requests in flight at once (an `asyncio.Semaphore`; `None`: unlimited).
            Backoff waits do not hold a slot.
        endpoint_backoff: seconds an endpoint that failed a request after the retries (no connection, timeouts,
            HTTP 5xx) stays out of rotation; doubled for each outage in a row, up to `endpoint_max_backoff`.
        endpoint_max_backoff: the longest time an endpoint stays out of rotation.

    The client is an async context manager; otherwise call [`aclose`] when done. `usage` holds running totals:
    `prompt_tokens`, `completion_tokens` (as reported by the server), `requests` (successful completions) and
    `retries`.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        model: str,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_context_tokens: int = 65_536,
        max_concurrency: int | None = None,
        endpoint_backoff: float = 30.0,
        endpoint_max_backoff: float = 600.0,
    ):
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1 or None, got {max_concurrency}")
        if max_context_tokens < 1:
            raise ValueError(f"max_context_tokens must be >= 1, got {max_context_tokens}")
        if not timeout > 0:  # aiohttp reads 0 as "no time limit"
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.endpoints = EndpointPool(parse_endpoints(base_url), endpoint_backoff, endpoint_max_backoff)
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY") or None
        if self.api_key is not None and any(c in self.api_key for c in "\r\n"):
            raise ValueError("the API key contains a line break (check OPENAI_API_KEY or api_key)")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_context_tokens = max_context_tokens
        self.max_concurrency = max_concurrency
        self.usage: dict[str, int] = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "retries": 0}
        self._state: _LoopState | None = None

    @property
    def base_url(self) -> str:
        """The first endpoint's API root (the only one, for a client of one endpoint)."""
        return self.endpoints.endpoints[0]

    @base_url.setter
    def base_url(self, value: str | Sequence[str]) -> None:
        self.endpoints = EndpointPool(parse_endpoints(value), self.endpoints.backoff, self.endpoints.max_backoff)

    @property
    def url(self) -> str:
        """The chat-completions URL of the first endpoint."""
        return f"{self.base_url}{CHAT_PATH}"

    @url.setter
    def url(self, value: str) -> None:
        if not value.endswith(CHAT_PATH):
            raise ValueError(f"a chat-completions URL ends with {CHAT_PATH}; got {value!r}")
        self.base_url = value.removesuffix(CHAT_PATH)

    # -- lifecycle -------------------------------------------------------------------------------------------------

    async def _loop_state(self) -> _LoopState:
        # One aiohttp session (its pool hands out idle keep-alive connections in constant time) and one concurrency
        # semaphore, made on first use so that they bind to the running event loop.
        loop = asyncio.get_running_loop()
        state = self._state
        if state is not None and not state.session.closed:
            if state.loop is not loop:
                raise RuntimeError(
                    "this ChatClient is bound to the event loop it first ran in: use one client per event loop "
                    "(`async with ChatClient(...)` inside the coroutine given to asyncio.run), or call aclose() first"
                )
            return state
        ssl_context: ssl.SSLContext | bool = True
        if any(url.startswith("https:") for url in self.endpoints.endpoints):  # loading the CA bundle is slow
            ssl_context = ssl.create_default_context(cafile=certifi.where())
        session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self.api_key}"} if self.api_key else None,
            timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_read=self.timeout),
            connector=aiohttp.TCPConnector(limit=0, ssl=ssl_context),
            max_line_size=MAX_HEADER_BYTES,
            max_field_size=MAX_HEADER_BYTES,
        )
        semaphore = asyncio.Semaphore(self.max_concurrency) if self.max_concurrency is not None else None
        self._state = _LoopState(loop, session, semaphore)
        return self._state

    async def _post(self, state: _LoopState, url: str, payload: bytes, headers: dict[str, str]) -> _Response:
        # the environment's proxy for this endpoint (http(s)_proxy, no_proxy), looked up once: aiohttp's `trust_env`
        # would look it up again on every request, which more than doubles the client's CPU per request
        if url not in state.proxies:
            state.proxies[url] = _env_proxy(url)
        # no redirects: a redirected POST would come back as a GET without its body
        async with state.session.post(
            url, data=payload, headers=headers, allow_redirects=False, proxy=state.proxies[url]
        ) as response:
            return _Response(response.status, response.headers, await response.read())

    async def aclose(self) -> None:
        """Close the underlying HTTP connections (the client can be used again afterwards)."""
        state, self._state = self._state, None
        if state is not None and not state.session.closed:
            await state.session.close()

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    # -- requests --------------------------------------------------------------------------------------------------

    def _request_body(
        self, messages: list[dict], sampling: SamplingParams, prompt_tokens_hint: int | None
    ) -> dict[str, Any]:
        prompt_tokens = prompt_tokens_hint if prompt_tokens_hint is not None else estimate_prompt_tokens(messages)
        room = self.max_context_tokens - prompt_tokens
        if room < 1:
            source = "given" if prompt_tokens_hint is not None else "estimated"
            raise ContextLimitExceeded(
                f"the prompt ({prompt_tokens} tokens, {source}) leaves no room to generate within the "
                f"{self.max_context_tokens}-token context"
            )
        body: dict[str, Any] = {"model": self.model, "messages": messages, **sampling.to_request()}
        body["max_tokens"] = min(sampling.max_tokens, room)
        return body

    def _wait(self, attempt: int, response: _Response | None) -> float:
        wait = min(self.backoff * 2**attempt, MAX_BACKOFF) * (1.0 + 0.5 * random.random())
        if response is not None:
            try:
                wait = max(wait, min(float(response.headers.get("retry-after", 0)), MAX_BACKOFF))
            except ValueError:  # an HTTP date: ignore it
                pass
        return wait

    async def complete(
        self,
        messages: list[dict],
        sampling: SamplingParams | None = None,
        *,
        prompt_tokens_hint: int | None = None,
        extra_body: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> Completion:
        """Send one chat request and return the first choice.

        Args:
            messages: OpenAI-style chat messages (`{"role": ..., "content": ...}`).
            sampling: sampling settings (default: `SamplingParams()`).
            prompt_tokens_hint: the prompt's token count if known (or a better estimate than characters / 3).
            extra_body: more request fields, e.g. `{"logprobs": True, "top_logprobs": 20}` (then
                `Completion.logprobs` holds the per-token entries).
            session_id: the conversation this request belongs to (e.g. the episode id): sent as the `X-Session-ID`
                header, and every request of one session goes to the same endpoint while it is in rotation.

        Raises:
            ContextLimitExceeded: the prompt leaves no room to generate, or the server says it is too long.
            LLMError: a non-retryable HTTP error, a malformed response, or retries exhausted on every endpoint.
        """
        sampling = sampling if sampling is not None else SamplingParams()
        body = self._request_body(messages, sampling, prompt_tokens_hint)
        if extra_body:
            body.update(extra_body)
        payload = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if session_id is not None:
            if any(c in session_id for c in "\r\n\0"):
                raise ValueError(
                    f"a session id cannot hold a line break or NUL (it is an HTTP header): {session_id!r}"
                )
            headers[SESSION_HEADER] = session_id
        failures: list[LLMError] = []
        for endpoint in self.endpoints.order(session_id):
            try:
                completion = await self._complete_at(endpoint, payload, headers)
            except LLMError as error:
                if error.status is not None and error.status < 500:  # the endpoint answered: no reason to move
                    raise
                self.endpoints.failed(endpoint)  # no answer, or 5xx, after the retries
                failures.append(error)
                continue
            self.endpoints.succeeded(endpoint)
            return completion
        if len(failures) == 1:
            raise failures[0]
        raise LLMError(
            f"all {len(failures)} endpoints failed the request: " + "; ".join(str(error) for error in failures),
            status=failures[-1].status,
            body=failures[-1].body,
        )

    async def _complete_at(self, endpoint: str, payload: bytes, headers: dict[str, str]) -> Completion:
        """The request sent to one endpoint, retried on connection errors, timeouts, HTTP 429 and 5xx."""
        url = f"{endpoint}{CHAT_PATH}"
        attempt = 0
        while True:
            response: _Response | None = None
            failure: str
            start = time.perf_counter()
            try:
                state = await self._loop_state()
                if state.semaphore is not None:
                    async with state.semaphore:
                        start = time.perf_counter()
                        response = await self._post(state, url, payload, headers)
                else:
                    response = await self._post(state, url, payload, headers)
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:  # refused/reset, timeouts, protocol errors
                failure = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            else:
                latency = time.perf_counter() - start
                if response.status_code == 200:
                    return self._parse(response, latency, endpoint)
                failure = f"HTTP {response.status_code}: {_snippet(response.text)}"
                if response.status_code != 429 and response.status_code < 500:
                    text = response.text
                    if response.status_code == 400 and any(m in text.lower() for m in _CONTEXT_ERROR_MARKERS):
                        raise ContextLimitExceeded(f"the server rejected the prompt as too long: {_snippet(text)}")
                    raise LLMError(
                        f"request to {url} failed with {failure}", status=response.status_code, body=_snippet(text)
                    )
            if attempt >= self.max_retries:
                status = response.status_code if response is not None else None
                raise LLMError(
                    f"request to {url} failed after {attempt + 1} attempts; last error: {failure}",
                    status=status,
                    body=_snippet(response.text) if response is not None else "",
                )
            await asyncio.sleep(self._wait(attempt, response))
            attempt += 1
            self.usage["retries"] += 1

    def _parse(self, response: _Response, latency: float, endpoint: str) -> Completion:
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            finish_reason = choice.get("finish_reason")
            usage = data.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
            logprobs = (choice.get("logprobs") or {}).get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
            raise LLMError(
                f"malformed chat-completion response from {endpoint}{CHAT_PATH} ({type(error).__name__}: {error}): "
                f"{_snippet(response.text)}",
                status=response.status_code,
                body=_snippet(response.text),
            ) from error
        self.usage["prompt_tokens"] += prompt_tokens
        self.usage["completion_tokens"] += completion_tokens
        self.usage["requests"] += 1
        return Completion(text, finish_reason, prompt_tokens, completion_tokens, latency, logprobs, endpoint)

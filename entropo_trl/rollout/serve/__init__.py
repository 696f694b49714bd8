"""OpenAI-compatible servers for rollouts: vLLM in a subprocess, and two in-process servers for tests and demos.

* [`start_vllm_server`] launches `vllm serve` (its arguments: [`VLLMServerArgs`]) in its own process group and waits
  until it answers; the returned [`ServerHandle`] stops it (the whole group) on `.stop()` or on leaving its `with`
  block. In `serve.vllm`.
* [`serve_transformers`] serves a (tiny) `transformers` model with `model.generate` on a background thread, for
  tests and CPU demos. In `serve.local`.
* [`serve_scripted`] serves replies computed by a Python function of the messages, with an optional per-request
  delay and injected failures, for tests, benchmarks and a scripted teacher. In `serve.local`.

The in-process servers answer `POST /v1/chat/completions` (non-streaming, one choice), `GET /v1/models` and
`GET /health` (HTTP/1.1 with keep-alive). They accept any `model` name in a request. Concurrent requests run in
parallel on a bounded pool of threads (`MAX_WORKERS`); idle keep-alive connections wait without a thread, and at most
`MAX_CONNECTIONS` are open. A body over `MAX_REQUEST_BYTES` is answered 413, a missing or malformed `Content-Length`
400, a body that does not arrive within `REQUEST_TIMEOUT` seconds 408 (these close the connection). These limits live
in `serve.openai_http`, which reads them when a server starts. The last `keep_requests` chat request bodies are kept in
`handle.requests`, for tests.
"""

from .base import ServerHandle, ServerStartError, wait_until_healthy
from .local import DEFAULT_MAX_TOKENS, serve_scripted, serve_transformers
from .openai_http import (
    KEEPALIVE_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_REQUEST_BYTES,
    MAX_WORKERS,
    REQUEST_TIMEOUT,
    StubHTTPError,
)
from .vllm import VLLMServerArgs, start_vllm_server, vllm_serve_command

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "KEEPALIVE_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_REQUEST_BYTES",
    "MAX_WORKERS",
    "REQUEST_TIMEOUT",
    "ServerHandle",
    "ServerStartError",
    "StubHTTPError",
    "VLLMServerArgs",
    "serve_scripted",
    "serve_transformers",
    "start_vllm_server",
    "vllm_serve_command",
    "wait_until_healthy",
]

"""The HTTP side of the in-process servers: a bounded HTTP/1.1 server answering the OpenAI chat API with a backend
function, `backend(body) -> Reply`.

It answers `POST /v1/chat/completions` (non-streaming, one choice), `GET /v1/models` and `GET /health`, with
keep-alive. Concurrent requests run on a pool of at most `MAX_WORKERS` threads; idle keep-alive connections wait
without a thread, and at most `MAX_CONNECTIONS` are open. A body over `MAX_REQUEST_BYTES` is answered 413, a missing
or malformed `Content-Length` 400, a body that does not arrive within `REQUEST_TIMEOUT` seconds 408 (these close the
connection). The limits are read from this module when a server starts.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import queue
import re
import selectors
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from .base import ServerHandle

__all__ = ["Reply", "StubHTTPError", "serve_in_thread"]

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 32 << 20
"""The largest request body the in-process servers read (a larger one is answered 413)."""
REQUEST_TIMEOUT = 30.0
"""Seconds an in-process server waits for a request's body (and for each read or write of a request's head and
answer) before it answers 408 or gives the connection up."""
KEEPALIVE_TIMEOUT = 120.0
"""Seconds an idle keep-alive connection stays open (clients drop their own idle ones sooner: aiohttp after 15 s)."""
MAX_WORKERS = 64
"""Threads that handle requests, per in-process server (started as needed)."""
MAX_CONNECTIONS = 256
"""Open connections per in-process server; beyond it the longest-idle one is closed for a new one."""


class StubHTTPError(Exception):
    """Raise from a `respond` function of [`serve_scripted`] to answer with HTTP `status` and an OpenAI-style error
    body carrying `message`."""

    def __init__(self, status: int, message: str = "error"):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@dataclass
class Reply:
    """A backend's answer to one chat request: the completion's text, why it ended, and the token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class _OpenAIServer:
    """An HTTP/1.1 server answering the OpenAI chat API with `backend(body) -> Reply`, with bounded resources.

    One thread (`serve_forever`) accepts connections and watches the idle keep-alive ones with a selector; a connection
    with a request waiting goes to a pool of at most `MAX_WORKERS` threads, which handle one request each and hand
    the connection back. Idle connections hold no thread, and at most `MAX_CONNECTIONS` are open (beyond it the
    longest-idle one is closed for a new one, or the new one if none is idle). Bodies are limited to
    `MAX_REQUEST_BYTES`, reads to `REQUEST_TIMEOUT` seconds, idle connections to `KEEPALIVE_TIMEOUT` seconds; the
    last `keep_requests` chat bodies are kept in `requests`."""

    def __init__(
        self, address: tuple[str, int], backend: Callable[[dict], Reply], model_name: str, keep_requests: int
    ):
        host, port = address
        self.socket = socket.create_server(
            (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=256
        )
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.backend = backend
        self.model_name = model_name
        self.requests: collections.deque[dict] = collections.deque(maxlen=max(0, keep_requests))
        self.requests_lock = threading.Lock()
        self.max_body, self.request_timeout = MAX_REQUEST_BYTES, REQUEST_TIMEOUT
        self.keepalive_timeout, self.max_workers, self.max_connections = (
            KEEPALIVE_TIMEOUT,
            MAX_WORKERS,
            MAX_CONNECTIONS,
        )
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._returned: queue.SimpleQueue[_OpenAIHandler] = queue.SimpleQueue()  # handled, back to idle
        self._idle: dict[_OpenAIHandler, float] = {}  # idle connection -> when it expires (oldest first)
        self._open: set[_OpenAIHandler] = set()  # every open connection: idle, waiting for a worker or handled
        self._open_lock = threading.Lock()
        self._work: queue.SimpleQueue[_OpenAIHandler | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._idle_workers = 0
        self._workers_lock = threading.Lock()
        self._accept_failed = False

    # -- the accepting and idle-watching thread --------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept connections and dispatch their requests until [`stop`]."""
        selector = selectors.DefaultSelector()
        selector.register(self.socket, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                timeout = max(0.0, next(iter(self._idle.values())) - time.monotonic()) if self._idle else None
                for key, _ in selector.select(timeout):
                    if key.fileobj is self.socket:
                        self._accept(selector)
                    elif key.fileobj is self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(4096)
                        while not self._returned.empty():
                            self._make_idle(selector, self._returned.get())
                    elif not self._stopping.is_set():
                        selector.unregister(key.fileobj)
                        del self._idle[key.data]
                        self._submit(key.data)
                now = time.monotonic()
                while self._idle and next(iter(self._idle.values())) <= now:
                    self._close(self._unidle(selector, next(iter(self._idle))))
        finally:
            for handler in list(self._idle):
                self._close(self._unidle(selector, handler))
            while not self._returned.empty():
                self._close(self._returned.get())
            selector.close()

    def _accept(self, selector: selectors.BaseSelector) -> None:
        while True:
            try:
                connection, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # e.g. out of file descriptors: the client waits in the backlog
                log = logger.debug if self._accept_failed else logger.warning
                log("could not accept a connection (%s); trying again shortly", error)
                self._accept_failed = True
                time.sleep(0.1)  # the listening socket stays readable: do not spin on it
                return
            if len(self._open) >= self.max_connections:
                if not self._idle:
                    connection.close()
                    continue
                self._close(self._unidle(selector, next(iter(self._idle))))  # the longest-idle one
            handler = _OpenAIHandler(connection, address, self)
            with self._open_lock:
                self._open.add(handler)
            self._make_idle(selector, handler)

    def _make_idle(self, selector: selectors.BaseSelector, handler: _OpenAIHandler) -> None:
        if self._stopping.is_set():
            self._close(handler)
            return
        self._idle[handler] = time.monotonic() + self.keepalive_timeout
        selector.register(handler.connection, selectors.EVENT_READ, handler)

    def _unidle(self, selector: selectors.BaseSelector, handler: _OpenAIHandler) -> _OpenAIHandler:
        selector.unregister(handler.connection)
        del self._idle[handler]
        return handler

    # -- the workers ---------------------------------------------------------------------------------------------

    def _submit(self, handler: _OpenAIHandler) -> None:
        with self._workers_lock:
            if self._idle_workers:
                self._idle_workers -= 1  # a waiting worker takes it
            elif len(self._workers) < self.max_workers:
                worker = threading.Thread(
                    target=self._work_loop, name=f"openai-server-{self.model_name}-{len(self._workers)}", daemon=True
                )
                self._workers.append(worker)
                worker.start()
            # else every worker is busy: the request waits for the first one to finish
        self._work.put(handler)

    def _work_loop(self) -> None:
        while (handler := self._work.get()) is not None:
            self._handle(handler)
            with self._workers_lock:
                self._idle_workers += 1

    def _handle(self, handler: _OpenAIHandler) -> None:
        """Answer the request waiting on the connection (and any the client pipelined behind it), then hand the
        connection back to the idle set, or close it."""
        try:
            while True:
                handler.close_connection = True  # until a well-formed HTTP/1.1 request says otherwise
                handler.handle_one_request()
                if handler.close_connection or not handler.has_buffered_input():
                    break
        except Exception:
            self.handle_error(handler.request, handler.client_address)
            handler.close_connection = True
        if handler.close_connection or self._stopping.is_set():
            self._close(handler)
            return
        self._returned.put(handler)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full buffer already holds a wake-up
            self._wake_w.send(b"\0")

    def _close(self, handler: _OpenAIHandler) -> None:
        with self._open_lock:
            self._open.discard(handler)
        with contextlib.suppress(OSError):
            handler.finish()
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_WR)
        handler.connection.close()

    def handle_error(self, request, client_address) -> None:
        """Log an unexpected error of a request's handling (a client that went away is not one)."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            return  # the client went away, timed out, or the server is stopping: nothing to report
        logger.exception("error while handling a request from %s", client_address)

    def stop(self, thread: threading.Thread) -> None:
        """Stop accepting, close every connection (unblocking workers in a read) and end the threads."""
        self._stopping.set()
        self._wake()
        thread.join(5)
        with self._open_lock:
            connections = [handler.connection for handler in self._open]
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        with self._workers_lock:
            for _ in self._workers:
                self._work.put(None)
        self.socket.close()
        self._wake_r.close()
        self._wake_w.close()


class _OpenAIHandler(BaseHTTPRequestHandler):
    """One client connection; the server calls `handle_one_request` for each request that arrives on it."""

    server: _OpenAIServer
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    # Headers and body go out in separate writes; without TCP_NODELAY, Nagle's algorithm and the client's delayed ACK
    # add ~40 ms to every keep-alive response.
    disable_nagle_algorithm = True

    def __init__(self, request: socket.socket, client_address, server: _OpenAIServer):
        # not the base class's constructor, which would serve the connection to its end on this thread
        self.request, self.client_address, self.server = request, client_address, server
        self.timeout = server.request_timeout  # each read or write waits at most this long
        self.setup()

    def has_buffered_input(self) -> bool:
        """Whether more input is already here (a pipelined request), perhaps read ahead into `rfile`'s buffer, where
        the server's selector cannot see it."""
        self.connection.settimeout(0)
        try:
            return bool(self.rfile.peek(1))
        except OSError:
            return False
        finally:
            self.connection.settimeout(self.timeout)

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        logger.debug("%s - %s", self.address_string(), format % args)

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, message: str) -> None:
        kind = {
            400: "BadRequestError",
            404: "NotFoundError",
            408: "RequestTimeoutError",
            413: "RequestTooLargeError",
            429: "RateLimitError",
        }.get(status, "InternalServerError")
        self._send_json(status, {"error": {"message": message, "type": kind, "param": None, "code": status}})

    def _refuse(self, status: int, message: str) -> None:
        """Answer an error after which the connection cannot be trusted (where its next request starts is
        unknown): the response says `Connection: close`, then the unread input is drained for a moment, so that
        closing with it unread does not reset the connection before the client reads the answer."""
        self.close_connection = True
        self._send_error(status, message)
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
            deadline, drained = time.monotonic() + 0.5, 0
            while drained < (1 << 20) and (remaining := deadline - time.monotonic()) > 0:
                self.connection.settimeout(remaining)
                chunk = self.rfile.read1(65536)
                if not chunk:
                    break
                drained += len(chunk)

    def _read_body(self) -> bytes | None:
        """The request body, read within `REQUEST_TIMEOUT` seconds; `None` after answering 400 (no valid
        `Content-Length`), 413 (too large) or 408 (not all of it came in time), or when the client left."""
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding"):
            self._refuse(400, "chunked request bodies are not supported: send a Content-Length")
            return None
        if len(set(lengths)) != 1 or not re.fullmatch(r"[0-9]{1,19}", lengths[0].strip()):
            self._refuse(400, f"a POST needs one valid Content-Length header (got {', '.join(lengths) or 'none'})")
            return None
        length = int(lengths[0])
        if length > self.server.max_body:
            self._refuse(413, f"the request body ({length} bytes) is over the limit of {self.server.max_body} bytes")
            return None
        body = bytearray()
        deadline = time.monotonic() + self.timeout
        try:
            while len(body) < length:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self.connection.settimeout(remaining)
                chunk = self.rfile.read1(length - len(body))
                if not chunk:  # the client closed before sending it all: nobody to answer
                    self.close_connection = True
                    return None
                body += chunk
        except TimeoutError:
            self._refuse(
                408, f"the request body did not arrive within {self.timeout:g} s ({len(body)} of {length} bytes)"
            )
            return None
        finally:
            self.connection.settimeout(self.timeout)
        return bytes(body)

    def do_GET(self):  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path == "/v1/models":
            model = {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "entropo-trl"}
            self._send_json(200, {"object": "list", "data": [model]})
        else:
            self._send_error(404, f"no route for GET {path}")

    def do_POST(self):  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0].rstrip("/")
        raw = self._read_body()
        if raw is None:
            return
        if path != "/v1/chat/completions":
            self._send_error(404, f"no route for POST {path}")
            return
        try:
            body = json.loads(raw or b"null")
        except (ValueError, RecursionError) as error:
            self._send_error(400, f"the request body is not JSON: {error}")
            return
        del raw  # not held while the backend runs
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self._send_error(400, "the request body must be a JSON object with a `messages` list")
            return
        with self.server.requests_lock:
            self.server.requests.append(body)
        if body.get("stream"):
            self._send_error(400, "streaming is not supported by this server")
            return
        if body.get("n") not in (None, 1):
            self._send_error(400, "only n=1 is supported by this server")
            return
        try:
            reply = self.server.backend(body)
        except StubHTTPError as error:
            self._send_error(error.status, error.message)
            return
        except Exception as error:  # a bug in a respond function: report it to the client as a 500
            logger.exception("the backend failed on a chat request")
            self._send_error(500, f"{type(error).__name__}: {error}")
            return
        self._send_json(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model") or self.server.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply.text},
                        "finish_reason": reply.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": reply.prompt_tokens,
                    "completion_tokens": reply.completion_tokens,
                    "total_tokens": reply.prompt_tokens + reply.completion_tokens,
                },
            },
        )


def serve_in_thread(
    backend: Callable[[dict], Reply], host: str, port: int, model_name: str, keep_requests: int
) -> ServerHandle:
    """Serve `backend` on `host:port` (port 0: a free port) from a background thread; the handle stops it."""
    server = _OpenAIServer((host, port), backend, model_name, keep_requests)
    thread = threading.Thread(target=server.serve_forever, name=f"openai-server-{model_name}", daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    if bound_host in ("0.0.0.0", ""):
        bound_host = "127.0.0.1"
    elif ":" in bound_host:
        bound_host = f"[{bound_host}]"
    return ServerHandle(
        f"http://{bound_host}:{bound_port}/v1",
        model=model_name,
        requests=server.requests,
        shutdown=lambda: server.stop(thread),
    )

"""OpenAI-compatible servers for rollouts: vLLM in a subprocess, and two in-process servers for tests and demos.

* [`start_vllm_server`] launches `vllm serve` in its own process group and waits until it answers; the returned
  [`ServerHandle`] stops it (the whole group) on `.stop()` or on leaving its `with` block.
* [`serve_transformers`] serves a (tiny) `transformers` model with `model.generate` on a background thread, for
  tests and CPU demos.
* [`serve_scripted`] serves replies computed by a Python function of the messages, with an optional per-request
  delay and injected failures, for tests, benchmarks and a scripted teacher.

The in-process servers answer `POST /v1/chat/completions` (non-streaming, one choice), `GET /v1/models` and
`GET /health` (HTTP/1.1 with keep-alive). They accept any `model` name in a request. Concurrent requests run in
parallel on a bounded pool of threads (`MAX_WORKERS`); idle keep-alive connections wait without a thread, and at most
`MAX_CONNECTIONS` are open. A body over `MAX_REQUEST_BYTES` is answered 413, a missing or malformed `Content-Length`
400, a body that does not arrive within `REQUEST_TIMEOUT` seconds 408 (these close the connection). The last
`keep_requests` chat request bodies are kept in `handle.requests`, for tests.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import logging
import math
import os
import queue
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

__all__ = [
    "ServerHandle",
    "ServerStartError",
    "StubHTTPError",
    "serve_scripted",
    "serve_transformers",
    "start_vllm_server",
    "vllm_serve_command",
    "wait_until_healthy",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
"""`max_tokens` used by the in-process servers when a request gives none."""
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


class ServerStartError(RuntimeError):
    """A server did not become healthy: its process exited, or the wait timed out."""


class StubHTTPError(Exception):
    """Raise from a `respond` function of [`serve_scripted`] to answer with HTTP `status` and an OpenAI-style error
    body carrying `message`."""

    def __init__(self, status: int, message: str = "error"):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


# -- server handle -----------------------------------------------------------------------------------------------


class ServerHandle:
    """A running OpenAI-compatible server.

    Attributes:
        base_url: the API root for clients, e.g. `"http://127.0.0.1:8000/v1"`.
        root_url: the server root (`base_url` without `/v1`), where `/health` lives.
        model: the served model name (what `/v1/models` lists), when known.
        process: the server's `subprocess.Popen` (vLLM), or `None` for an in-process server.
        log_file: where the subprocess writes its output, or `None`.
        requests: the JSON bodies of the last chat requests an in-process server received (its `keep_requests`), in
            arrival order.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        process: subprocess.Popen | None = None,
        log_file: str | os.PathLike | None = None,
        requests: Sequence[dict] | None = None,
        shutdown: Callable[[], None] | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.root_url = _root_url(self.base_url)
        self.model = model
        self.process = process
        self.log_file = Path(log_file) if log_file is not None else None
        self.requests = requests if requests is not None else []
        self._shutdown = shutdown
        self._stopped = False

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (idempotent). A subprocess's whole process group gets SIGTERM, then SIGKILL after
        `timeout` seconds."""
        if self._stopped:
            return
        self._stopped = True
        if self._shutdown is not None:
            self._shutdown()
        if self.process is not None:
            _kill_process_group(self.process, timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        kind = f"pid={self.process.pid}" if self.process is not None else "in-process"
        return f"ServerHandle({self.base_url!r}, model={self.model!r}, {kind})"


def _root_url(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _kill_process_group(process: subprocess.Popen, timeout: float) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)  # the process leads its own group (start_new_session=True)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _log_tail(log_file: str | os.PathLike | None, lines: int = 40) -> str:
    if log_file is None:
        return "(no log file)"
    try:
        text = Path(log_file).read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        return f"(could not read {log_file}: {error})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log is empty)"


# -- health check ------------------------------------------------------------------------------------------------


def wait_until_healthy(
    url: str,
    timeout: float = 1800.0,
    process: subprocess.Popen | None = None,
    *,
    log_file: str | os.PathLike | None = None,
    interval: float = 0.5,
) -> None:
    """Poll a server until it answers HTTP 200 on `GET {root}/health` (vLLM) or `GET {root}/v1/models`.

    Args:
        url: the server root or API root (`http://host:port` or `http://host:port/v1`).
        timeout: seconds to wait in all.
        process: the server's process; if it exits first, fail at once instead of waiting out `timeout`.
        log_file: the server's log, whose tail goes into the error message.
        interval: the longest pause between polls (the first polls come quicker).

    Raises:
        ServerStartError: the process exited, or `timeout` passed without a healthy answer.
    """
    root = _root_url(url)
    deadline = time.monotonic() + timeout
    pause = min(0.05, interval)
    last_error = "no answer yet"
    while True:
        if process is not None and process.poll() is not None:
            raise ServerStartError(
                f"server process {process.pid} exited with code {process.returncode} before {root} became healthy; "
                f"last lines of its log ({log_file}):\n{_log_tail(log_file)}"
            )
        for path in ("/health", "/v1/models"):
            try:
                with urllib.request.urlopen(root + path, timeout=max(0.1, min(5.0, deadline - time.monotonic()))) as r:
                    if r.status == 200:
                        return
                    last_error = f"GET {path}: HTTP {r.status}"
            except urllib.error.HTTPError as error:
                last_error = f"GET {path}: HTTP {error.code}"
            except (OSError, ValueError) as error:  # refused, reset, timed out (the server is not up yet)
                last_error = f"GET {path}: {error}"
                break  # nothing listens: no point trying the second path
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            tail = f"; last lines of its log ({log_file}):\n{_log_tail(log_file)}" if log_file is not None else ""
            raise ServerStartError(f"{root} was not healthy after {timeout:g} s (last: {last_error}){tail}")
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, interval)


# -- vLLM --------------------------------------------------------------------------------------------------------


def vllm_serve_command(
    model: str,
    *,
    port: int = 8000,
    host: str = "127.0.0.1",
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    max_model_len: int = 65536,
    gpu_memory_utilization: float = 0.9,
    served_model_name: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The `vllm serve` command line for `model` (a Hub id or a local path); `extra_args` are appended verbatim."""
    command = [
        "vllm",
        "serve",
        model,
        "--host",
        host,
        "--port",
        str(port),
        "--tensor-parallel-size",
        str(tensor_parallel_size),
        "--data-parallel-size",
        str(data_parallel_size),
        "--max-model-len",
        str(max_model_len),
        "--gpu-memory-utilization",
        str(gpu_memory_utilization),
    ]
    if served_model_name is not None:
        command += ["--served-model-name", served_model_name]
    return command + [str(arg) for arg in extra_args]


def _find_vllm() -> str | None:
    found = shutil.which("vllm")
    if found:
        return found
    # a virtual environment's scripts are not on PATH unless it is activated
    sibling = Path(sys.executable).parent / "vllm"
    return str(sibling) if sibling.is_file() and os.access(sibling, os.X_OK) else None


def start_vllm_server(
    model: str,
    *,
    port: int = 8000,
    host: str = "127.0.0.1",
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    max_model_len: int = 65536,
    gpu_memory_utilization: float = 0.9,
    served_model_name: str | None = None,
    extra_args: Sequence[str] = (),
    log_file: str | os.PathLike | None = None,
    timeout: float = 1800.0,
    env: dict[str, str] | None = None,
) -> ServerHandle:
    """Start `vllm serve` (see [`vllm_serve_command`]) in its own process group and wait until it is healthy.

    Output goes to `log_file` (default: a new temporary file, named in errors and in `handle.log_file`). `env`
    entries are added to the environment. Clients should use `handle.base_url` and `handle.model` (the served
    name: `served_model_name`, or `model`).

    Raises:
        ImportError: vLLM is not installed (no `vllm` executable).
        ServerStartError: the server exited or did not become healthy within `timeout` seconds (it is stopped).
    """
    executable = _find_vllm()
    if executable is None:
        installed = importlib.util.find_spec("vllm") is not None
        detail = "the `vllm` package is importable but its `vllm` command is not on PATH" if installed else ""
        raise ImportError(
            "vLLM is needed to serve a model with start_vllm_server; install it with `pip install entropo-trl[vllm]` "
            "(or use serve_transformers for small models on CPU)" + (f"; {detail}" if detail else "")
        )
    command = vllm_serve_command(
        model,
        port=port,
        host=host,
        tensor_parallel_size=tensor_parallel_size,
        data_parallel_size=data_parallel_size,
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization,
        served_model_name=served_model_name,
        extra_args=extra_args,
    )
    command[0] = executable
    if log_file is None:
        handle, log_file = tempfile.mkstemp(prefix="vllm-", suffix=".log")
        os.close(handle)
    log_path = Path(log_file)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    logger.info("started vLLM (pid %d), logging to %s: %s", process.pid, log_path, " ".join(command))
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    if ":" in connect_host:
        connect_host = f"[{connect_host}]"
    server = ServerHandle(
        f"http://{connect_host}:{port}/v1", model=served_model_name or model, process=process, log_file=log_path
    )
    try:
        wait_until_healthy(server.root_url, timeout, process, log_file=log_path)
    except BaseException:
        server.stop()
        raise
    return server


# -- in-process servers ------------------------------------------------------------------------------------------


@dataclass
class _Reply:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def _apply_stop(text: str, stop: Any) -> tuple[str, bool]:
    """Cut `text` before the earliest stop string (excluded, as vLLM does); whether one was found."""
    if not stop:
        return text, False
    stops = [stop] if isinstance(stop, str) else list(stop)
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _chars_to_tokens(chars: int) -> int:
    return math.ceil(chars / 4)


class _OpenAIServer:
    """An HTTP/1.1 server answering the OpenAI chat API with `backend(body) -> _Reply`, with bounded resources.

    One thread (`serve_forever`) accepts connections and watches the idle keep-alive ones with a selector; a connection
    with a request waiting goes to a pool of at most `MAX_WORKERS` threads, which handle one request each and hand
    the connection back. Idle connections hold no thread, and at most `MAX_CONNECTIONS` are open (beyond it the
    longest-idle one is closed for a new one, or the new one if none is idle). Bodies are limited to
    `MAX_REQUEST_BYTES`, reads to `REQUEST_TIMEOUT` seconds, idle connections to `KEEPALIVE_TIMEOUT` seconds; the
    last `keep_requests` chat bodies are kept in `requests`."""

    def __init__(
        self, address: tuple[str, int], backend: Callable[[dict], _Reply], model_name: str, keep_requests: int
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


def _serve_in_thread(
    backend: Callable[[dict], _Reply], host: str, port: int, model_name: str, keep_requests: int
) -> ServerHandle:
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


def serve_scripted(
    respond: Callable[[list[dict]], str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    delay: float | Callable[[list[dict]], float] = 0.0,
    model_name: str = "scripted",
    fail_first: int = 0,
    fail_status: int = 503,
    keep_requests: int = 256,
) -> ServerHandle:
    """Serve replies computed by `respond(messages)` on a background thread (port 0: a free port).

    Args:
        respond: the reply text for a request's messages. It may raise [`StubHTTPError`] to answer with that HTTP
            status; any other exception answers HTTP 500. It is called from several threads at once.
        delay: seconds to sleep before answering each request, or a function of the messages giving them.
        model_name: the name `/v1/models` lists.
        fail_first: answer the first `fail_first` chat requests with HTTP `fail_status` (to exercise retries).
        keep_requests: how many of the last chat request bodies `handle.requests` keeps.

    The request's `stop` strings cut the reply (excluded) and `max_tokens` truncates it (`finish_reason="length"`).
    Token counts are character counts / 4 (rounded up): the prompt's from the messages' contents, the completion's
    from the reply.
    """
    counter_lock = threading.Lock()
    seen = [0]

    def backend(body: dict) -> _Reply:
        messages = body["messages"]
        with counter_lock:
            seen[0] += 1
            index = seen[0]
        pause = delay(messages) if callable(delay) else delay
        if pause > 0:
            time.sleep(pause)
        if index <= fail_first:
            raise StubHTTPError(fail_status, f"injected failure {index} of {fail_first}")
        text = respond(messages)
        if not isinstance(text, str):
            raise TypeError(f"respond must return a str, got {type(text).__name__}")
        text, stopped = _apply_stop(text, body.get("stop"))
        finish_reason = "stop"
        max_tokens = body.get("max_tokens")
        if not stopped and max_tokens is not None and _chars_to_tokens(len(text)) > max_tokens:
            text, finish_reason = text[: 4 * max_tokens], "length"
        prompt_chars = sum(len(m.get("content") or "") for m in messages if isinstance(m.get("content"), str))
        return _Reply(text, finish_reason, _chars_to_tokens(prompt_chars), _chars_to_tokens(len(text)))

    return _serve_in_thread(backend, host, port, model_name, keep_requests)


def serve_transformers(
    model_path_or_model: Any,
    tokenizer: Any = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    model_name: str | None = None,
    keep_requests: int = 0,
) -> ServerHandle:
    """Serve a `transformers` causal LM with `model.generate` on a background thread (port 0: a free port).

    `model_path_or_model` is a loaded model or a path / Hub id (then the tokenizer is loaded from it too, unless
    given). Messages are rendered with the tokenizer's chat template (`add_generation_prompt=True`, plus a request's
    `chat_template_kwargs`). `temperature > 0` samples (with `top_p`, `top_k`, `repetition_penalty`, `seed`);
    `temperature == 0` is greedy; a request without `max_tokens` gets `DEFAULT_MAX_TOKENS`. Stop strings cut the
    decoded text afterwards. Generation is serialized with a lock. `prompt_tokens` counts the rendered prompt's
    tokens and `completion_tokens` the generated ones (the EOS token included, as vLLM counts them; after a stop
    string cut, the kept text's tokens). Meant for tiny models in tests and CPU demos, not for throughput. No request
    body is kept unless `keep_requests` says how many of the last ones `handle.requests` holds.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model_path_or_model, (str, os.PathLike)):
        path = str(model_path_or_model)
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        name = model_name or path
    else:
        model = model_path_or_model
        if tokenizer is None:
            raise ValueError("serve_transformers needs a tokenizer when given a model object")
        name = model_name or getattr(model.config, "_name_or_path", None) or "local-model"
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template; serve_transformers renders messages with it")
    model.eval()
    eos_ids = model.generation_config.eos_token_id
    eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids), None)
    lock = threading.Lock()

    def backend(body: dict) -> _Reply:
        try:
            prompt = tokenizer.apply_chat_template(
                body["messages"],
                tokenize=False,
                add_generation_prompt=True,
                **(body.get("chat_template_kwargs") or {}),
            )
        except Exception as error:
            raise StubHTTPError(400, f"cannot render the messages with the chat template: {error}") from error
        inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
        prompt_tokens = inputs["input_ids"].shape[1]
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_MAX_TOKENS)
        temperature = float(body["temperature"]) if body.get("temperature") is not None else 1.0  # OpenAI default
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_tokens,
            "eos_token_id": sorted(eos_ids) or None,
            "pad_token_id": pad_id,
        }
        if temperature > 0:
            top_k = body.get("top_k")
            kwargs.update(
                do_sample=True,
                temperature=temperature,
                top_p=float(body.get("top_p") if body.get("top_p") is not None else 1.0),
                top_k=int(top_k) if top_k is not None and int(top_k) > 0 else 0,  # vLLM's -1 / None: no top-k
            )
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if body.get("repetition_penalty") is not None:
            kwargs["repetition_penalty"] = float(body["repetition_penalty"])
        with lock:
            if body.get("seed") is not None:
                torch.manual_seed(int(body["seed"]))
            with torch.no_grad():
                output = model.generate(**inputs, **kwargs)
        generated = output[0, prompt_tokens:].tolist()
        ended = bool(generated) and generated[-1] in eos_ids
        finish_reason = "stop" if ended or len(generated) < max_tokens else "length"
        text = tokenizer.decode(generated, skip_special_tokens=True)
        completion_tokens = len(generated)
        text, stopped = _apply_stop(text, body.get("stop"))
        if stopped:
            finish_reason = "stop"
            completion_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return _Reply(text, finish_reason, prompt_tokens, completion_tokens)

    return _serve_in_thread(backend, host, port, name, keep_requests)

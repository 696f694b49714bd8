"""What every server of [`entropo_trl.rollout.serve`] shares: the [`ServerHandle`] that stops it, and the health check
that waits for one to answer."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["ServerHandle", "ServerStartError", "wait_until_healthy"]


class ServerStartError(RuntimeError):
    """A server did not become healthy: its process exited, or the wait timed out."""


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

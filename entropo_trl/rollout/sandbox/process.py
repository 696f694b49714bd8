"""Running one command on the host: in its own process group, with a time limit, its output capped in memory, and
never hanging on output pipes that its background children hold open."""

from __future__ import annotations

import contextlib
import math
import os
import selectors
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence

from .base import DEFAULT_MAX_OUTPUT, CommandResult

# After the command's main process exits, how long its background children may keep the output pipes open.
_PIPE_GRACE = 0.2
# How often to check whether the main process exited while its pipes are still open.
_POLL_INTERVAL = 0.05
_READ_CHUNK = 65536
# How long to read what is left in the pipes after the process group was killed.
_DRAIN_TIME = 0.5


def run_process(
    argv: Sequence[str],
    *,
    timeout: float,
    max_output: int = DEFAULT_MAX_OUTPUT,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
    on_start: Callable[[int], None] | None = None,
) -> tuple[CommandResult, int]:
    """Run `argv` in a new process group with a time limit, never hanging on pipes held open by its children.

    The process group is killed when the time limit passes, and also when the main process has exited but children
    still hold its output pipes after a short grace period (e.g. `server &` without redirection). Children that
    redirected their output (`server > log 2>&1 &`) keep running; the caller owns the returned process group id.
    `on_start(pgid)` is called as soon as the process runs (so that a sandbox closed meanwhile can kill it).
    Returns the result and the process group id.
    """
    start = time.monotonic()
    deadline = start + timeout
    with _stdin(input) as stdin:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=env,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    pgid = proc.pid  # a new session: the process leads its own group
    if on_start is not None:
        on_start(pgid)
    captures = {proc.stdout: _Capture(4 * max_output + 4), proc.stderr: _Capture(4 * max_output + 4)}
    timed_out = _read_pipes(proc, captures, deadline, exit_grace=_PIPE_GRACE)
    if not timed_out and proc.poll() is None:  # the pipes closed but the process is still running
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    if timed_out or proc.poll() is None or any(not pipe.closed for pipe in captures):
        _kill_group(pgid)
        # what is left, for a short while: a process that escaped the group may hold the pipes forever
        _read_pipes(proc, captures, time.monotonic() + _DRAIN_TIME, exit_grace=math.inf)
    exit_code = proc.wait()
    for pipe in captures:
        pipe.close()
    result = CommandResult(
        exit_code=-1 if timed_out else exit_code,
        stdout=_decode_capped(captures[proc.stdout], max_output),
        stderr=_decode_capped(captures[proc.stderr], max_output),
        timed_out=timed_out,
        duration=time.monotonic() - start,
    )
    return result, pgid


def _stdin(input: bytes | None) -> contextlib.AbstractContextManager:
    """What the process reads: nothing, or `input` from a temporary file, which it reads at its own pace (the runner
    never blocks writing to a pipe that the process does not read). The file is open read-only (the process cannot
    write into the runner's temporary folder through it) and already unlinked (gone once closed)."""
    if input is None:
        return contextlib.nullcontext(subprocess.DEVNULL)
    with tempfile.NamedTemporaryFile(delete=False) as writer:
        path = writer.name
        try:
            writer.write(input)
        except BaseException:
            os.unlink(path)
            raise
    try:
        return open(path, "rb")
    finally:
        os.unlink(path)


def _read_pipes(proc: subprocess.Popen, captures: dict, deadline: float, exit_grace: float) -> bool:
    """Read the open pipes of `captures` until they close, until `exit_grace` seconds after the main process exited
    (its children hold them open), or until the deadline. Returns whether the deadline passed. (`communicate` would
    keep all of a flooding command's output in memory, and wait as long as background children hold the pipes.)"""
    with selectors.DefaultSelector() as selector:
        for pipe in captures:
            if not pipe.closed:
                selector.register(pipe, selectors.EVENT_READ)
        exited_at = None
        while selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                return True
            if exited_at is not None and now - exited_at > exit_grace:
                return False
            for key, _ in selector.select(min(deadline - now, _POLL_INTERVAL)):
                chunk = os.read(key.fd, _READ_CHUNK)
                if chunk:
                    captures[key.fileobj].add(chunk)
                else:
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
            if exited_at is None and proc.poll() is not None:
                exited_at = time.monotonic()
    return False


class _Capture:
    """Bytes read from one pipe: the first `limit` and the last `limit` are kept, the rest only counted."""

    def __init__(self, limit: int):
        self.limit = limit
        self.data = bytearray()  # the head
        self.tail = bytearray()  # what came after the head, its last `limit` bytes
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            if len(self.tail) > self.limit:
                del self.tail[: len(self.tail) - self.limit]


def _decode_capped(capture: _Capture, max_output: int) -> str:
    """Decode a captured stream; past `max_output` characters keep its head and its tail (where a test run prints its
    summary), with a note of how much was dropped between them."""
    head, tail = bytes(capture.data), bytes(capture.tail)
    dropped_bytes = capture.total - len(head) - len(tail)
    if not dropped_bytes:
        text = (head + tail).decode("utf-8", errors="replace")
        if len(text) <= max_output:
            return text
        head_text, tail_text = text, text
    else:
        head_text = head.decode("utf-8", errors="replace")
        tail_text = tail.decode("utf-8", errors="replace")
    keep_head = max_output // 2
    keep_tail = max_output - keep_head
    kept_head, kept_tail = head_text[:keep_head], tail_text[len(tail_text) - keep_tail :] if keep_tail else ""
    if not dropped_bytes:
        note = f"{len(head_text) - keep_head - keep_tail} characters"
    else:
        note = f"about {len(head_text) - len(kept_head) + dropped_bytes + len(tail_text) - len(kept_tail)} characters"
    return kept_head + f"\n[... output truncated: {note} dropped ...]\n" + kept_tail


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True

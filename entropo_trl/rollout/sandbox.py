"""Sandboxes: where an agent's commands run and its files live, one per episode.

Three implementations share one interface, [`Sandbox`]; [`make_sandbox`] picks one by backend name:

- "local": [`BwrapSandbox`] copies a folder into a private temporary directory and mounts it at `/testbed` inside a
  bubblewrap (`bwrap`) namespace for every command and file operation: no network, a cleared environment, a
  read-only view of the system's programs and nothing else of the host, a private `/tmp`, its own PID namespace (no
  process outlives its call) and limits on file size, processes and memory. The model's commands are hostile input.
- "host": [`LocalSandbox`], the same private copy, with commands run on the host with `bash -c`. No isolation beyond
  the copy: for trusted tasks only.
- "docker": [`DockerSandbox`] runs one container per episode (e.g. an R2E-Gym / SWE-bench image with the repository
  at `/testbed`, no network by default) and talks to it through the `docker` CLI. Every command line is built by a
  small pure method, so it can be checked without a daemon.

Both record a base commit when they start; [`Sandbox.diff`] is the agent's patch against it (new files included), and
[`Sandbox.apply_patch`] replays such a patch in another sandbox.

Paths given to the file methods are absolute, or relative to `workdir`. The file methods refuse FIFOs, devices and
sockets (which could block or never end), read at most `MAX_READ_BYTES` and list at most `limit` entries; the
isolated backends run them as commands with a time limit. [`sweep_stale_sandboxes`] removes the private copies that
runs which died without cleaning up left behind.
"""

from __future__ import annotations

import atexit
import base64
import functools
import logging
import math
import os
import posixpath
import re
import resource
import selectors
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tasks import Task

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 90.0
DEFAULT_MAX_OUTPUT = 1_000_000
# What `diff` may return: a patch is not clipped like an observation.
MAX_DIFF_CHARS = 50_000_000
# Environment every command sees: no pagers, no colours, no stray .pyc files in the diff.
COMMAND_ENV = {"PAGER": "cat", "GIT_PAGER": "cat", "TERM": "dumb", "PYTHONDONTWRITEBYTECODE": "1"}
# Limits of the file methods: seconds per operation (isolated backends), bytes a read returns, entries a listing returns.
FILE_TIMEOUT = 60.0
MAX_READ_BYTES = 16 * 1024 * 1024
MAX_LIST_ENTRIES = 10_000
GIT_IDENTITY = {"user.name": "entropo", "user.email": "entropo@localhost", "commit.gpgsign": "false"}

# After the command's main process exits, how long its background children may keep the output pipes open.
_PIPE_GRACE = 0.2
# How often to check whether the main process exited while its pipes are still open.
_POLL_INTERVAL = 0.05
_READ_CHUNK = 65536

# Makes the working directory a git repository with one commit when it is not one, then prints HEAD.
_ENSURE_BASE_SCRIPT = (
    "set -e; if [ ! -e .git ]; then git init -q; git add -A; "
    + "git "
    + " ".join(f"-c {key}={value}" for key, value in GIT_IDENTITY.items())
    + " commit -q --allow-empty --no-verify -m 'entropo base'; fi; git rev-parse HEAD"
)


@dataclass
class CommandResult:
    """The outcome of one command. `exit_code` is -1 when the command was killed at its time limit."""

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False
    duration: float = 0.0  # seconds

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start, lost its container, git broke), as opposed to the agent's
    command failing, which is a normal [`CommandResult`]."""


class Sandbox(ABC):
    """Where one episode runs. `workdir` is the absolute path of the repository root as the agent sees it, and the
    directory commands start in. `base_commit` is the commit [`diff`] compares against."""

    workdir: str
    base_commit: str
    # a folder for the library's own files (e.g. the oracle's evaluation script), outside the checkout
    scratch_dir: str = "/tmp"

    @abstractmethod
    def run(
        self, command: str, timeout: float = DEFAULT_TIMEOUT, max_output: int = DEFAULT_MAX_OUTPUT
    ) -> CommandResult:
        """Run `bash -c command` in `workdir`, killed after `timeout` seconds; each stream is capped at `max_output`
        characters (its head and tail are kept, with a note of how much was dropped between them)."""

    @abstractmethod
    def read_file(self, path: str, timeout: float = FILE_TIMEOUT, limit: int = MAX_READ_BYTES) -> str:
        """The file's text (UTF-8). Raises `FileNotFoundError`, `IsADirectoryError`, `UnicodeDecodeError`, or
        `OSError` for a special file (FIFO, device, socket) or a file of more than `limit` bytes."""

    @abstractmethod
    def write_file(self, path: str, content: str, timeout: float = FILE_TIMEOUT) -> None:
        """Write `content` (UTF-8) to the file, creating its parent directories. Special files are refused."""

    @abstractmethod
    def exists(self, path: str, timeout: float = FILE_TIMEOUT) -> bool: ...

    @abstractmethod
    def is_dir(self, path: str, timeout: float = FILE_TIMEOUT) -> bool: ...

    @abstractmethod
    def list_dir(
        self, path: str, depth: int = 2, limit: int = MAX_LIST_ENTRIES, timeout: float = FILE_TIMEOUT
    ) -> list[str]:
        """Non-hidden entries under `path` up to `depth` levels deep (hidden directories are not entered), relative
        to `path`, sorted; directories end with '/'. At most `limit` of them (which ones is unspecified)."""

    @abstractmethod
    def apply_patch(self, patch: str) -> CommandResult:
        """`git apply` the patch in `workdir`."""

    @abstractmethod
    def close(self) -> None:
        """Release everything the sandbox holds. Safe to call twice."""

    def resolve(self, path: str) -> str:
        """`path` made absolute (relative paths are relative to `workdir`) and normalised."""
        return posixpath.normpath(posixpath.join(self.workdir, path))

    def diff(self) -> str:
        """The working tree against `base_commit` as a `git diff` (binary-safe), including new untracked files that
        are not ignored. Uses a temporary index, so the agent's staging area is left as it was."""
        result = self.run(_diff_script(self.base_commit), timeout=300, max_output=MAX_DIFF_CHARS)
        if not result.ok:
            raise SandboxError(f"git diff failed (exit code {result.exit_code}): {result.stderr.strip()}")
        return result.stdout

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        # Only the process that made the sandbox cleans it up (not a forked child that inherited the object).
        if getattr(self, "_owner_pid", None) != os.getpid():
            return
        try:
            self.close()
        except Exception:
            pass


def _diff_script(base_commit: str) -> str:
    # A copy of the index, so `git add -A` does not change what the agent has staged. The copy keeps the index's
    # mtime (`cp -p`): git re-reads a file whose stat data matches its entry only when the entry is not older than the
    # index ("racy git"), and a fresh mtime would hide an edit of the same size made in the second the file was staged.
    return (
        'tmp="$(mktemp -d)"; idx="$tmp/index"; trap \'rm -rf "$tmp"\' EXIT; '
        'cp -p "$(git rev-parse --git-path index)" "$idx" 2>/dev/null || true; '
        'export GIT_INDEX_FILE="$idx"; git add -A && '
        f"git -c core.fileMode=false diff --cached --binary --no-color --no-ext-diff {shlex.quote(base_commit)}"
    )


# ----------------------------------------------------------------------------------------------------- processes


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


def special_file_error(path: str, kind: str) -> OSError:
    """The error for a file operation on a FIFO, device or socket, which could block or never end."""
    return OSError(f"{path} is a {kind}, not a regular file: file operations refuse special files")


def too_large_error(path: str, size: int, limit: int) -> OSError:
    return OSError(
        f"{path} has {size} bytes, more than the {limit} that a file operation reads; look at parts of it with "
        "execute_bash (head, sed -n, grep)"
    )


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):  # fmt: skip
        if test(mode):
            return kind
    return "special file"


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
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    pgid = proc.pid  # a new session: the process leads its own group
    if on_start is not None:
        on_start(pgid)
    captures = {proc.stdout: _Capture(4 * max_output + 4), proc.stderr: _Capture(4 * max_output + 4)}
    timed_out = _pump(proc, captures, input, deadline)
    if not timed_out and proc.poll() is None:  # the pipes closed but the process is still running
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    if timed_out or proc.poll() is None or any(not pipe.closed for pipe in captures):
        _kill_group(pgid)
        _drain(captures, time.monotonic() + 0.5)
    exit_code = proc.wait()
    for pipe in captures:
        pipe.close()
    out, err = captures[proc.stdout], captures[proc.stderr]
    result = CommandResult(
        exit_code=-1 if timed_out else exit_code,
        stdout=_decode_capped(out, max_output),
        stderr=_decode_capped(err, max_output),
        timed_out=timed_out,
        duration=time.monotonic() - start,
    )
    return result, pgid


def _pump(proc: subprocess.Popen, captures: dict, input: bytes | None, deadline: float) -> bool:
    """Feed stdin and read stdout/stderr until both close, the main process exits leaving them held open by its
    children (for longer than the grace period), or the deadline passes. Returns whether the deadline passed."""
    with selectors.DefaultSelector() as selector:
        for pipe in captures:
            selector.register(pipe, selectors.EVENT_READ)
        pending = memoryview(input or b"")
        if input is not None:
            if pending:
                selector.register(proc.stdin, selectors.EVENT_WRITE)
            else:
                proc.stdin.close()
        exited_at = None
        while selector.get_map():
            now = time.monotonic()
            if now >= deadline:
                return True
            if exited_at is not None and now - exited_at > _PIPE_GRACE:
                return False
            for key, _ in selector.select(min(deadline - now, _POLL_INTERVAL)):
                if key.fileobj is proc.stdin:
                    pending = _write_some(proc.stdin, pending, selector)
                    continue
                chunk = os.read(key.fd, _READ_CHUNK)
                if chunk:
                    captures[key.fileobj].add(chunk)
                else:
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
            if exited_at is None and proc.poll() is not None:
                exited_at = time.monotonic()
    return False


def _write_some(stdin, pending: memoryview, selector: selectors.BaseSelector) -> memoryview:
    try:
        written = os.write(stdin.fileno(), pending[:_READ_CHUNK])
    except BrokenPipeError:  # the process stopped reading: it keeps what it got
        written = len(pending)
    pending = pending[written:]
    if not pending:
        selector.unregister(stdin)
        stdin.close()
    return pending


def _drain(captures: dict, deadline: float) -> None:
    """Read what is left in pipes that are still open, until they close or the deadline passes (a process that
    escaped the group may hold them forever)."""
    open_pipes = [pipe for pipe in captures if not pipe.closed]
    if not open_pipes:
        return
    with selectors.DefaultSelector() as selector:
        for pipe in open_pipes:
            selector.register(pipe, selectors.EVENT_READ)
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                chunk = os.read(key.fd, _READ_CHUNK)
                if chunk:
                    captures[key.fileobj].add(chunk)
                else:
                    selector.unregister(key.fileobj)
                    key.fileobj.close()


# ------------------------------------------------------------------------------------------------------- local


def _local_env() -> dict[str, str]:
    """The environment of local commands: this process's, with `COMMAND_ENV`, and the folder of the running Python
    first on PATH, so that `python` and `pytest` are the interpreter (and virtual environment) running the library,
    activated or not."""
    env = {**os.environ, **COMMAND_ENV}
    here = os.path.dirname(sys.executable)
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != here]
    env["PATH"] = os.pathsep.join([here, *parts])
    return env


SANDBOX_PREFIX = "entropo-sandbox-"
"""Name prefix of the folders local sandboxes (and their prepared checkouts) make under their root."""
_OWNER = re.compile(r"-p(\d+)s(\d+)-")


def _process_start(pid: int) -> str | None:
    """The start time of a live process (clock ticks after boot, from /proc), None if there is no such process: with
    the pid it names a process even after its pid is reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if fields[0] != "Z" else None


def _owned_prefix(prefix: str) -> str:
    """A folder name prefix that records the process making the folder (pid and start time), for
    [`sweep_stale_sandboxes`]."""
    return f"{prefix}p{os.getpid()}s{_process_start(os.getpid()) or 0}-"


def _remove_tree(path: str) -> None:
    """`rm -rf path`, also through directories the agent made read-only (best effort)."""

    def writable_and_retry(function, failed, _):
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, 0o700)
            function(failed)
        except OSError:
            pass

    shutil.rmtree(path, onerror=writable_and_retry)


def sweep_stale_sandboxes(root: str | Path | None = None) -> list[str]:
    """Remove the sandbox folders under `root` (default: the temporary directory) that runs which are gone left
    behind (killed before they could clean up). A folder is stale when the process its name records (pid and start
    time) no longer runs; folders without that record are left alone. Returns the removed folders."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.startswith(SANDBOX_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        owner = _OWNER.search(entry.name)
        if owner is None or owner.group(2) == "0":  # no record, or a start time that could not be read: keep it
            continue
        start = _process_start(int(owner.group(1)))
        if start is None and not os.path.isdir("/proc"):  # no way to tell whether its process runs
            continue
        if start == owner.group(2):
            continue
        _remove_tree(entry.path)
        removed.append(entry.path)
    if removed:
        logger.info(f"removed {len(removed)} sandbox folders left by earlier runs under {root}")
    return removed


class LocalSandbox(Sandbox):
    """A private copy of `repo` in a fresh temporary directory; commands run there with `bash -c`.

    If `repo` is not a git repository, the copy becomes one with a single commit of everything, so there is always a
    base commit. If `base_commit` is given it is checked out (untracked files are removed, ignored ones kept).

    Each command runs in its own process group. The group is killed at the time limit, or when the command has
    finished but background children still hold its output; background processes whose output is redirected survive
    until [`close`], which kills every group the sandbox started and deletes the copy. Processes that start their own
    session (`setsid`) escape this bookkeeping.
    """

    def __init__(self, repo: str | Path, base_commit: str | None = None, root: str | Path | None = None):
        source = Path(repo).resolve()
        if not source.is_dir():
            raise SandboxError(f"repository folder not found: {source}")
        if root is not None:  # absolute: paths under it are handed to git and cp running in other folders
            root = os.path.abspath(root)
            os.makedirs(root, exist_ok=True)
        self._groups: set[int] = set()
        self._owner_pid = os.getpid()
        self._root = tempfile.mkdtemp(prefix=_owned_prefix(SANDBOX_PREFIX), dir=root)
        self.scratch_dir = self._root
        self._closed = False
        try:
            copy = Path(self._root) / (source.name or "repo")
            self._env = _local_env()
            key = (str(source), base_commit, _fingerprint(source), root)
            template = _acquire_template(key)
            if template is not None:
                # N episodes of one task: copy the checkout prepared for the first (`.git` included) with one `cp`
                # instead of copying the source and running git to set it up again
                try:
                    result, _ = run_process(["cp", "-a", template.path, str(copy)], timeout=600, env=self._env)
                finally:
                    _release_template(template)
                if not result.ok:
                    raise SandboxError(f"could not copy the prepared checkout: {result.stderr.strip()}")
                self.workdir = os.path.realpath(copy)
                self.base_commit = template.base_commit
            else:
                shutil.copytree(source, copy, symlinks=True)
                _detach_linked_git(copy, base_commit)
                self.workdir = os.path.realpath(copy)
                self.base_commit = self._init_git(base_commit)
                _remember_template(key, self.workdir, self.base_commit, self._env, root)
        except BaseException:
            self.close()
            raise

    def _init_git(self, base_commit: str | None) -> str:
        script = _ENSURE_BASE_SCRIPT
        if base_commit is not None:
            script += (
                f" >/dev/null; git checkout -q --force {shlex.quote(base_commit)}; git clean -fdq; git rev-parse HEAD"
            )
        script += "; " + "; ".join(f"git config {key} {value}" for key, value in GIT_IDENTITY.items())
        result = self.run(script, timeout=300)
        if not result.ok:
            raise SandboxError(f"could not set up git in {self.workdir}: {result.stderr.strip() or result.stdout}")
        return result.stdout.split()[-1]

    def run(
        self, command: str, timeout: float = DEFAULT_TIMEOUT, max_output: int = DEFAULT_MAX_OUTPUT
    ) -> CommandResult:
        if self._closed:
            raise SandboxError("the sandbox is closed")
        result, pgid = run_process(
            ["bash", "-c", command], timeout=timeout, max_output=max_output, cwd=self.workdir, env=self._env
        )
        self._groups = {group for group in self._groups if _group_alive(group)}
        if _group_alive(pgid):
            self._groups.add(pgid)
        return result

    # The file methods run here, on the host: they check the kind of file before opening it and open it without
    # blocking, so a special file is refused at once (the time limit is not needed and not used).

    def read_file(self, path: str, timeout: float = FILE_TIMEOUT, limit: int = MAX_READ_BYTES) -> str:
        target = self.resolve(path)
        mode = os.stat(target).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"is a directory: {target}")
        if not stat.S_ISREG(mode):
            raise special_file_error(target, _file_kind(mode))
        with open(os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY), "rb") as file:
            info = os.fstat(file.fileno())  # it may have been replaced since
            if not stat.S_ISREG(info.st_mode):
                raise special_file_error(target, _file_kind(info.st_mode))
            if info.st_size > limit:
                raise too_large_error(target, info.st_size, limit)
            return file.read(limit).decode("utf-8")

    def write_file(self, path: str, content: str, timeout: float = FILE_TIMEOUT) -> None:
        target = Path(self.resolve(path))
        if target.exists() and not target.is_file():
            mode = target.stat().st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError(f"is a directory: {target}")
            raise special_file_error(str(target), _file_kind(mode))
        target.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK | os.O_NOCTTY
        with open(os.open(target, flags, 0o666), "wb") as file:
            file.write(content.encode("utf-8"))

    def exists(self, path: str, timeout: float = FILE_TIMEOUT) -> bool:
        return os.path.lexists(self.resolve(path))

    def is_dir(self, path: str, timeout: float = FILE_TIMEOUT) -> bool:
        return os.path.isdir(self.resolve(path))

    def list_dir(
        self, path: str, depth: int = 2, limit: int = MAX_LIST_ENTRIES, timeout: float = FILE_TIMEOUT
    ) -> list[str]:
        top = self.resolve(path)
        if not os.path.isdir(top):
            raise NotADirectoryError(f"not a directory: {top}")
        entries: list[str] = []
        _walk(top, "", depth, entries, limit)
        return sorted(entries)

    def apply_patch(self, patch: str) -> CommandResult:
        patch_file = os.path.join(self._root, f"patch-{uuid.uuid4().hex}.diff")
        Path(patch_file).write_bytes(patch.encode("utf-8"))
        try:
            return self.run(f"git apply --whitespace=nowarn {shlex.quote(patch_file)}", timeout=300)
        finally:
            os.unlink(patch_file)

    def diff(self) -> str:
        """As `Sandbox.diff`, with the index copied here rather than by shell tools: two git processes per call."""
        index = os.path.join(self.workdir, ".git", "index")
        scratch = os.path.join(self._root, "diff-index")
        if os.path.exists(index):
            shutil.copy2(index, scratch)  # with its mtime: see `_diff_script` ("racy git")
        elif os.path.exists(scratch):
            os.remove(scratch)
        command = (
            "git add -A && git -c core.fileMode=false diff --cached --binary --no-color --no-ext-diff "
            + shlex.quote(self.base_commit)
        )
        result, _ = run_process(
            ["bash", "-c", command],
            timeout=300,
            max_output=MAX_DIFF_CHARS,
            cwd=self.workdir,
            env={**self._env, "GIT_INDEX_FILE": scratch},
        )
        if not result.ok:
            raise SandboxError(f"git diff failed (exit code {result.exit_code}): {result.stderr.strip()}")
        return result.stdout

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for group in self._groups:
            _kill_group(group)
        self._groups.clear()
        _remove_tree(self._root)


MAX_TEMPLATES = 8
"""Prepared checkouts kept at once, for the sources used most recently; an older one is deleted when no copy of it is
in progress. With a tmpfs `root` they take memory beside the sandboxes' own checkouts."""


@dataclass
class _Template:
    path: str
    base_commit: str
    users: int = 0  # copies in progress
    retired: bool = False  # evicted: deleted when the last copy in progress ends


# Prepared checkouts by (source folder, base commit, fingerprint of the source tree, sandbox root), least recently
# used first; all are removed at exit.
_TEMPLATES: OrderedDict[tuple, _Template] = OrderedDict()
_TEMPLATES_BUILDING: set[tuple] = set()
_TEMPLATES_LOCK = threading.Lock()
_TEMPLATES_ROOTS: dict[str | None, str] = {}  # sandbox root -> the folder of its templates


def _acquire_template(key: tuple) -> _Template | None:
    """The prepared checkout for `key`, held for copying until [`_release_template`]; None if there is none."""
    with _TEMPLATES_LOCK:
        template = _TEMPLATES.get(key)
        if template is None:
            return None
        if not os.path.isdir(template.path):  # removed behind our back (a temporary-files cleaner)
            del _TEMPLATES[key]
            return None
        template.users += 1
        _TEMPLATES.move_to_end(key)
        return template


def _release_template(template: _Template) -> None:
    with _TEMPLATES_LOCK:
        template.users -= 1
        doomed = template.retired and template.users == 0
    if doomed:
        shutil.rmtree(template.path, ignore_errors=True)


def _fingerprint(source: Path) -> tuple[int, int]:
    """(latest modification time, number of entries) of a tree: a changed source gets a fresh template."""
    latest, count = 0, 0
    for dirpath, dirnames, filenames in os.walk(source):
        for name in dirnames + filenames:
            latest = max(latest, os.lstat(os.path.join(dirpath, name)).st_mtime_ns)
            count += 1
    return latest, count


def _remember_template(key: tuple, checkout: str, base_commit: str, env: dict[str, str], root: str | None) -> None:
    """Keep a copy of a freshly prepared checkout (in a folder beside the sandboxes, under `root`) for the next
    sandbox of the same source (best effort). Only one sandbox of a source makes it; the least recently used
    templates beyond `MAX_TEMPLATES` are deleted."""
    with _TEMPLATES_LOCK:
        if key in _TEMPLATES or key in _TEMPLATES_BUILDING:
            return
        _TEMPLATES_BUILDING.add(key)
        folder = _TEMPLATES_ROOTS.get(root)
        if folder is None:
            folder = tempfile.mkdtemp(prefix=_owned_prefix(SANDBOX_PREFIX + "templates-"), dir=root)
            _TEMPLATES_ROOTS[root] = folder
            atexit.register(shutil.rmtree, folder, True)
        target = os.path.join(folder, uuid.uuid4().hex)
    # Copies have new inodes: let git trust size and mtime only, so it does not re-hash every file after a copy.
    # Fewer files make every later copy (and its removal) cheaper: the template drops git's sample hooks (never
    # run) and packs its loose objects (a fresh snapshot commit has one per file) into one pack.
    script = (
        f"git config core.checkStat minimal && cp -a . {shlex.quote(target)} && cd {shlex.quote(target)} && "
        "rm -f .git/hooks/*.sample && git repack -d -q"
    )
    result = None
    try:
        result, _ = run_process(["bash", "-c", script], timeout=600, cwd=checkout, env=env)
    finally:
        doomed = []
        with _TEMPLATES_LOCK:
            _TEMPLATES_BUILDING.discard(key)
            if result is not None and result.ok:
                _TEMPLATES[key] = _Template(target, base_commit)
                while len(_TEMPLATES) > MAX_TEMPLATES:
                    _, old = _TEMPLATES.popitem(last=False)
                    old.retired = True
                    if old.users == 0:
                        doomed.append(old.path)
            else:
                doomed.append(target)
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)


def _detach_linked_git(copy: Path, base_commit: str | None) -> None:
    """A `.git` *file* (a worktree or submodule) points into the source's repository, which the copy must not touch:
    drop it, so the copy becomes a fresh repository with one commit of its current files."""
    link = copy / ".git"
    if link.is_file():
        if base_commit is not None:
            raise SandboxError(
                f"{copy.name} is a git worktree or submodule (.git is a file): cannot check out {base_commit!r} in a "
                "private copy; pass the main repository, or no base_commit to snapshot the current files"
            )
        link.unlink()


def _walk(directory: str, prefix: str, depth: int, entries: list[str], limit: int) -> None:
    if depth <= 0:
        return
    with os.scandir(directory) as scan:
        children = [entry for entry in scan if not entry.name.startswith(".")]
    for entry in children:
        if len(entries) >= limit:
            return
        if entry.is_dir(follow_symlinks=False):
            entries.append(f"{prefix}{entry.name}/")
            _walk(entry.path, f"{prefix}{entry.name}/", depth - 1, entries, limit)
        else:
            entries.append(f"{prefix}{entry.name}")


# ------------------------------------------------------------------------------------------- shell file operations


# Exit codes of the file snippets below.
_IS_DIR, _MISSING, _SPECIAL, _TOO_LARGE, _NOT_DIR = 21, 22, 23, 24, 20


class ShellSandbox(Sandbox):
    """A sandbox whose file operations are shell snippets run inside it, like its commands, each with a time limit.
    Subclasses provide [`_exec`]; `run`, `diff` and `apply_patch` go through it too."""

    @abstractmethod
    def _exec(
        self, command: str, timeout: float, max_output: int = DEFAULT_MAX_OUTPUT, input: bytes | None = None
    ) -> CommandResult:
        """Run `bash -c command` in `workdir` inside the sandbox, with `input` on stdin."""

    def run(
        self, command: str, timeout: float = DEFAULT_TIMEOUT, max_output: int = DEFAULT_MAX_OUTPUT
    ) -> CommandResult:
        return self._exec(command, timeout, max_output)

    def _file_op(self, what: str, target: str, command: str, timeout: float, **kwargs) -> CommandResult:
        result = self._exec(command, timeout, **kwargs)
        if result.timed_out:
            raise TimeoutError(f"{what} {target} took more than {timeout:g} seconds")
        if result.exit_code == _IS_DIR:
            raise IsADirectoryError(f"is a directory: {target}")
        if result.exit_code == _MISSING:
            raise FileNotFoundError(f"no such file: {target}")
        if result.exit_code == _SPECIAL:
            raise special_file_error(target, result.stdout.strip() or "special file")
        return result

    def read_file(self, path: str, timeout: float = FILE_TIMEOUT, limit: int = MAX_READ_BYTES) -> str:
        target = self.resolve(path)
        quoted = shlex.quote(target)
        # base64 keeps the bytes exact, so a file that is not UTF-8 fails to decode here as it does locally. The file
        # is checked to be regular before it is read (a FIFO or /dev/zero is refused); one swapped in meanwhile hits
        # the time limit.
        command = (
            f'set -o pipefail; p={quoted}; if [ -d "$p" ]; then exit {_IS_DIR}; elif [ ! -e "$p" ]; then '
            f'exit {_MISSING}; elif [ ! -f "$p" ]; then stat -L -c %F -- "$p"; exit {_SPECIAL}; fi; '
            f'n=$(stat -L -c %s -- "$p") || exit {_MISSING}; if [ "$n" -gt {int(limit)} ]; then echo "$n"; '
            f'exit {_TOO_LARGE}; fi; head -c {int(limit)} -- "$p" | base64 -w0'
        )
        result = self._file_op("reading", target, command, timeout, max_output=2 * limit + 1024)
        if result.exit_code == _TOO_LARGE:
            raise too_large_error(target, int(result.stdout.strip()), limit)
        if not result.ok:
            raise OSError(f"cannot read {target}: {result.stderr.strip()}")
        return base64.b64decode(result.stdout).decode("utf-8")

    def write_file(self, path: str, content: str, timeout: float = FILE_TIMEOUT) -> None:
        target = self.resolve(path)
        command = (
            f'p={shlex.quote(target)}; if [ -d "$p" ]; then exit {_IS_DIR}; elif [ -e "$p" ] && [ ! -f "$p" ]; '
            f'then stat -L -c %F -- "$p"; exit {_SPECIAL}; fi; mkdir -p -- "$(dirname -- "$p")" && '
            'base64 -d > "$p"'
        )
        data = base64.b64encode(content.encode("utf-8"))
        result = self._file_op("writing", target, command, timeout, input=data)
        if not result.ok:
            raise OSError(f"cannot write {target}: {result.stderr.strip()}")

    def exists(self, path: str, timeout: float = FILE_TIMEOUT) -> bool:
        target = self.resolve(path)
        quoted = shlex.quote(target)
        return self._file_op("checking", target, f"test -e {quoted} || test -L {quoted}", timeout).ok

    def is_dir(self, path: str, timeout: float = FILE_TIMEOUT) -> bool:
        target = self.resolve(path)
        return self._file_op("checking", target, f"test -d {shlex.quote(target)}", timeout).ok

    def list_dir(
        self, path: str, depth: int = 2, limit: int = MAX_LIST_ENTRIES, timeout: float = FILE_TIMEOUT
    ) -> list[str]:
        target = self.resolve(path)
        quoted = shlex.quote(target)
        command = (
            f"test -d {quoted} || exit {_NOT_DIR}; find {quoted} -mindepth 1 -maxdepth {int(depth)} -name '.*' "
            f"-prune -o -type d -printf '%P/\\n' -o -printf '%P\\n' | head -n {int(limit)}"
        )
        result = self._file_op("listing", target, command, timeout, max_output=MAX_DIFF_CHARS)
        if result.exit_code == _NOT_DIR:
            raise NotADirectoryError(f"not a directory: {target}")
        if not result.ok:
            raise SandboxError(f"listing {target} failed: {result.stderr.strip()}")
        return sorted(line for line in result.stdout.splitlines() if line)

    def apply_patch(self, patch: str) -> CommandResult:
        return self._exec("git apply --whitespace=nowarn -", 300, input=patch.encode("utf-8"))


# ------------------------------------------------------------------------------------------------------ docker


SWEBENCH_SETUP = "source /opt/miniconda3/bin/activate && conda activate testbed"
"""What the SWE-bench images' `~/.bashrc` does: activate the conda environment the repository is installed in."""


def default_docker_setup(image: str | None) -> str | None:
    """The setup line for an image: [`SWEBENCH_SETUP`] for SWE-bench harness images (`swebench/sweb.eval.*`), else
    nothing."""
    return SWEBENCH_SETUP if image and "sweb.eval." in image else None


class DockerSandbox(ShellSandbox):
    """One container per episode, started from `image` with the repository at `workdir`.

    The container sleeps forever and every command is a `docker exec`; inside, `timeout -s KILL` kills the command's
    whole process group at the time limit. [`start`] (or entering the context) starts the container and records
    `HEAD` as the base commit (a workdir that is not a git repository is made one); [`close`] removes it.

    `run_args` go to `docker run` unchanged (default `["--network", "none"]`: no network; e.g. add `"--memory", "8g"`,
    `"--pids-limit", "4096"`). `setup` runs before
    every command in the same shell, e.g. [`SWEBENCH_SETUP`] for SWE-bench images, whose
    environment is activated only by `~/.bashrc`, which `bash -c` does not read ([`default_docker_setup`]).
    Containers carry the label `entropo.sandbox` and stop by themselves after `lifetime` seconds, so a runner killed
    without cleaning up leaves none running for long (`docker rm -f $(docker ps -q -f label=entropo.sandbox)` removes
    them at once).
    """

    # Extra seconds the host waits for `docker exec` beyond the command's own limit.
    HOST_GRACE = 15.0

    def __init__(
        self,
        image: str,
        workdir: str = "/testbed",
        docker: str = "docker",
        run_args: Sequence[str] = ("--network", "none"),
        name: str | None = None,
        setup: str | None = None,
        lifetime: float = 86_400.0,
    ):
        self.image = image
        self.setup = setup
        self.lifetime = lifetime
        self.workdir = posixpath.normpath(workdir)
        self.docker = docker
        self.run_args = list(run_args)
        self.name = name or f"entropo-{uuid.uuid4().hex[:12]}"
        self.base_commit = ""
        self._started = False
        self._owner_pid = os.getpid()

    # ---- command lines (pure)

    def start_command(self) -> list[str]:
        return [
            self.docker,
            "run",
            "-d",
            "--rm",
            "--name",
            self.name,
            "--label",
            "entropo.sandbox=1",
            *self.run_args,
            "-w",
            self.workdir,
            self.image,
            "sleep",
            str(max(1, math.ceil(self.lifetime))),
        ]

    def exec_command(self, command: str, timeout: float | None = None, stdin: bool = False) -> list[str]:
        """`docker exec` of `bash -c command` in `workdir`, under `timeout -s KILL` when a time limit is given."""
        argv = [self.docker, "exec", *(["-i"] if stdin else []), "-w", self.workdir]
        for key, value in COMMAND_ENV.items():
            argv += ["-e", f"{key}={value}"]
        argv.append(self.name)
        if timeout is not None:
            argv += ["timeout", "-s", "KILL", str(max(1, math.ceil(timeout)))]
        if self.setup:
            command = f"{self.setup}\n{command}"
        return [*argv, "bash", "-c", command]

    def stop_command(self) -> list[str]:
        return [self.docker, "rm", "-f", self.name]

    # ---- lifecycle

    def start(self) -> DockerSandbox:
        """Start the container and record the base commit. Raises `SandboxError` when Docker is unusable."""
        if self._started:
            return self
        try:
            started = subprocess.run(self.start_command(), capture_output=True, text=True, timeout=600)
        except FileNotFoundError as error:
            raise SandboxError(f"Docker CLI not found: {self.docker!r} ({error})") from error
        except subprocess.TimeoutExpired as error:
            raise SandboxError(f"`docker run` of {self.image} did not return within 600 s") from error
        if started.returncode != 0:
            message = started.stderr.strip()
            if "daemon" in message.lower() or "docker.sock" in message:
                raise SandboxError(f"Docker daemon not reachable: {message}")
            raise SandboxError(f"could not start a container from {self.image}: {message}")
        self._started = True
        result = self.run(_ENSURE_BASE_SCRIPT, timeout=300)
        if not result.ok:
            self.close()
            raise SandboxError(f"could not record the base commit in {self.workdir}: {result.stderr.strip()}")
        self.base_commit = result.stdout.split()[-1]
        return self

    def __enter__(self):
        return self.start()

    def close(self) -> None:
        if not getattr(self, "_started", False):
            return
        self._started = False
        try:
            subprocess.run(self.stop_command(), capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass

    # ---- commands and files

    def _exec(
        self, command: str, timeout: float, max_output: int = DEFAULT_MAX_OUTPUT, input: bytes | None = None
    ) -> CommandResult:
        if not self._started:
            raise SandboxError("the container is not running: call start() first")
        argv = self.exec_command(command, timeout, stdin=input is not None)
        result, pgid = run_process(argv, timeout=timeout + self.HOST_GRACE, max_output=max_output, input=input)
        _kill_group(pgid)  # only the local docker client, the container is untouched
        # `timeout -s KILL` kills its whole group, itself included: docker reports 137 (128 + SIGKILL).
        if result.timed_out or (result.exit_code in (137, -signal.SIGKILL) and result.duration >= timeout):
            result.exit_code, result.timed_out = -1, True
        elif result.exit_code in (125, 126) and "No such container" in result.stderr:
            raise SandboxError(f"container {self.name} is gone: {result.stderr.strip()}")
        return result


# ------------------------------------------------------------------------------------------------- local (bwrap)


SANDBOX_WORKDIR = "/testbed"
"""Where the isolated local sandbox mounts the task's checkout: the path SWE-bench and R2E-Gym images use."""

BWRAP_MISSING = (
    "the local sandbox needs bubblewrap (`bwrap`), which is not installed. Install it with `apt-get install "
    "bubblewrap` (Debian/Ubuntu; `dnf install bubblewrap` on Fedora), or choose `--sandbox docker`; `--sandbox host` "
    "runs commands on this machine without isolation (trusted tasks only)"
)

# Top-level folders of the host the sandbox sees, read-only: the system's programs and libraries. Everything else
# (home folders, /root, /run and its sockets, /tmp, /var, /mnt, project folders) is absent.
_HOST_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "nix")
# Files and folders under those that hold the host's secrets, hidden.
_MASKED_FILES = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-")
_MASKED_DIRS = ("/etc/ssh",)
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of each command in the isolated local sandbox (`ulimit`, per process; bytes). The process
    limit counts the processes of one call; the kernel does not enforce it for root (uid 0), so run the runner as a
    normal user (or use Docker's `--pids-limit`) to bound a fork bomb to it."""

    file_size: int = 1024**3  # the largest file a command may write
    memory: int = 8 * 1024**3  # address space of each process
    processes: int = 1024


@functools.cache
def require_bwrap() -> str:
    """The path of a working `bwrap`; `SandboxError` naming the install command when it is missing, or the cause when
    it cannot make namespaces here (checked once per process)."""
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxError(BWRAP_MISSING)
    try:
        result, _ = run_process(
            [path, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "true"], timeout=30
        )
    except OSError as error:
        raise SandboxError(f"bubblewrap ({path}) cannot run: {error}") from error
    if not result.ok:
        raise SandboxError(
            f"bubblewrap ({path}) cannot make a sandbox on this machine: {result.stderr.strip()}. It needs user "
            "namespaces (e.g. `sysctl kernel.unprivileged_userns_clone=1`, or an AppArmor profile allowing them "
            "for bwrap); otherwise choose `--sandbox docker`"
        )
    return path


def _python_dirs() -> list[str]:
    """The folders of the running Python (virtual environment and base installation) that the sandbox must see, so
    that `python` and `pytest` there are the ones running the library."""
    dirs = {
        os.path.realpath(folder)
        for folder in (sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    }
    visible = [f"/{name}" for name in _HOST_DIRS]
    dirs = {d for d in dirs if not any(d == v or d.startswith(v + "/") for v in visible)}
    return sorted(d for d in dirs if not any(d.startswith(other + "/") for other in dirs))


def _bwrap_args(checkout: str, private_tmp: str, env: dict[str, str]) -> list[str]:
    """bwrap's options for one sandbox: the mounts, the namespaces and the environment."""
    args: list[str] = []
    for name in _HOST_DIRS:
        path = f"/{name}"
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += [arg for path in _MASKED_FILES if os.path.exists(path) for arg in ("--ro-bind", "/dev/null", path)]
    args += [arg for path in _MASKED_DIRS if os.path.isdir(path) for arg in ("--tmpfs", path)]
    args += ["--dev", "/dev", "--proc", "/proc", "--bind", private_tmp, "/tmp"]
    # after the private /tmp: a Python (a venv) that lives under the host's /tmp must stay visible over it
    for path in _python_dirs():
        args += ["--ro-bind", path, path]
    args += ["--bind", checkout, SANDBOX_WORKDIR]
    args += ["--remount-ro", "/", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv"]
    if os.geteuid() == 0:  # an unprivileged bwrap keeps no capabilities anyway
        args += ["--cap-drop", "ALL"]
    for key, value in env.items():
        args += ["--setenv", key, value]
    return [*args, "--chdir", SANDBOX_WORKDIR]


def _limits_script(limits: SandboxLimits) -> str:
    """Sets the limits (never above the runner's own hard limits), then runs the command ($1) in a fresh bash."""
    values = []
    for flag, resource_name, value, unit in (
        ("-f", "RLIMIT_FSIZE", limits.file_size, 1024),
        ("-v", "RLIMIT_AS", limits.memory, 1024),
        ("-u", "RLIMIT_NPROC", limits.processes, 1),
    ):
        hard = resource.getrlimit(getattr(resource, resource_name))[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        values.append(f"{flag} {max(1, value // unit)}")
    return f'ulimit -c 0 {" ".join(values)} && exec bash -c "$1"'


class BwrapSandbox(ShellSandbox):
    """The isolated local sandbox: a private copy of `repo` (as [`LocalSandbox`] makes it) mounted read-write at
    `/testbed`, and every command and file operation run in a fresh bubblewrap namespace.

    Inside: the host's system folders read-only (`/usr`, `/etc` without its secrets, ...) and the running Python's
    folders, nothing else of the host; a private `/tmp` (kept for the episode, deleted at [`close`]); no network; an
    environment of `PATH`, `HOME=/tmp`, `LANG`, [`COMMAND_ENV`] and `env` only; new PID, IPC, UTS and session
    namespaces, so every process of a call ends with it (background and `setsid` ones included); the limits of
    `limits` (file size, memory, processes); no capabilities. `checkout` is the copy's path on the host.
    """

    def __init__(
        self,
        repo: str | Path,
        base_commit: str | None = None,
        root: str | Path | None = None,
        env: dict[str, str] | None = None,
        limits: SandboxLimits | None = None,
    ):
        self._owner_pid = os.getpid()
        self._closed = True
        self._lock = threading.Lock()
        self._running: set[int] = set()  # process groups of the calls in flight
        bwrap = require_bwrap()
        self._copy = LocalSandbox(repo, base_commit, root=root)  # made on the host, before the model runs anything
        try:
            self.workdir = SANDBOX_WORKDIR
            self.base_commit = self._copy.base_commit
            self.checkout = self._copy.workdir
            self.limits = limits or SandboxLimits()
            private_tmp = os.path.join(self._copy.scratch_dir, "tmp")
            os.mkdir(private_tmp)
            here = os.path.dirname(sys.executable)
            environment = {
                "PATH": f"{here}:{SYSTEM_PATH}",
                "HOME": "/tmp",
                "LANG": os.environ.get("LANG") or "C.UTF-8",
            }
            environment.update(COMMAND_ENV)
            environment.update(env or {})
            self._argv = [bwrap, *_bwrap_args(self.checkout, private_tmp, environment)]
            self._argv += ["bash", "-c", _limits_script(self.limits), "bash"]
        except BaseException:
            self._copy.close()  # the copy is made: do not leave it behind
            raise
        self._closed = False

    def _exec(
        self, command: str, timeout: float, max_output: int = DEFAULT_MAX_OUTPUT, input: bytes | None = None
    ) -> CommandResult:
        if self._closed:
            raise SandboxError("the sandbox is closed")
        result, pgid = run_process(
            [*self._argv, command],
            timeout=timeout,
            max_output=max_output,
            env={"PATH": SYSTEM_PATH},
            input=input,
            on_start=self._started,
        )
        _kill_group(pgid)  # the namespace died with its first process; this is bwrap's own process group
        with self._lock:
            self._running.discard(pgid)
        return result

    def _started(self, pgid: int) -> None:
        with self._lock:
            self._running.add(pgid)
            closed = self._closed
        if closed:  # closed while this call was starting (e.g. SIGTERM): it must not run on
            _kill_group(pgid)

    def close(self) -> None:
        """Kill the calls still running (bwrap's `--die-with-parent` then ends their namespaces) and remove the
        checkout, so a runner that stops (SIGTERM, Ctrl-C) does not wait for their time limits."""
        with self._lock:
            if getattr(self, "_closed", True):
                return
            self._closed = True
            running = list(self._running)
        for pgid in running:
            _kill_group(pgid)
        self._copy.close()


@functools.cache
def _warn_unisolated() -> None:
    logger.warning(
        "sandbox 'host': the model's commands run on this machine without isolation (they see its files, network, "
        "processes and the runner's environment); use it for trusted tasks only"
    )


SANDBOX_BACKENDS = ("local", "host", "docker")


def make_sandbox(backend: str, task: Task, root: str | None = None) -> Sandbox:
    """A fresh sandbox for one episode of `task`: "local" an isolated [`BwrapSandbox`] of `task.repo_path` under
    `root`, "host" an unisolated [`LocalSandbox`] (with a warning), "docker" a started [`DockerSandbox`] of
    `task.image` (no network). The task's own environment variables are `task.metadata["env"]` (local only)."""
    if backend == "docker":
        if not task.image:
            raise ValueError(f"task {task.instance_id} has no Docker image")
        sandbox = DockerSandbox(
            task.image, setup=task.metadata.get("docker_setup") or default_docker_setup(task.image)
        )
        return sandbox.start()
    if backend not in SANDBOX_BACKENDS:
        raise ValueError(f"unknown sandbox backend {backend!r}; choose one of {', '.join(SANDBOX_BACKENDS)}")
    if not task.repo_path:
        raise ValueError(f"task {task.instance_id} has no local repository (repo_path); use the docker sandbox")
    if backend == "host":
        _warn_unisolated()
        return LocalSandbox(task.repo_path, task.base_commit, root=root)
    env = task.metadata.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ValueError(f"task {task.instance_id}: metadata 'env' must map variable names to strings")
    return BwrapSandbox(task.repo_path, task.base_commit, root=root, env=env)

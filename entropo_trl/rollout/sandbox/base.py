"""The interface every sandbox implements, [`Sandbox`], its results and errors, and [`ShellSandbox`], the base of the
backends whose file operations are shell snippets run inside them (the isolated local one and Docker).

Paths given to the file methods are absolute, or relative to `workdir`. The file methods refuse FIFOs, devices and
sockets (which could block or never end), read at most `MAX_READ_BYTES` and list at most `limit` entries; the
isolated backends run them as commands with a time limit.
"""

from __future__ import annotations

import base64
import os
import posixpath
import shlex
from abc import ABC, abstractmethod
from dataclasses import dataclass

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
        return _checked_diff(self.run(_diff_script(self.base_commit), timeout=300, max_output=MAX_DIFF_CHARS))

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


def _stage_and_diff(base_commit: str) -> str:
    """Stages the whole working tree (into the index `GIT_INDEX_FILE` names) and prints its diff against
    `base_commit`."""
    return "git add -A && git -c core.fileMode=false diff --cached --binary --no-color --no-ext-diff " + shlex.quote(
        base_commit
    )


def _diff_script(base_commit: str) -> str:
    # A copy of the index, so `git add -A` does not change what the agent has staged. The copy keeps the index's
    # mtime (`cp -p`): git re-reads a file whose stat data matches its entry only when the entry is not older than the
    # index ("racy git"), and a fresh mtime would hide an edit of the same size made in the second the file was staged.
    return (
        'tmp="$(mktemp -d)"; idx="$tmp/index"; trap \'rm -rf "$tmp"\' EXIT; '
        'cp -p "$(git rev-parse --git-path index)" "$idx" 2>/dev/null || true; '
        f'export GIT_INDEX_FILE="$idx"; {_stage_and_diff(base_commit)}'
    )


def _checked_diff(result: CommandResult) -> str:
    """The patch a diff command printed; `SandboxError` if it failed."""
    if not result.ok:
        raise SandboxError(f"git diff failed (exit code {result.exit_code}): {result.stderr.strip()}")
    return result.stdout


def special_file_error(path: str, kind: str) -> OSError:
    """The error for a file operation on a FIFO, device or socket, which could block or never end."""
    return OSError(f"{path} is a {kind}, not a regular file: file operations refuse special files")


def too_large_error(path: str, size: int, limit: int) -> OSError:
    return OSError(
        f"{path} has {size} bytes, more than the {limit} that a file operation reads; look at parts of it with "
        "execute_bash (head, sed -n, grep)"
    )


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

"""The "host" backend, [`LocalSandbox`]: a private copy of the repository, with commands run on this machine by
`bash -c`. No isolation beyond the copy: for trusted tasks only. The isolated local backend makes its copy with it."""

from __future__ import annotations

import functools
import logging
import os
import shlex
import shutil
import stat
import sys
import tempfile
import uuid
from pathlib import Path

from .base import (
    _ENSURE_BASE_SCRIPT,
    COMMAND_ENV,
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    FILE_TIMEOUT,
    GIT_IDENTITY,
    MAX_DIFF_CHARS,
    MAX_LIST_ENTRIES,
    MAX_READ_BYTES,
    CommandResult,
    Sandbox,
    SandboxError,
    _checked_diff,
    _stage_and_diff,
    special_file_error,
    too_large_error,
)
from .checkout import (
    SANDBOX_PREFIX,
    _acquire_template,
    _detach_linked_git,
    _fingerprint,
    _owned_prefix,
    _release_template,
    _remember_template,
    _remove_tree,
)
from .process import _group_alive, _kill_group, run_process

logger = logging.getLogger(__name__)


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
        result, _ = run_process(
            ["bash", "-c", _stage_and_diff(self.base_commit)],
            timeout=300,
            max_output=MAX_DIFF_CHARS,
            cwd=self.workdir,
            env={**self._env, "GIT_INDEX_FILE": scratch},
        )
        return _checked_diff(result)

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for group in self._groups:
            _kill_group(group)
        self._groups.clear()
        _remove_tree(self._root)


def _local_env() -> dict[str, str]:
    """The environment of local commands: this process's, with `COMMAND_ENV`, and the folder of the running Python
    first on PATH, so that `python` and `pytest` are the interpreter (and virtual environment) running the library,
    activated or not."""
    env = {**os.environ, **COMMAND_ENV}
    here = os.path.dirname(sys.executable)
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != here]
    env["PATH"] = os.pathsep.join([here, *parts])
    return env


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):  # fmt: skip
        if test(mode):
            return kind
    return "special file"


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


@functools.cache
def _warn_unisolated() -> None:
    logger.warning(
        "sandbox 'host': the model's commands run on this machine without isolation (they see its files, network, "
        "processes and the runner's environment); use it for trusted tasks only"
    )

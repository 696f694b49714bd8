"""The private checkouts of the local sandboxes, on the host: their folders, named after the process that made them
so that [`sweep_stale_sandboxes`] can remove those of runs that died without cleaning up, and the prepared checkouts
("templates") that the later sandboxes of a source copy instead of setting up git again."""

from __future__ import annotations

import atexit
import logging
import os
import re
import shlex
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .base import SandboxError
from .process import run_process

logger = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------------------- prepared checkouts


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

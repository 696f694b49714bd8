"""The trajectory pool's bookkeeping: episode ids, the files beside the pool, and which episodes are done.

A pool `pool.jsonl` holds one trajectory a line, appended as episodes finish; an episode is known by its `episode_id`
(`{instance_id}/{source}/{sample}`), so a restarted run reads the pool ([`done_episodes`], [`PoolIndex`]) and skips
the episodes already there. Beside it:

- `pool.jsonl.errors.jsonl` ([`errors_path`], [`record_error`]): one JSON line per episode that failed for reasons
  outside the model's answers (the endpoint unreachable, timeouts and HTTP errors after the client's retries,
  responses that are not chat completions, sandboxes or oracles that would not run). Nothing is written to the pool
  for such an episode, so a rerun runs it again. A model that answers, however badly, gives a normal trajectory.
- `pool.jsonl.claims/` ([`claims_path`], [`EpisodeClaims`]): the episodes in flight, one file each, held under an
  exclusive `flock` by the runner that runs it. Several runners (processes) on one pool and one machine share the
  work through it, and every episode is recorded once. The kernel drops a dead process's locks, so a killed runner's
  episodes can be taken at once.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from .redaction import redact
from .tasks import Task

logger = logging.getLogger(__name__)


def episode_id(task: Task, source: str, sample: int) -> str:
    """The id of `task`'s `sample`-th episode by `source` in a pool: `{instance_id}/{source}/{sample}`."""
    return f"{task.instance_id}/{source}/{sample}"


def errors_path(pool: str | Path) -> Path:
    """The errors file of a pool: `{pool}.errors.jsonl`."""
    return Path(f"{pool}.errors.jsonl")


def claims_path(pool: str | Path) -> Path:
    """The folder of a pool's claims on episodes in flight: `{pool}.claims`."""
    return Path(f"{pool}.claims")


def record_error(path: str | Path, episode: str, error: BaseException, secrets: Sequence[tuple[str, str]] = ()):
    """Append `{"episode_id", "error", "time", "pid"}` as one line to an errors file (one `write` under `flock`, so
    concurrent runners do not interleave)."""
    line = {
        "episode_id": episode,
        "error": redact(f"{type(error).__name__}: {error}", secrets),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pid": os.getpid(),
    }
    data = (json.dumps(line, ensure_ascii=False) + "\n").encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
    finally:
        os.close(fd)


class EpisodeClaims:
    """Claims on episodes, shared by every runner of one pool on one machine: a folder with one file per episode in
    flight, held under an exclusive `flock` while its episode runs and removed when it is done.

    The kernel releases a process's locks when it exits, however it exits (SIGKILL included), so a killed runner's
    episodes can be claimed again at once: no heartbeat or expiry is needed. A leftover file without a lock is free.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._held: dict[str, int] = {}

    def _path(self, episode: str) -> Path:
        return self.folder / (hashlib.sha256(episode.encode()).hexdigest()[:32] + ".lock")

    def claim(self, episode: str) -> bool:
        """Take `episode` for this runner; False if another runner (or another claim of this process) holds it."""
        path = self._path(episode)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder was removed by a runner that finished: make it again
                self.folder.mkdir(parents=True, exist_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # locked a file its holder removed in between: claim the path's current file instead
                os.close(fd)
                continue
            note = {"episode_id": episode, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(note) + "\n").encode(), 0)
            self._held[episode] = fd
            return True

    def release(self, episode: str) -> None:
        """Give `episode` back (after its trajectory is in the pool, or after it failed)."""
        fd = self._held.pop(episode)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(episode))  # while still locked: see the inode check in `claim`
        finally:
            os.close(fd)

    def close(self) -> None:
        """Release every claim still held, and remove the folder if no other runner uses it."""
        for episode in list(self._held):
            self.release(episode)
        with contextlib.suppress(OSError):
            self.folder.rmdir()


class PoolIndex:
    """The `episode_id`s recorded in a pool, read incrementally: each `refresh` parses only the lines appended since
    the last one. A last line without its newline (a write in progress, or one a killed writer never finished) is
    not counted until it is complete."""

    def __init__(self, pool: str | Path):
        self.path = Path(pool)
        self.episodes: set[str] = set()
        self.unreadable = 0  # complete lines that are not JSON objects with an episode_id
        self._offset = 0

    def refresh(self) -> set[str]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return self.episodes
        if size < self._offset:  # replaced or cut by someone else: read it again
            self.episodes, self.unreadable, self._offset = set(), 0, 0
        if size == self._offset:
            return self.episodes
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read(size - self._offset)
        end = data.rfind(b"\n")
        if end < 0:
            return self.episodes
        for line in data[:end].split(b"\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                self.unreadable += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("episode_id"), str):
                self.episodes.add(record["episode_id"])
            else:
                self.unreadable += 1
        self._offset += end + 1
        return self.episodes


def done_episodes(pool: str | Path | PoolIndex) -> set[str]:
    """The `episode_id`s already in a pool (a torn last line is counted as not done); given a [`PoolIndex`], it is
    refreshed (and keeps its place for later refreshes)."""
    index = pool if isinstance(pool, PoolIndex) else PoolIndex(pool)
    done = set(index.refresh())
    if index.unreadable:
        logger.warning(f"{index.path}: {index.unreadable} lines without an episode_id skipped")
    return done

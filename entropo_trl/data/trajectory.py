"""Trajectory records: one agent episode, its validation, this library's own JSONL layout, and safe appends to a pool.

A pool is a JSONL file, one trajectory a line. [`write_trajectories`] appends records (tagged
`"schema": "entropo-trajectory/1"`) so that concurrent writers do not interleave and a killed writer never leaves a
half record that counts. Reading pools, in this layout and in R2E-Gym's and SWE-smith's, is `readers`'
[`read_trajectories`]; pytest logs are parsed in `test_logs`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..actions import message_action

logger = logging.getLogger(__name__)

SCHEMA = "entropo-trajectory/1"
ROLES = ("system", "user", "assistant", "tool")


class TrajectoryFormatError(ValueError):
    """A pool line that cannot be read as a trajectory; the message names the file, the line and the field."""

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike | None = None,
        line: int | None = None,
        field: str | None = None,
        reason: str | None = None,
    ):
        where = ", ".join(
            part
            for part in (
                f"{path}" if path is not None else None,
                f"line {line}" if line is not None else None,
                f"field '{field}'" if field is not None else None,
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.detail, self.path, self.line, self.field = message, path, line, field
        self.reason = reason or message

    def located(self, path: str | os.PathLike, line: int) -> TrajectoryFormatError:
        """The same error, naming the file and line."""
        return TrajectoryFormatError(self.detail, path=path, line=line, field=self.field, reason=self.reason)


@dataclass
class Trajectory:
    """One agent episode on one task instance.

    Attributes:
        instance_id: the task instance (SWE-bench style `owner__repo-1234`).
        messages: the chat, `[{"role", "content"}]`: system prompt, issue, then assistant actions interleaved with
            tool observations (as `user` or `tool` messages).
        reward: the test oracle's reward, 1.0 when every FAIL_TO_PASS and PASS_TO_PASS test passes.
        finished: the last assistant turn's first call is `finish` / `submit` (the episode was not cut by a limit).
        exit_reason: why the episode stopped (`"agent"`, `"max_step_limit"`, `"token_limit"`, `"llm_query_error"`...).
        patch: the final `git diff` against the base commit.
        num_steps: the number of assistant turns.
        source: the model or run that produced the episode.
        regression_pass_count: passing regression (PASS_TO_PASS) tests, when they were run.
        regression_fail_count: regression (PASS_TO_PASS) tests that did not pass, when known; 0 means the patch is
            regression-free (what the paper's selector keeps).
        reproduction_score: the reproduction-test score, when reproduction tests were run.
        verifier_prob: the verifier's p(YES), when scored.
        episode_id: a key unique within a pool (e.g. `"{instance_id}/{source}/{sample}"`), used to resume rollouts.
        metadata: anything else worth keeping (docker image, base commit, timings...).
    """

    instance_id: str
    messages: list[dict[str, Any]]
    reward: float
    finished: bool = False
    exit_reason: str | None = None
    patch: str = ""
    num_steps: int = 0
    source: str = ""
    regression_pass_count: int | None = None
    regression_fail_count: int | None = None
    reproduction_score: float | None = None
    verifier_prob: float | None = None
    episode_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """The oracle's verdict: reward 1 (every FAIL_TO_PASS and PASS_TO_PASS test passes)."""
        return self.reward >= 1.0

    @property
    def labelled(self) -> bool:
        """Whether `reward` is a verdict: false for records that carried none (`metadata["labelled"] = False`: a
        SWE-smith line without `reward` / `resolved`, or a rollout without a test oracle), whose `reward` is only a
        placeholder that no resolve rate may count."""
        return self.metadata.get("labelled") is not False

    @property
    def prompt(self) -> list[dict[str, Any]]:
        """The shared prompt: the messages up to and including the first user message (system prompt and issue)."""
        return self.messages[: _prompt_length(self.messages)]

    @property
    def completion(self) -> list[dict[str, Any]]:
        """Everything after the prompt: the agent's turns and the observations between them."""
        return self.messages[_prompt_length(self.messages) :]

    @property
    def issue(self) -> str:
        """The first user message (the task statement)."""
        return next((m["content"] for m in self.messages if m["role"] == "user"), "")

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **dataclasses.asdict(self)}


def _prompt_length(messages: list[dict[str, Any]]) -> int:
    for i, message in enumerate(messages):
        if message.get("role") == "user":
            return i + 1
    return 0


def last_turn_finished(messages: list[dict[str, Any]]) -> bool:
    """Whether the last assistant turn's first call is `finish` / `submit` (as the runner executes it: a finish call
    after another call in the same turn is never run). Text calls first, else structured `tool_calls`."""
    for message in reversed(messages):
        if message.get("role") == "assistant":
            return message_action(message).is_finish
    return False


# --------------------------------------------------------------------------------------------------------------------
# Validation shared by every format
# --------------------------------------------------------------------------------------------------------------------


def validate_messages(
    messages: Any, field_name: str = "messages", require_assistant: bool = False
) -> list[dict[str, Any]]:
    """Check a chat: a non-empty list of `{"role", "content"}` with known roles, string contents and a user message
    (the issue); with `require_assistant`, also an assistant turn after it. Raises [`TrajectoryFormatError`] (without
    file and line: the reader adds them). An episode that ended before its first action (e.g. R2E-Gym's
    `llm_query_error`) is a valid record with no assistant turn; the dataset builders skip it, counted."""
    if not isinstance(messages, list):
        raise TrajectoryFormatError(
            f"expected a list of messages, got {type(messages).__name__}",
            field=field_name,
            reason="messages not a list",
        )
    if not messages:
        raise TrajectoryFormatError("no messages", field=field_name, reason="empty messages")
    for i, message in enumerate(messages):
        where = f"{field_name}[{i}]"
        if not isinstance(message, dict):
            raise TrajectoryFormatError(
                f"expected a message object, got {type(message).__name__}", field=where, reason="message not an object"
            )
        if "role" not in message:
            raise TrajectoryFormatError("message has no 'role'", field=f"{where}.role", reason="missing role")
        if message["role"] not in ROLES:
            raise TrajectoryFormatError(
                f"unknown role {message['role']!r} (expected one of {', '.join(ROLES)})",
                field=f"{where}.role",
                reason="unknown role",
            )
        content = message.get("content")
        if not isinstance(content, str):
            if content is None and message["role"] == "assistant" and message.get("tool_calls"):
                continue
            raise TrajectoryFormatError(
                f"content must be a string, got {type(content).__name__}",
                field=f"{where}.content",
                reason="non-string content",
            )
    roles = [m["role"] for m in messages]
    if "user" not in roles:
        raise TrajectoryFormatError("no user message (the issue)", field=field_name, reason="no user turn")
    if require_assistant and "assistant" not in roles[_prompt_length(messages) :]:
        raise TrajectoryFormatError("no assistant turn after the issue", field=field_name, reason="no assistant turn")
    return messages


def _float_or_none(value: Any, field_name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TrajectoryFormatError(
            f"expected a finite number, got {value!r}", field=field_name, reason=f"invalid {field_name}"
        )
    return float(value)


def _count_or_none(value: Any, field_name: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise TrajectoryFormatError(
            f"expected a non-negative integer, got {value!r}", field=field_name, reason=f"invalid {field_name}"
        )
    return value


def _reward(value: Any, field_name: str = "reward") -> float:
    """A record's reward: a finite number in [0, 1] (the oracle's fraction of required tests passed)."""
    if value is None:
        raise TrajectoryFormatError(
            "reward is missing or null (episode not evaluated?)", field=field_name, reason="missing reward"
        )
    reward = _float_or_none(value, field_name)
    if not 0.0 <= reward <= 1.0:
        raise TrajectoryFormatError(
            f"reward must be in [0, 1], got {value!r}", field=field_name, reason="reward out of range"
        )
    return reward


def _string(value: Any, field_name: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise TrajectoryFormatError(
            f"expected a string, got {type(value).__name__}", field=field_name, reason=f"invalid {field_name}"
        )
    return value


# --------------------------------------------------------------------------------------------------------------------
# This library's own records
# --------------------------------------------------------------------------------------------------------------------


def from_entropo(record: dict[str, Any]) -> Trajectory:
    """A record in this library's own layout (what [`Trajectory.to_dict`] writes). [`write_trajectories`] checks
    plain dicts with it before they reach a pool."""
    known = {f.name for f in dataclasses.fields(Trajectory)}
    if "schema" in record and record["schema"] != SCHEMA:
        raise TrajectoryFormatError(
            f"schema {record['schema']!r} is not {SCHEMA!r}", field="schema", reason="unknown schema"
        )
    unknown = set(record) - known - {"schema"}
    if unknown:
        raise TrajectoryFormatError(
            f"unknown fields {sorted(unknown)} for {SCHEMA}", field=sorted(unknown)[0], reason="unknown field"
        )
    for name in ("instance_id", "messages", "reward"):
        if name not in record:
            raise TrajectoryFormatError(f"missing '{name}'", field=name, reason=f"missing {name}")
    messages = validate_messages(record["messages"])
    metadata = record.get("metadata")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise TrajectoryFormatError("expected an object", field="metadata", reason="invalid metadata")
    finished = record.get("finished", last_turn_finished(messages))
    if not isinstance(finished, bool):
        raise TrajectoryFormatError(
            f"expected true/false, got {finished!r}", field="finished", reason="invalid finished"
        )
    num_steps = record.get("num_steps")
    if num_steps is None:
        num_steps = sum(m["role"] == "assistant" for m in messages)
    elif isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise TrajectoryFormatError(
            f"expected a non-negative integer, got {num_steps!r}", field="num_steps", reason="invalid num_steps"
        )
    return Trajectory(
        instance_id=_instance_id(record["instance_id"]),
        messages=messages,
        reward=_reward(record["reward"]),
        finished=finished,
        exit_reason=_string(record.get("exit_reason"), "exit_reason", default=None),
        patch=_string(record.get("patch"), "patch"),
        num_steps=int(num_steps),
        source=_string(record.get("source"), "source"),
        regression_pass_count=_count_or_none(record.get("regression_pass_count"), "regression_pass_count"),
        regression_fail_count=_count_or_none(record.get("regression_fail_count"), "regression_fail_count"),
        reproduction_score=_float_or_none(record.get("reproduction_score"), "reproduction_score"),
        verifier_prob=_float_or_none(record.get("verifier_prob"), "verifier_prob"),
        episode_id=_string(record.get("episode_id"), "episode_id", default=None),
        metadata=metadata,
    )


def _instance_id(value: Any, field_name: str = "instance_id") -> str:
    if not isinstance(value, str) or not value.strip():
        raise TrajectoryFormatError(
            f"expected a non-empty string, got {value!r}", field=field_name, reason="invalid instance_id"
        )
    return value


# --------------------------------------------------------------------------------------------------------------------
# Appending to pools
# --------------------------------------------------------------------------------------------------------------------


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return True


def _repair_tail(path: Path) -> None:
    """Make the next record start on a line of its own. A last line without its newline is either a record complete
    but for the newline (written by another tool: the newline is added) or an append that a killed writer never
    finished (SIGKILL can stop a large write part-way; so can a crash below the process: it is cut off, and the cut
    is logged with its size). Call with the pool locked, so that the tail is not another writer's record in
    progress."""
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        # find the last newline
        position, block = size, 1 << 16
        while position > 0:
            start = max(0, position - block)
            handle.seek(start)
            chunk = handle.read(position - start)
            index = chunk.rfind(b"\n")
            if index >= 0:
                keep = start + index + 1
                break
            position = start
        else:
            keep = 0
        handle.seek(keep)
        if _is_json(handle.read()):
            handle.seek(size)
            handle.write(b"\n")
            return
        handle.truncate(keep)
    logger.warning(f"{path}: removed a partial last record ({size - keep} bytes) left by an interrupted writer")


def write_trajectories(
    path: str | os.PathLike, records: Iterable[Trajectory | dict[str, Any]], *, fsync: bool = False
) -> int:
    """Append records to a JSONL pool; returns how many were written.

    Each record is serialised completely first and written on a file opened in append mode and locked (`flock`) for
    the call, so concurrent appenders do not interleave, and a record counts only once its final newline is written:
    a writer killed part-way through a large write leaves an unfinished last line, which readers skip (counted,
    logged) and the next append cuts off before writing. `fsync=True` also forces each record to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # One writer at a time (other processes appending to the same pool wait): the tail repair must not take
        # another writer's record in progress for a killed writer's leftover.
        fcntl.flock(fd, fcntl.LOCK_EX)
        _repair_tail(path)
        for record in records:
            if isinstance(record, Trajectory):
                _reward(record.reward)  # a reward outside [0, 1] would make the pool unreadable
            else:
                record = from_entropo(record)  # validates a plain dict before it reaches the pool
            data = record.to_dict()
            line = (json.dumps(data, ensure_ascii=False) + "\n").encode("utf-8")
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if fsync:
                os.fsync(fd)
            count += 1
    finally:
        os.close(fd)
    return count

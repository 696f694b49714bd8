"""Trajectory records: one agent episode, read from R2E-Gym, SWE-smith or this library's own JSONL pools, and
appended to pools safely.

A pool is a JSONL file, one trajectory a line. Pools are often several GB, so [`read_trajectories`] is a generator
that holds one line at a time. Three layouts are understood, detected from a file's first record or forced with
`format=`:

- `"entropo"`: this library's own records (what [`write_trajectories`] and the rollout engine write), tagged
  `"schema": "entropo-trajectory/1"`;
- `"r2egym"`: the `Trajectory` pydantic dump of R2E-Gym (and of the EntroPO authors' fork): `history`,
  `trajectory_steps`, `exit_reason`, `reward`, `output_patch`, `docker_image`, `ds`, `finished_score`, ...;
- `"swesmith"`: SWE-smith / SWE-agent fine-tuning files, `{"instance_id", "messages"}`.

Bad input never disappears: a malformed line raises [`TrajectoryFormatError`] naming the file, the line and the
field, or, with `on_error="skip"`, is counted by reason in a [`ReadStats`] and reported when the file is done. An
unfinished last line (an append cut short by a killed writer, so never a record) is skipped, counted and reported.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SCHEMA = "entropo-trajectory/1"
FORMATS = ("auto", "entropo", "r2egym", "swesmith")
ROLES = ("system", "user", "assistant", "tool")
# R2E-Gym appends this observation after a `finish` call; it is not part of what the model saw before acting.
R2E_FINISHED_MARKER = "<<< Finished >>>"
_FINISH_CALL = re.compile(r"<function\s*=\s*(finish|submit)\s*>")
# `tool_calls` style finish (OpenAI function calling), for records whose assistant messages carry structured calls
_FINISH_NAMES = ("finish", "submit")


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
        finished: the last assistant turn called `finish` / `submit` (the episode was not cut by a limit).
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
    """Whether the last assistant turn calls `finish` / `submit` (text call format or structured `tool_calls`)."""
    for message in reversed(messages):
        if message.get("role") != "assistant":
            continue
        if _FINISH_CALL.search(message.get("content") or ""):
            return True
        calls = message.get("tool_calls") or []
        return any(
            ((call.get("function") or {}).get("name") in _FINISH_NAMES) for call in calls if isinstance(call, dict)
        )
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
# The three layouts
# --------------------------------------------------------------------------------------------------------------------


def detect_format(record: dict[str, Any]) -> str:
    """The layout of one JSON record: `"entropo"`, `"r2egym"` or `"swesmith"`."""
    if record.get("schema") == SCHEMA:
        return "entropo"
    if str(record.get("schema", "")).startswith("entropo-trajectory/"):
        raise TrajectoryFormatError(
            f"schema {record['schema']!r} is not {SCHEMA!r} (written by another version of entropo-trl?)",
            field="schema",
            reason="unknown schema",
        )
    if "trajectory_steps" in record or "history" in record or "docker_image" in record:
        return "r2egym"
    if "messages" in record and "instance_id" in record:
        return "swesmith"
    raise TrajectoryFormatError(
        "cannot tell the record's format: expected this library's records ('schema': "
        f"'{SCHEMA}'), an R2E-Gym dump ('history', 'trajectory_steps', 'docker_image') or SWE-smith "
        f"('instance_id', 'messages'); keys found: {sorted(record)[:12]}",
        reason="unknown format",
    )


def from_entropo(record: dict[str, Any]) -> Trajectory:
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


# R2E-Gym fields carried into `metadata` (small scalars); raw test logs are left out unless `keep_logs=True`.
_R2E_METADATA = (
    "docker_image",
    "exp_name",
    "finished_score",
    "max_steps",
    "max_steps_absolute",
    "max_token_limit",
    "reward_calc_time",
    "problem_statement",
)
_R2E_LOGS = ("test_output", "regression_test_output", "custom_test_outputs")
_DS_METADATA = ("repo", "base_commit", "version", "FAIL_TO_PASS", "PASS_TO_PASS", "environment_setup_commit")
# A test id is `path::name`, with `[parameters]` that may hold spaces; in the `-rA` summary a failure's message follows
# after " - ".
_TEST_ID = r"[^\s\[]+(?:\[.*?\])?"
_STATUSES = r"PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
_STATUS_LINE = re.compile(rf"^({_STATUSES})\s+({_TEST_ID})(?:\s+-\s.*)?[ \t]*\r?$", re.MULTILINE)
_VERBOSE_LINE = re.compile(rf"^([^\s\[]+::{_TEST_ID})\s+({_STATUSES})\b", re.MULTILINE)


def parse_pytest_statuses(output: str) -> dict[str, str]:
    """`{test id: status}` from a pytest log (`-rA` short summary `STATUS id` or verbose `id STATUS` lines; the summary
    wins). Other frameworks' logs give nothing here; score them with the instance's own parser (swebench)."""
    statuses: dict[str, str] = {}
    for match in _VERBOSE_LINE.finditer(output):
        statuses[match.group(1)] = match.group(2)
    for match in _STATUS_LINE.finditer(output):
        statuses[match.group(2)] = match.group(1)
    return statuses


def count_regression_tests(test_output: Any) -> tuple[int | None, int | None]:
    """`(passed, failed)` in an R2E-Gym regression log (its `run_tests_regression` runs the instance's PASS_TO_PASS
    tests under pytest), each test id counted once; failed counts the FAILED and ERROR statuses. No log: `(None,
    None)`. A log in which no pytest status can be read (another framework, a run that never started): `(0, None)`,
    the passes counted as the authors' code counts them, the failures unknown rather than claimed absent."""
    if not isinstance(test_output, str):
        return None, None
    statuses = parse_pytest_statuses(test_output)
    passed = sum(status == "PASSED" for status in statuses.values())
    failed = sum(status in ("FAILED", "ERROR") for status in statuses.values())
    return passed, (failed if statuses else None)


def from_r2egym(record: dict[str, Any], keep_logs: bool = False) -> Trajectory:
    """An R2E-Gym `Trajectory` dump. `messages` is `history` (without the trailing `<<< Finished >>>` observation)."""
    history = record.get("history")
    if history is None:
        raise TrajectoryFormatError(
            "no 'history' (the chat messages): upstream R2E-Gym dumps store only `trajectory_steps`, without the "
            "system and issue prompts; re-export with the EntroPO fork, which keeps `history`",
            field="history",
            reason="missing history",
        )
    messages = list(history)
    if (
        messages
        and isinstance(messages[-1], dict)
        and messages[-1].get("role") in ("user", "tool")
        and (messages[-1].get("content") or "").strip() == R2E_FINISHED_MARKER
    ):
        messages = messages[:-1]
    messages = validate_messages(messages, "history")
    ds = record.get("ds") or {}
    if not isinstance(ds, dict):
        raise TrajectoryFormatError("expected an object", field="ds", reason="invalid ds")
    if ds.get("instance_id"):
        instance_id = _instance_id(ds["instance_id"], "ds.instance_id")
    elif isinstance(record.get("docker_image"), str) and record["docker_image"]:
        instance_id = record["docker_image"].rsplit(":", 1)[-1].split(".")[-1]  # sweb.eval.x86_64.<instance_id>
    else:
        raise TrajectoryFormatError(
            "no instance id: neither 'ds.instance_id' nor 'docker_image' is set",
            field="ds.instance_id",
            reason="missing instance_id",
        )
    if "reward" not in record:
        raise TrajectoryFormatError("missing 'reward'", field="reward", reason="missing reward")
    scores = record.get("reproduction_test_scores") or []
    if not isinstance(scores, list) or not all(
        isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores
    ):
        raise TrajectoryFormatError(
            f"expected a list of numbers, got {scores!r}",
            field="reproduction_test_scores",
            reason="invalid reproduction_test_scores",
        )
    regression_passed, regression_failed = count_regression_tests(record.get("regression_test_output"))
    metadata = {key: record[key] for key in _R2E_METADATA if record.get(key) is not None}
    metadata.update({f"ds.{key}": ds[key] for key in _DS_METADATA if ds.get(key) is not None})
    if keep_logs:
        metadata.update({key: record[key] for key in _R2E_LOGS if record.get(key)})
    return Trajectory(
        instance_id=instance_id,
        messages=messages,
        reward=_reward(record["reward"]),
        finished=last_turn_finished(messages),
        exit_reason=_string(record.get("exit_reason"), "exit_reason", default=None),
        patch=_string(record.get("output_patch"), "output_patch"),
        num_steps=sum(m["role"] == "assistant" for m in messages),
        source=_string(record.get("exp_name"), "exp_name"),
        regression_pass_count=regression_passed,
        regression_fail_count=regression_failed,
        reproduction_score=float(sum(scores)) if scores else None,
        verifier_prob=_float_or_none(record.get("verifier_prob"), "verifier_prob"),
        metadata=metadata,
    )


def from_swesmith(
    record: dict[str, Any],
    default_reward: float | None = None,
    source: str = "swe-smith",
    defaults: Counter | None = None,
) -> Trajectory:
    """A SWE-smith / SWE-agent fine-tuning record `{"instance_id", "messages"}`. What the line says is kept: its own
    `reward` (or `resolved`), `source` and `episode_id`. Defaults fill only missing fields. A line without `reward`
    or `resolved` is unlabelled (`metadata["labelled"] = False`, reward 0 as a placeholder): nothing says whether it
    resolved its issue, and the dataset builders and reports leave it out of anything that needs a verdict. A
    `default_reward` (e.g. 1.0 for SWE-smith's released files, which hold resolved runs only) labels such lines with
    that reward instead. The source defaults to `source`. Each default applied is counted in `defaults` (by field),
    which [`read_trajectories`] reports in its summary."""
    messages = validate_messages(record.get("messages"))
    labelled = True
    if "reward" in record:
        reward = _reward(record["reward"])
    elif "resolved" in record:
        if not isinstance(record["resolved"], bool):
            raise TrajectoryFormatError(
                f"expected true/false, got {record['resolved']!r}", field="resolved", reason="invalid resolved"
            )
        reward = float(record["resolved"])
    elif default_reward is None:
        reward, labelled = 0.0, False
        _count_default(defaults, "reward (none: unlabelled)")
    else:
        reward = _reward(default_reward, "default_reward")
        _count_default(defaults, f"reward (set to {default_reward:g})")
    if record.get("source") is None:
        _count_default(defaults, f"source (set to {source!r})")
    finished = last_turn_finished(messages)
    kept = ("instance_id", "messages", "reward", "resolved", "patch", "source", "episode_id")
    extra = {k: v for k, v in record.items() if k not in kept}
    if not labelled:
        extra["labelled"] = False
    return Trajectory(
        instance_id=_instance_id(record.get("instance_id")),
        messages=messages,
        reward=reward,
        finished=finished,
        exit_reason="submitted" if finished else None,
        patch=_string(record.get("patch"), "patch"),
        num_steps=sum(m["role"] == "assistant" for m in messages),
        source=_string(record.get("source"), "source", default=source),
        episode_id=_string(record.get("episode_id"), "episode_id", default=None),
        metadata=extra,
    )


def _count_default(defaults: Counter | None, what: str) -> None:
    if defaults is not None:
        defaults[what] += 1


# --------------------------------------------------------------------------------------------------------------------
# Reading and writing pools
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ReadStats:
    """What a read saw: records read and lines skipped by reason (`on_error="skip"`), with their first locations."""

    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first error message
    hints_removed: int = 0  # records whose prompt held the reference patch (see `strip_reference_patch_hint`)
    defaults: Counter = field(default_factory=Counter)  # fields a record lacked, filled with a default

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, error: TrajectoryFormatError) -> None:
        self.skipped[error.reason] += 1
        self.examples.setdefault(error.reason, str(error))

    def summary(self) -> str:
        text = f"{self.read} trajectories read, {self.num_skipped} lines skipped"
        if self.skipped:
            text += ": " + "; ".join(
                f"{n} {reason} (first: {self.examples[reason]})" for reason, n in self.skipped.most_common()
            )
        if self.hints_removed:
            text += f"; the reference patch (<gt_patch> hint) removed from {self.hints_removed} prompts"
        if self.defaults:
            text += "; defaults for missing fields: " + ", ".join(
                f"{what} in {n} records" for what, n in self.defaults.most_common()
            )
        return text


# The EntroPO authors' R2E-Gym fork can append the instance's reference patch to the issue prompt as a hint:
# "Additional information:\nThis is a patch for this question:\n<gt_patch>...</gt_patch>\nYou can infer this answer,
# only if you stuck ...". At test time there is no such patch, and a verifier must not see the answer.
_GT_PATCH_HINT = re.compile(
    r"\n*(?:Additional information:\s*)?(?:This is a patch for this question:\s*)?<gt_patch>.*?</gt_patch>"
    r"(?:[ \t]*\n?You can infer this answer[^\n]*)?",
    re.DOTALL,
)


def strip_reference_patch_hint(trajectory: Trajectory) -> bool:
    """Remove a `<gt_patch>` reference-patch hint from the trajectory's user messages (in place); whether there was
    one. Marks the trajectory with `metadata["reference_patch_hint_removed"] = True`."""
    found = False
    for message in trajectory.messages:
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, str) and "<gt_patch>" in content:
            message["content"] = _GT_PATCH_HINT.sub("\n", content)
            found = True
    if found:
        trajectory.metadata["reference_patch_hint_removed"] = True
    return found


def _paths(path_or_paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    if isinstance(path_or_paths, (str, os.PathLike)):
        return [Path(path_or_paths)]
    return [Path(p) for p in path_or_paths]


def _parse_line(raw: bytes, fmt: str, **options: Any) -> tuple[Trajectory, str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TrajectoryFormatError(f"invalid UTF-8 at byte {exc.start}", reason="invalid UTF-8") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrajectoryFormatError(f"invalid JSON ({exc.msg} at column {exc.colno})", reason="invalid JSON") from None
    if not isinstance(record, dict):
        raise TrajectoryFormatError(f"expected a JSON object, got {type(record).__name__}", reason="not an object")
    detected = detect_format(record) if fmt == "auto" else fmt
    if detected == "entropo":
        return from_entropo(record), detected
    if detected == "r2egym":
        return from_r2egym(record, keep_logs=options.get("keep_logs", False)), detected
    return from_swesmith(
        record,
        default_reward=options.get("default_reward"),
        source=options.get("source") or "swe-smith",
        defaults=options.get("defaults"),
    ), detected


def read_trajectories(
    path_or_paths: str | os.PathLike | Iterable[str | os.PathLike],
    format: str = "auto",
    *,
    on_error: str = "raise",
    stats: ReadStats | None = None,
    source: str | None = None,
    default_reward: float | None = None,
    keep_logs: bool = False,
    keep_hints: bool = False,
) -> Iterator[Trajectory]:
    """Stream [`Trajectory`] records from one or more JSONL pools, one line in memory at a time.

    Args:
        path_or_paths: a file or a list of files.
        format: `"auto"` (detected per file from its first record), `"entropo"`, `"r2egym"` or `"swesmith"`.
        on_error: `"raise"` (default) raises [`TrajectoryFormatError`] naming the file, line and field; `"skip"`
            counts the line in `stats` by reason and goes on; a summary is logged at the end of each file.
        stats: filled as the generator runs (records read, skips by reason).
        source: overrides the records' `source` (e.g. the model name for SWE-smith files).
        default_reward: reward of SWE-smith records that carry none (`reward` / `resolved`), in [0, 1]; `None`
            (default): such records are unlabelled (`Trajectory.labelled` false, reward 0 as a placeholder), never
            counted as resolved. SWE-smith's released files hold resolved runs only: `1.0` labels them so.
        keep_logs: keep R2E-Gym's raw test logs in `metadata` (large).
        keep_hints: keep a reference-patch hint (`<gt_patch>...</gt_patch>`, which the EntroPO authors' R2E-Gym fork
            can append to the issue) in the prompts. By default it is removed (it would teach the policy to expect the
            answer in its prompt, and give it to a verifier), counted in `stats.hints_removed` and marked in
            `metadata["reference_patch_hint_removed"]`.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if default_reward is not None and (
        isinstance(default_reward, bool)
        or not isinstance(default_reward, (int, float))
        or not 0.0 <= default_reward <= 1.0
    ):
        raise ValueError(f"default_reward must be a number in [0, 1] or None, got {default_reward!r}")
    stats = stats if stats is not None else ReadStats()
    for path in _paths(path_or_paths):
        if not path.exists():
            raise FileNotFoundError(f"trajectory pool not found: {path}")
        file_format = format
        skipped_before = stats.num_skipped
        with open(path, "rb") as handle:
            line_number = 0
            for raw in handle:
                line_number += 1
                if not raw.strip():
                    continue
                try:
                    if not raw.endswith(b"\n") and handle.read(1) == b"" and not _is_json(raw):
                        # A record is committed by its final newline. A cut last line is an append that a killed
                        # writer never finished (the kernel may stop a large write part-way on SIGKILL): it is not a
                        # record, so it is skipped in both modes, counted and logged; the next append cuts it off.
                        stats.skip(
                            TrajectoryFormatError(
                                "truncated last line: an unfinished append (writer killed mid-record), not a record",
                                path=path,
                                line=line_number,
                                reason="truncated last line",
                            )
                        )
                        continue
                    trajectory, detected = _parse_line(
                        raw,
                        file_format,
                        keep_logs=keep_logs,
                        default_reward=default_reward,
                        source=source,
                        defaults=stats.defaults,
                    )
                except TrajectoryFormatError as exc:
                    error = exc.located(path, line_number)
                    if on_error == "raise":
                        raise error from None
                    stats.skip(error)
                    continue
                if file_format == "auto":
                    file_format = detected  # later lines must follow the first record's layout
                if source is not None:
                    trajectory.source = source
                if not keep_hints and strip_reference_patch_hint(trajectory):
                    stats.hints_removed += 1
                stats.read += 1
                yield trajectory
        if stats.num_skipped > skipped_before:
            logger.warning(f"{path}: skipped {stats.num_skipped - skipped_before} malformed lines; {stats.summary()}")


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
    the call, so concurrent appenders do not interleave, and a record counts only once its final newline is written: a writer
    killed part-way through a large write leaves an unfinished last line, which readers skip (counted, logged) and the
    next append cuts off before writing. `fsync=True` also forces each record to disk."""
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

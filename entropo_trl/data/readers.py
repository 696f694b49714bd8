"""Reading trajectory pools: R2E-Gym, SWE-smith and this library's own JSONL files, as [`Trajectory`] records.

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

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .test_logs import count_regression_tests
from .trajectory import (
    SCHEMA,
    Trajectory,
    TrajectoryFormatError,
    _float_or_none,
    _instance_id,
    _is_json,
    _reward,
    _string,
    from_entropo,
    last_turn_finished,
    validate_messages,
)

logger = logging.getLogger(__name__)

FORMATS = ("auto", "entropo", "r2egym", "swesmith")
# R2E-Gym appends this observation after a `finish` call; it is not part of what the model saw before acting.
R2E_FINISHED_MARKER = "<<< Finished >>>"


# --------------------------------------------------------------------------------------------------------------------
# The layouts (this library's own is read by `trajectory.from_entropo`, which also checks what is written)
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
# Reading pools
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
    _check_read_options(format, on_error, default_reward)
    stats = stats if stats is not None else ReadStats()
    options = {"keep_logs": keep_logs, "default_reward": default_reward, "source": source, "defaults": stats.defaults}
    for path in _paths(path_or_paths):
        skipped_before = stats.num_skipped
        for trajectory in _read_pool(path, format, on_error, stats, options):
            if source is not None:
                trajectory.source = source
            if not keep_hints and strip_reference_patch_hint(trajectory):
                stats.hints_removed += 1
            stats.read += 1
            yield trajectory
        if stats.num_skipped > skipped_before:
            logger.warning(f"{path}: skipped {stats.num_skipped - skipped_before} malformed lines; {stats.summary()}")


def _check_read_options(format: str, on_error: str, default_reward: float | None) -> None:
    """Reject [`read_trajectories`] options that do not exist or are out of range."""
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


def _read_pool(
    path: Path, format: str, on_error: str, stats: ReadStats, options: dict[str, Any]
) -> Iterator[Trajectory]:
    """The records of one pool file, line by line. A malformed line raises (`on_error="raise"`) or is counted in
    `stats` and skipped; an unfinished last line is always skipped and counted. With `format="auto"`, the first
    record's layout is the file's: later lines must follow it."""
    if not path.exists():
        raise FileNotFoundError(f"trajectory pool not found: {path}")
    file_format = format
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            if _is_unfinished_append(raw, handle):
                stats.skip(
                    TrajectoryFormatError(
                        "truncated last line: an unfinished append (writer killed mid-record), not a record",
                        path=path,
                        line=line_number,
                        reason="truncated last line",
                    )
                )
                continue
            try:
                trajectory, detected = _parse_line(raw, file_format, **options)
            except TrajectoryFormatError as exc:
                error = exc.located(path, line_number)
                if on_error == "raise":
                    raise error from None
                stats.skip(error)
                continue
            if file_format == "auto":
                file_format = detected
            yield trajectory


def _is_unfinished_append(raw: bytes, handle: BinaryIO) -> bool:
    """Whether `raw` is a cut last line. A record is committed by its final newline; a last line without one that is
    not complete JSON is an append that a killed writer never finished (the kernel may stop a large write part-way
    on SIGKILL): not a record, whatever `on_error` says. The next append cuts it off."""
    return not raw.endswith(b"\n") and handle.read(1) == b"" and not _is_json(raw)

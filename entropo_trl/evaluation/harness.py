"""The official SWE-bench harness (`swebench.harness.run_evaluation`): its command line, a run of it (which needs a
Docker daemon), and its reports read back as per-instance resolved flags.

What the harness writes (swebench 5.x, `swebench/harness/reporting.py`, `run_evaluation.py`, `grading.py`):

- a summary `{report_dir}/{model_name_or_path with "/" -> "__"}.{run_id}.json`, named after the *first*
  prediction's model, with `resolved_ids`, `unresolved_ids`, `error_ids`, `empty_patch_ids`, `completed_ids`,
  `incomplete_ids` (dataset instances with no prediction), `submitted_ids` (every prediction) and counts;
- per instance, `logs/run_evaluation/{run_id}/{model}/{instance_id}/report.json` =
  `{instance_id: {"resolved": bool, "patch_exists": ..., ...}}` (paths relative to the harness's working
  directory). Instances with an empty patch are not run, so they have no per-instance report; the summary counts
  them in `empty_patch_ids` (unresolved).

The predictions file it reads is written by [`entropo_trl.evaluation.swebench.write_predictions`].
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "princeton-nlp/SWE-bench_Verified"
HARNESS_MODULE = "swebench.harness.run_evaluation"
# swebench.harness.constants: RUN_EVALUATION_LOG_DIR, LOG_REPORT
RUN_EVALUATION_LOG_DIR = Path("logs") / "run_evaluation"
LOG_REPORT = "report.json"
# the summary's id lists (swebench.harness.reporting.make_run_report)
_SUMMARY_ID_KEYS = ("resolved_ids", "unresolved_ids", "error_ids", "empty_patch_ids", "completed_ids", "submitted_ids")


class DockerUnavailableError(RuntimeError):
    """The SWE-bench harness needs a Docker daemon and none answers; the message says how to run it elsewhere."""


class HarnessReportError(ValueError):
    """A harness report that cannot be read; the message names the file."""


def model_dir_name(model_name: str) -> str:
    """The harness's directory / file name for a model (`model_name_or_path.replace("/", "__")`)."""
    return model_name.replace("/", "__")


# --------------------------------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------------------------------


def docker_available(docker: str = "docker", timeout: float = 20.0) -> tuple[bool, str]:
    """Whether a Docker daemon answers `docker info`. Returns `(True, "Docker server <version>")` or
    `(False, reason)` when the CLI is missing, the daemon does not answer, or the call times out."""
    exe = shutil.which(docker)
    if exe is None:
        return False, f"the docker CLI ({docker!r}) is not installed or not on PATH"
    try:
        result = subprocess.run(
            [exe, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return False, f"`docker info` did not answer within {timeout:g}s"
    except OSError as e:
        return False, f"`docker info` could not be run: {e}"
    version = (result.stdout or "").strip()
    if result.returncode != 0 or not version:
        detail = " ".join(line.strip() for line in (result.stderr or result.stdout or "").splitlines() if line.strip())
        return False, f"the Docker daemon does not answer (`docker info` exited {result.returncode}: {detail[:300]})"
    return True, f"Docker server {version}"


@functools.lru_cache(maxsize=8)
def harness_flags(python: str = sys.executable) -> frozenset[str]:
    """The long flags the installed harness's argparse accepts, read from `python -m ... --help` (works offline)."""
    result = subprocess.run(
        [python, "-m", HARNESS_MODULE, "--help"], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"`{python} -m {HARNESS_MODULE} --help` failed ({result.returncode}): {result.stderr[-500:]}"
        )
    return frozenset(re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", result.stdout))


def harness_command(
    predictions_path: str | os.PathLike,
    *,
    dataset_name: str = DEFAULT_DATASET,
    split: str = "test",
    run_id: str,
    max_workers: int = 4,
    timeout: int = 1800,
    cache_level: str | None = None,
    instance_ids: Iterable[str] | None = None,
    namespace: str | None = None,
    report_dir: str | os.PathLike | None = None,
    open_file_limit: int | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The `python -m swebench.harness.run_evaluation ...` command line.

    Only flags swebench 5.x's parser accepts are emitted by default: `--dataset_name --split --predictions_path
    --max_workers --run_id --timeout` and, when given, `--instance_ids --report_dir --open_file_limit`.
    `cache_level` and `namespace` were flags of swebench 4.x that 5.x removed (it pulls prebuilt images); they are
    emitted only when given, after checking the installed harness accepts them (else `ValueError`).
    """
    predictions_path = os.fspath(predictions_path)
    if not (predictions_path.endswith(".jsonl") or predictions_path.endswith(".json")):
        raise ValueError(f"the harness reads predictions from .json or .jsonl files only: {predictions_path}")
    if not isinstance(run_id, str) or not run_id or "/" in run_id:
        raise ValueError(f"run_id must be a non-empty string without '/', got {run_id!r}")
    if int(max_workers) < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    cmd = [
        python, "-m", HARNESS_MODULE,
        "--dataset_name", dataset_name,
        "--split", split,
        "--predictions_path", predictions_path,
        "--max_workers", str(int(max_workers)),
        "--run_id", run_id,
        "--timeout", str(int(timeout)),
    ]  # fmt: skip
    if instance_ids is not None:
        ids = [instance_ids] if isinstance(instance_ids, str) else list(instance_ids)
        if not ids:
            raise ValueError("instance_ids is empty (pass None to evaluate every prediction)")
        cmd += ["--instance_ids", *ids]
    if report_dir is not None:
        cmd += ["--report_dir", os.fspath(report_dir)]
    if open_file_limit is not None:
        cmd += ["--open_file_limit", str(int(open_file_limit))]
    optional = {"--cache_level": cache_level, "--namespace": namespace}
    requested = {flag: value for flag, value in optional.items() if value is not None}
    if requested:
        accepted = harness_flags(python)
        missing = [flag for flag in requested if flag not in accepted]
        if missing:
            raise ValueError(
                f"the installed SWE-bench harness does not accept {', '.join(missing)} "
                f"(swebench 5.x removed them); leave them unset"
            )
        for flag, value in requested.items():
            cmd += [flag, str(value)]
    return cmd


def _stream(process: subprocess.Popen, out: TextIO | None, keep: int = 40) -> deque[str]:
    tail: deque[str] = deque(maxlen=keep)
    assert process.stdout is not None
    for line in process.stdout:
        tail.append(line.rstrip("\n"))
        if out is not None:
            out.write(line)
            out.flush()
    return tail


def _read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a predictions file; a line that is not a JSON object with an `instance_id` raises, naming it."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number}: not JSON ({e})") from None
            if not isinstance(row, dict) or "instance_id" not in row:
                raise ValueError(f"{path}: line {number}: expected an object with 'instance_id'")
            rows.append(row)
    return rows


def run_harness(
    predictions_path: str | os.PathLike,
    *,
    docker: str = "docker",
    cwd: str | os.PathLike | None = None,
    output: TextIO | None = None,
    stream: bool = True,
    **kwargs: Any,
) -> dict[str, bool]:
    """Run the official harness on a predictions file and return `{instance_id: resolved}`.

    Args:
        predictions_path: a file from [`write_predictions`].
        docker: the docker CLI used to check the daemon first.
        cwd: the harness's working directory (its `logs/run_evaluation/...` and, by default, its summary report go
            there); default the current directory.
        output: where the harness's output is streamed (default `sys.stdout`).
        stream: `False` keeps the output only for the error message.
        **kwargs: [`harness_command`] arguments (`run_id` is required; `dataset_name`, `split`, `max_workers`,
            `timeout`, `instance_ids`, `report_dir`, ...).

    Raises:
        DockerUnavailableError: no Docker daemon answers; the message says where the predictions are and the command
            to run on a machine with Docker.
        RuntimeError: the harness exited non-zero (the message holds the tail of its output).
    """
    predictions_path = os.path.abspath(os.fspath(predictions_path))
    cmd = harness_command(predictions_path, **kwargs)
    ok, reason = docker_available(docker)
    if not ok:
        raise DockerUnavailableError(
            f"the SWE-bench harness needs a Docker daemon: {reason}. Predictions are in {predictions_path}; "
            f"run `{shlex.join(cmd)}` on a machine with Docker"
        )
    workdir = Path(cwd) if cwd is not None else Path.cwd()
    rows = _read_predictions(predictions_path)
    if not rows:
        raise ValueError(f"{predictions_path}: no predictions")
    # the summary is named after the first prediction's model (make_run_report)
    model_name = rows[0].get("model_name_or_path") or "None"
    run_id = kwargs["run_id"]
    logger.info("running the SWE-bench harness: %s", shlex.join(cmd))
    process = subprocess.Popen(
        cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL
    )
    try:
        tail = _stream(process, (output or sys.stdout) if stream else None)
        code = process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    if code != 0:
        raise RuntimeError(f"the SWE-bench harness exited with {code}: {shlex.join(cmd)}\n" + "\n".join(tail))
    report_dir = Path(kwargs.get("report_dir") or ".")
    report_dir = report_dir if report_dir.is_absolute() else workdir / report_dir
    summary = report_dir / f"{model_dir_name(model_name)}.{run_id}.json"
    if summary.is_file():
        resolved = read_report(summary)
    else:
        logs = workdir / RUN_EVALUATION_LOG_DIR / run_id / model_dir_name(model_name)
        if not logs.is_dir():
            raise HarnessReportError(
                f"the harness finished but wrote neither {summary} nor per-instance reports under {logs}"
            )
        logger.warning("no summary report at %s; reading the per-instance reports under %s", summary, logs)
        resolved = read_report(logs)
        # instances without a report (empty patch, harness error) were submitted and are unresolved
        for row in rows:
            resolved.setdefault(row["instance_id"], False)
    instance_ids = kwargs.get("instance_ids")
    if instance_ids is not None:
        wanted = {instance_ids} if isinstance(instance_ids, str) else set(instance_ids)
        resolved = {k: v for k, v in resolved.items() if k in wanted}
    return resolved


# --------------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------------


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise HarnessReportError(f"{path}: cannot be read ({e})") from None
    if not text.strip():
        raise HarnessReportError(f"{path}: empty report file (the harness counts this instance as an error)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise HarnessReportError(f"{path}: not valid JSON ({e})") from None


def _is_summary(data: Any) -> bool:
    return isinstance(data, dict) and any(key in data for key in ("resolved_ids", "submitted_ids"))


def _read_summary(path: Path, data: dict[str, Any]) -> dict[str, bool]:
    lists: dict[str, list[str]] = {}
    for key in _SUMMARY_ID_KEYS:
        if key not in data:
            continue
        value = data[key]
        if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
            raise HarnessReportError(f"{path}: '{key}' must be a list of instance ids")
        lists[key] = value
    if "resolved_ids" not in lists:
        raise HarnessReportError(f"{path}: summary report has no 'resolved_ids'")
    resolved = set(lists["resolved_ids"])
    if "submitted_ids" in lists:
        submitted = list(lists["submitted_ids"])
    else:  # older summaries: every id the report mentions
        submitted = [i for key in _SUMMARY_ID_KEYS if key in lists for i in lists[key]]
    result = {instance_id: instance_id in resolved for instance_id in submitted}
    for instance_id in lists["resolved_ids"]:
        result.setdefault(instance_id, True)
    return result


def _read_instance_report(path: Path, data: Any, instance_id: str | None) -> tuple[str, bool]:
    if not isinstance(data, dict) or not data:
        raise HarnessReportError(f'{path}: expected {{instance_id: {{"resolved": bool, ...}}}}')
    if instance_id is not None and instance_id in data:
        key = instance_id
    elif len(data) == 1:
        key = next(iter(data))
        if instance_id is not None:
            raise HarnessReportError(f"{path}: report is for {key!r}, but its folder is {instance_id!r}")
    else:
        raise HarnessReportError(f"{path}: expected one instance id as the top-level key, got {sorted(data)[:5]}")
    entry = data[key]
    if not isinstance(entry, dict) or not isinstance(entry.get("resolved"), bool):
        raise HarnessReportError(f"{path}: '{key}' has no boolean 'resolved'")
    return key, entry["resolved"]


def read_report(
    path_or_dir: str | os.PathLike,
    run_id: str | None = None,
    model_name: str | None = None,
    *,
    strict: bool = True,
) -> dict[str, bool]:
    """Per-instance resolved flags from the harness's outputs.

    `path_or_dir` may be:

    - a summary report `{model}.{run_id}.json`: `True` for `resolved_ids`, `False` for every other submitted id
      (`submitted_ids`; unresolved, errored and empty-patch instances alike);
    - one per-instance `report.json` (`{instance_id: {"resolved": bool, ...}}`);
    - a directory: with `run_id` and `model_name`, a summary `{model}.{run_id}.json` in it is read if present;
      otherwise every per-instance `report.json` below it, narrowed to `logs/run_evaluation/{run_id}/{model}` when
      those are given and exist (a harness working directory, its `logs/`, a run folder or a model folder all work).
      Per-instance reports miss instances the harness never graded (empty patch, errors): prefer the summary.

    Malformed files raise [`HarnessReportError`] naming the file; with `strict=False` a malformed per-instance
    report counts as unresolved (what the harness's own summary does) and is logged.
    """
    path = Path(path_or_dir)
    if path.is_file():
        data = _load_json(path)
        if _is_summary(data):
            return _read_summary(path, data)
        instance_id, resolved = _read_instance_report(path, data, None)
        return {instance_id: resolved}
    if not path.is_dir():
        raise FileNotFoundError(f"no SWE-bench report at {path}")
    if run_id is not None and model_name is not None:
        summary = path / f"{model_dir_name(model_name)}.{run_id}.json"
        if summary.is_file():
            return read_report(summary)
    base = path
    for part in ("logs", "run_evaluation"):
        if (base / part).is_dir() and base.name != part:
            base = base / part
    if run_id is not None and (base / run_id).is_dir():
        base = base / run_id
    if model_name is not None and (base / model_dir_name(model_name)).is_dir():
        base = base / model_dir_name(model_name)
    reports = sorted(base.rglob(LOG_REPORT))
    if not reports:
        summaries = sorted(
            p for p in path.glob(f"*.{run_id}.json" if run_id else "*.json") if p.is_file() and _is_summary_file(p)
        )
        if len(summaries) == 1:
            return read_report(summaries[0])
        if summaries:
            raise HarnessReportError(
                f"{path}: several summary reports ({', '.join(p.name for p in summaries)}); pass run_id and model_name"
            )
        raise HarnessReportError(f"{path}: no SWE-bench summary report and no per-instance {LOG_REPORT} below it")
    result: dict[str, bool] = {}
    where: dict[str, Path] = {}
    for report in reports:
        try:
            instance_id, resolved = _read_instance_report(report, _load_json(report), report.parent.name)
        except HarnessReportError as e:
            if strict:
                raise
            logger.warning("%s; counted unresolved", e)
            instance_id, resolved = report.parent.name, False
        if instance_id in where:
            raise HarnessReportError(
                f"reports for {instance_id!r} in both {where[instance_id]} and {report} (several runs or models "
                f"below {base}); pass run_id and model_name"
            )
        where[instance_id] = report
        result[instance_id] = resolved
    return result


def _is_summary_file(path: Path) -> bool:
    try:
        return _is_summary(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return False

"""Task sets: SWE-bench-format instances and local folders of toy tasks.

A [`Task`] is one issue to resolve in one repository at one commit, with the tests that decide success:
`FAIL_TO_PASS` (fail before the fix, must pass after) and `PASS_TO_PASS` (regression tests, must keep passing).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TEST_COMMAND = "python -m pytest -rA -q -p no:cacheprovider"


@dataclass
class Task:
    """One task instance.

    Attributes:
        instance_id: unique id (`owner__repo-1234` for SWE-bench).
        problem_statement: the issue text given to the agent.
        repo: `owner/name` for SWE-bench, or a name for local tasks.
        base_commit: the commit the agent starts from (None: the local folder as it is).
        FAIL_TO_PASS / PASS_TO_PASS: test ids (pytest node ids for local tasks).
        image: the Docker image of the instance (SWE-bench / R2E-Gym), for the Docker sandbox.
        repo_path: a local folder holding the repository (toy tasks, or a pre-cloned checkout).
        test_command: how the oracle runs tests; the test ids are appended.
        metadata: anything else (e.g. a toy task's reference fix).
    """

    instance_id: str
    problem_statement: str
    repo: str = ""
    base_commit: str | None = None
    FAIL_TO_PASS: list[str] = field(default_factory=list)
    PASS_TO_PASS: list[str] = field(default_factory=list)
    image: str | None = None
    repo_path: str | None = None
    test_command: str = DEFAULT_TEST_COMMAND
    metadata: dict[str, Any] = field(default_factory=dict)


def _test_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):  # SWE-bench stores these as JSON-encoded strings
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{where}: expected a JSON list of test ids, got {value[:80]!r}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: expected a list of test ids, got {value!r:.80}")
    return value


def swebench_image(instance_id: str) -> str:
    """The SWE-bench harness image name of an instance (`swebench/sweb.eval.x86_64.<id>:latest`)."""
    return f"swebench/sweb.eval.x86_64.{instance_id.replace('__', '_1776_').lower()}:latest"


_OPTIONAL_STRINGS = ("repo", "base_commit", "image", "docker_image", "repo_path", "test_command")


def task_from_swebench(instance: dict[str, Any], where: str = "instance") -> Task:
    """A task from a SWE-bench-format instance (`instance_id`, `repo`, `base_commit`, `problem_statement`,
    `FAIL_TO_PASS`, `PASS_TO_PASS`; optional `image` / `docker_image`, `repo_path`, `test_command`). Errors name
    `where` and the field."""
    if not isinstance(instance, dict):
        raise ValueError(f"{where}: expected a JSON object (one task instance), got {type(instance).__name__}")
    for key in ("instance_id", "problem_statement"):
        if not isinstance(instance.get(key), str) or not instance[key]:
            raise ValueError(f"{where}: missing or empty '{key}'")
    for key in _OPTIONAL_STRINGS:
        if instance.get(key) is not None and not isinstance(instance[key], str):
            raise ValueError(f"{where}: '{key}' must be a string, got {instance[key]!r:.80}")
    instance_id = instance["instance_id"]
    known = {
        "instance_id",
        "problem_statement",
        "repo",
        "base_commit",
        "FAIL_TO_PASS",
        "PASS_TO_PASS",
        "image",
        "docker_image",
        "repo_path",
        "test_command",
    }
    return Task(
        instance_id=instance_id,
        problem_statement=instance["problem_statement"],
        repo=instance.get("repo", ""),
        base_commit=instance.get("base_commit"),
        FAIL_TO_PASS=_test_list(instance.get("FAIL_TO_PASS", []), f"{where}.FAIL_TO_PASS"),
        PASS_TO_PASS=_test_list(instance.get("PASS_TO_PASS", []), f"{where}.PASS_TO_PASS"),
        image=instance.get("image")
        or instance.get("docker_image")
        or (swebench_image(instance_id) if instance.get("repo") and not instance.get("repo_path") else None),
        repo_path=instance.get("repo_path"),
        test_command=instance.get("test_command") or DEFAULT_TEST_COMMAND,
        metadata={k: v for k, v in instance.items() if k not in known},
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def _anchor_repo_path(instance: Any, base: Path) -> None:
    """Make a relative `repo_path` relative to `base` (the folder of the file that names it), not to the cwd."""
    if isinstance(instance, dict) and isinstance(instance.get("repo_path"), str) and instance["repo_path"]:
        instance["repo_path"] = str(base / instance["repo_path"])  # an absolute repo_path stays as it is


def load_swebench_tasks(path: str | os.PathLike) -> list[Task]:
    """Tasks from a SWE-bench-format JSON list or JSONL file (errors name the file, the line and the field). A
    relative `repo_path` is taken relative to the file's folder."""
    path = Path(path).resolve()
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})") from None
        for item in items:
            _anchor_repo_path(item, path.parent)
        return [task_from_swebench(item, f"{path}[{i}]") for i, item in enumerate(items)]
    tasks = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                instance = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: invalid JSON ({exc.msg})") from None
            _anchor_repo_path(instance, path.parent)
            tasks.append(task_from_swebench(instance, f"{path}, line {number}"))
    return tasks


def load_local_tasks(folder: str | os.PathLike) -> list[Task]:
    """Tasks from a folder of task folders, each with `task.json` (SWE-bench fields) and the repository in `repo/`
    (the layout [`entropo_trl.rollout.toy.make_toy_tasks`] writes). A `repo_path` in `task.json` is relative to its
    task folder; the folder may be given relative to the cwd (repo paths come out absolute). Errors name the
    `task.json` and the field."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"task folder not found: {folder}")
    tasks = []
    for task_dir in sorted(p.resolve() for p in folder.iterdir() if (p / "task.json").exists()):
        where = task_dir / "task.json"
        try:
            instance = json.loads(_read_text(where))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}, line {exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(instance, dict):
            raise ValueError(f"{where}: expected a JSON object (one task instance), got {type(instance).__name__}")
        if instance.get("repo_path") in (None, ""):
            instance["repo_path"] = "repo"
        _anchor_repo_path(instance, task_dir)
        task = task_from_swebench(instance, str(where))
        if not Path(task.repo_path).is_dir():
            raise ValueError(f"{where}: 'repo_path': repository folder not found: {task.repo_path}")
        tasks.append(task)
    if not tasks:
        raise ValueError(f"{folder} holds no task folders (each needs a task.json)")
    return tasks


def load_tasks(source: str | os.PathLike) -> list[Task]:
    """A folder of local tasks, or a SWE-bench-format JSON / JSONL file (a relative path is taken from the cwd)."""
    return load_local_tasks(source) if Path(source).is_dir() else load_swebench_tasks(source)

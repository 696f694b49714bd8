"""The test oracle: apply an episode's patch in a fresh sandbox, run the instance's tests, parse the results.

Reward 1 when every FAIL_TO_PASS and every PASS_TO_PASS test passes, else 0. The regression counts are the
PASS_TO_PASS tests that pass and those that do not (failed, errored, or missing from the log): the paper's hybrid
selector keeps the regression-free candidates (fail count 0), the authors' code the most passing ones.
[`OracleResult.label`] writes the reward and both counts onto the episode's trajectory.

Two ways to run the tests:

- SWE-bench instances that ship their evaluation script (`eval_script` and `log_parser`, as swebench 5 datasets do):
  the script runs in the sandbox after the agent's patch (it resets the test files, applies `test_patch`, activates
  the environment and runs the repository's own test command), and swebench's own log parser and grading decide
  which tests passed. Needs the `swebench` package (`pip install "entropo-trl[eval]"`).
- Otherwise (local and toy tasks, older instances): `test_patch`, if the instance has one, is applied after resetting
  the files it touches to the base commit, then `task.test_command` runs the test ids, read as a pytest log.

Before either runs, the test infrastructure is restored from the base commit ([`restore_test_infrastructure`]), so a
model's edits to it never decide its reward: what counts is [`is_test_infrastructure`]. The paths whose edits were
dropped are [`OracleResult.dropped_test_edits`], written to `trajectory.metadata["dropped_test_edits"]`.

An oracle that cannot run the tests at all (the test command is not found, the test patch does not apply, the
evaluation environment is broken) raises [`OracleError`]: that says nothing about the agent's patch, so the runner
does not record a reward for it.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
import shlex
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..data.test_logs import parse_pytest_statuses
from ..data.trajectory import Trajectory
from .sandbox import CommandResult, Sandbox
from .tasks import DEFAULT_TEST_COMMAND, Task


class OracleError(RuntimeError):
    """The tests could not be run, for reasons that are not the agent's patch."""


@dataclass
class OracleResult:
    reward: float
    fail_to_pass: dict[str, bool] = field(default_factory=dict)
    pass_to_pass: dict[str, bool] = field(default_factory=dict)
    patch_applied: bool = True
    test_output: str = ""
    # test-infrastructure paths the patch edited, created or deleted: restored from the base commit before the tests
    dropped_test_edits: list[str] = field(default_factory=list)

    @property
    def regression_pass_count(self) -> int:
        """PASS_TO_PASS tests that pass."""
        return sum(self.pass_to_pass.values())

    @property
    def regression_fail_count(self) -> int:
        """PASS_TO_PASS tests that do not pass: 0 when the patch is regression-free."""
        return len(self.pass_to_pass) - self.regression_pass_count

    def label(self, trajectory: Trajectory) -> Trajectory:
        """Write the verdict onto `trajectory` (in place): reward, regression pass and fail counts,
        `metadata["patch_applied"]` and `metadata["dropped_test_edits"]` (a list, empty when none); returns it."""
        trajectory.reward = self.reward
        trajectory.regression_pass_count = self.regression_pass_count
        trajectory.regression_fail_count = self.regression_fail_count
        trajectory.metadata["patch_applied"] = self.patch_applied
        trajectory.metadata["dropped_test_edits"] = list(self.dropped_test_edits)
        return trajectory


def evaluate_patch(
    task: Task, patch: str, sandbox_factory: Callable[[Task], Sandbox], timeout: float = 900.0
) -> OracleResult:
    """Apply `patch` in a fresh sandbox of `task`, restore the test infrastructure from the base commit, and run its
    FAIL_TO_PASS + PASS_TO_PASS tests."""
    tests = list(task.FAIL_TO_PASS) + list(task.PASS_TO_PASS)
    if not tests:
        raise ValueError(f"task {task.instance_id} lists no FAIL_TO_PASS / PASS_TO_PASS tests to judge by")
    dropped: list[str] = []
    with sandbox_factory(task) as sandbox:
        if patch.strip():
            before = _changed_paths(task, sandbox)
            applied = sandbox.apply_patch(patch)
            if applied.exit_code != 0:
                return OracleResult(
                    0.0,
                    {t: False for t in task.FAIL_TO_PASS},
                    {t: False for t in task.PASS_TO_PASS},
                    patch_applied=False,
                    test_output=applied.stdout + applied.stderr,
                )
            touched = set(patch_paths(patch)) | (_changed_paths(task, sandbox) - before)
            dropped = restore_test_infrastructure(task, sandbox, touched)
        if task.metadata.get("eval_script") and task.metadata.get("log_parser"):
            result = _run_swebench_eval(task, sandbox, timeout)
            result.dropped_test_edits = dropped
            return result
        unittest_ids = [t for t in tests if _UNITTEST_ID.match(t)]
        if unittest_ids and task.test_command == DEFAULT_TEST_COMMAND:
            raise OracleError(
                f"task {task.instance_id}: test ids such as {unittest_ids[0]!r} are not pytest node ids; give the "
                "instance its eval_script and log_parser (swebench 5 datasets ship them) or a test_command"
            )
        if task.metadata.get("test_patch"):
            _apply_test_patch(task, sandbox, task.metadata["test_patch"])
        command = task.test_command + " " + " ".join(shlex.quote(t) for t in tests)
        result = sandbox.run(command, timeout=timeout)
    output = result.stdout + "\n" + result.stderr
    statuses = parse_pytest_statuses(output)
    if not statuses and result.exit_code in (126, 127):  # the shell could not find or run the test command
        raise OracleError(
            f"task {task.instance_id}: the test command could not run (exit code {result.exit_code}): "
            f"{task.test_command!r}: {result.stderr.strip()[-500:]}"
        )
    f2p = {t: statuses.get(t) == "PASSED" for t in task.FAIL_TO_PASS}
    p2p = {t: statuses.get(t) == "PASSED" for t in task.PASS_TO_PASS}
    reward = 1.0 if all(f2p.values()) and all(p2p.values()) and not result.timed_out else 0.0
    return OracleResult(reward, f2p, p2p, test_output=output, dropped_test_edits=dropped)


# Django / unittest style ids, "test_name (module.Class)": what SWE-bench records for repositories not run by pytest
_UNITTEST_ID = re.compile(r"^\w+ \([\w.]+\)")


# ---------------------------------------------------------------------------------------------- test infrastructure

# pytest reads its configuration from these (in the rootdir or any folder above the tests it runs), tox from tox.ini
TEST_CONFIG_FILES = frozenset(
    {"pytest.ini", ".pytest.ini", "pytest.toml", ".pytest.toml", "tox.ini", "setup.cfg", "pyproject.toml"}
)
TEST_FILE_PATTERNS = ("test_*.py", "*_test.py")
# a directory of tests at any depth (`tests/`, `astropy/io/tests/`); `test/` and `testing/` only at the top level,
# since below it they are often library code (`django/test/`, `numpy/testing/`, `sympy/testing/`)
TEST_DIRS_ANYWHERE = frozenset({"tests"})
TEST_DIRS_AT_TOP = frozenset({"test", "tests", "testing"})
# `python -m pytest` imports from the working directory before site-packages: a top-level module with one of these
# names replaces the test runner, its plugins or the interpreter's start-up for the whole run
TEST_RUNNER_MODULES_AT_TOP = frozenset(
    {
        "pytest",
        "pytest.py",
        "_pytest",
        "py.py",
        "pluggy",
        "pluggy.py",
        "iniconfig",
        "iniconfig.py",
        "sitecustomize.py",
        "usercustomize.py",
    }
)
# compiled bytecode: pytest and Python load a cached `.pyc` whose header matches the source (or an unchecked
# hash-based one without looking at the source), so a forged one runs other code than the file it stands for
BYTECODE_SUFFIXES = (".pyc", ".pyo")


def is_test_infrastructure(path: str, test_files: Iterable[str] = ()) -> bool:
    """Whether a repository-relative `path` is test infrastructure, whose edits never decide a reward:

    - the test files of the instance, `test_files` (see [`task_test_files`]);
    - every `conftest.py`, at any depth;
    - test configuration files, whole, at any depth: `pytest.ini`, `.pytest.ini`, `pytest.toml`, `.pytest.toml`,
      `tox.ini`, `setup.cfg`, `pyproject.toml`;
    - test files by name: `test_*.py`, `*_test.py`;
    - anything under a `tests/` directory at any depth, or under a top-level `test/` or `testing/` directory (a
      file or link with one of those names counts too);
    - a top-level module that would shadow the test runner (`pytest.py`, `pytest/`, `_pytest/`, `pluggy`,
      `sitecustomize.py`, ...: `python -m pytest` imports the working directory first);
    - compiled bytecode anywhere (`__pycache__/`, `*.pyc`, `*.pyo`): a forged cache file runs instead of its source.

    Not covered: library code a test imports (a patch that monkeypatches pytest from the package under test).
    """
    path = posixpath.normpath(path.strip("/"))
    parts = path.split("/")
    name = parts[-1]
    return (
        path in {posixpath.normpath(p) for p in test_files}
        or name == "conftest.py"
        or name in TEST_CONFIG_FILES
        or any(fnmatch.fnmatchcase(name, pattern) for pattern in TEST_FILE_PATTERNS)
        or parts[0] in TEST_DIRS_AT_TOP
        or parts[0] in TEST_RUNNER_MODULES_AT_TOP
        or any(part in TEST_DIRS_ANYWHERE or part == "__pycache__" for part in parts)
        or name.endswith(BYTECODE_SUFFIXES)
    )


def task_test_files(task: Task) -> set[str]:
    """The files named by the task's test ids (the file part of pytest node ids, `path::name`) and those its
    `test_patch` touches."""
    files = {t.split("::", 1)[0] for t in [*task.FAIL_TO_PASS, *task.PASS_TO_PASS] if "::" in t}
    files |= set(patch_paths(task.metadata.get("test_patch") or ""))
    return files


def restore_test_infrastructure(task: Task, sandbox: Sandbox, touched: Iterable[str]) -> list[str]:
    """Restore the test-infrastructure paths among `touched` (paths an applied patch changed) from the sandbox's base
    commit: a file the base commit holds is checked out from it, any other is removed. Returns those paths, sorted.

    Raises [`OracleError`] when git cannot restore them."""
    test_files = task_test_files(task)
    dropped = sorted({p for p in touched if p and is_test_infrastructure(p, test_files)})
    base = shlex.quote(sandbox.base_commit)
    for start in range(0, len(dropped), _RESTORE_CHUNK):
        quoted = " ".join(shlex.quote(p) for p in dropped[start : start + _RESTORE_CHUNK])
        script = (
            f'set -e; for f in {quoted}; do if git cat-file -e {base}:"$f" 2>/dev/null; then '
            f'if [ -L "$f" ] || [ -f "$f" ]; then rm -f -- "$f"; fi; git checkout -q {base} -- "$f"; '
            f'else rm -f -- "$f"; fi; done'
        )
        result = sandbox.run(script, timeout=300)
        if not result.ok:
            raise OracleError(
                f"task {task.instance_id}: could not restore the test infrastructure: {result.stderr.strip()[-500:]}"
            )
    return dropped


# paths per restoring command: a command line is one argument to bash, limited to 128 KiB
_RESTORE_CHUNK = 200


def _changed_paths(task: Task, sandbox: Sandbox) -> set[str]:
    """Paths that differ from the base commit: tracked files changed or deleted, and new files git does not ignore."""
    base = shlex.quote(sandbox.base_commit)
    result = sandbox.run(
        f"git diff --name-only --no-renames -z {base} && git ls-files --others --exclude-standard -z", timeout=300
    )
    if not result.ok:
        raise OracleError(f"task {task.instance_id}: could not list the changed files: {result.stderr.strip()}")
    return {p for p in result.stdout.split("\0") if p}


# ---------------------------------------------------------------------------------------------------------- patches


@dataclass
class PatchSection:
    """One file's part of a unified diff (its header lines and hunks), with the repository-relative paths it names
    (before and after; one for an edit, two for a rename). Text before the first file has no paths."""

    paths: list[str]
    text: str


_HUNK = re.compile(r"^@@ -\d+(?:,(\d+))? \+\d+(?:,(\d+))? @@")
_GIT_HEADER_PATHS = ("rename from ", "rename to ", "copy from ", "copy to ")
_C_ESCAPES = {"a": 7, "b": 8, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13, '"': 34, "\\": 92}


def split_patch(patch: str) -> list[PatchSection]:
    """Split a unified diff (git or traditional) into per-file sections, as `git apply` reads it: a section starts at
    a `diff --git` line, or at a `---` / `+++` pair outside a git header; hunks are read by their line counts.
    Joining the sections' text gives `patch` back."""
    lines = patch.splitlines(keepends=True)
    sections: list[PatchSection] = []
    current = PatchSection([], "")
    chunks: list[str] = []
    git_header = False  # inside a `diff --git` header, before its `---` / `+++` lines or first hunk
    i = 0

    def start(paths: list[str]) -> None:
        nonlocal current, chunks
        if chunks or current.paths:
            current.text = "".join(chunks)
            sections.append(current)
        current, chunks = PatchSection(paths, ""), []

    while i < len(lines):
        line = lines[i]
        if line.startswith("diff --git "):
            start(_git_header_paths(line[len("diff --git ") :].rstrip("\r\n")))
            git_header = True
        elif line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            if not git_header:
                start([])
            git_header = False
            for header in (line[4:], lines[i + 1][4:]):
                path = _file_header_path(header)
                if path and path not in current.paths:
                    current.paths.append(path)
            chunks += [line, lines[i + 1]]
            i += 2
            continue
        elif (hunk := _HUNK.match(line)) and (current.paths or chunks):
            git_header = False
            old = int(hunk.group(1)) if hunk.group(1) is not None else 1
            new = int(hunk.group(2)) if hunk.group(2) is not None else 1
            chunks.append(line)
            i += 1
            while i < len(lines) and (old > 0 or new > 0 or lines[i].startswith("\\")):
                kind = lines[i][:1]
                if kind in (" ", "\n", "\r"):  # git apply reads an empty line as an empty context line
                    old, new = old - 1, new - 1
                elif kind == "-":
                    old -= 1
                elif kind == "+":
                    new -= 1
                elif kind != "\\":
                    break
                chunks.append(lines[i])
                i += 1
            continue
        elif git_header and line.startswith(_GIT_HEADER_PATHS):
            path = _unquote(line.split(" ", 2)[2].rstrip("\r\n"))
            if path not in current.paths:
                current.paths.append(path)
        chunks.append(line)
        i += 1
    start([])
    return sections


def patch_paths(patch: str) -> list[str]:
    """Every repository-relative path a unified diff names (created, edited, deleted, renamed), in order, once."""
    seen: dict[str, None] = {}
    for section in split_patch(patch):
        seen.update(dict.fromkeys(section.paths))
    return list(seen)


def _unquote(text: str) -> str:
    """A path as git writes it: bare, or in double quotes with C escapes (octal bytes for non-ASCII)."""
    if not (len(text) >= 2 and text[0] == '"' and text[-1] == '"'):
        return text
    out = bytearray()
    body, k = text[1:-1], 0
    while k < len(body):
        char = body[k]
        if char == "\\" and k + 1 < len(body):
            escape = body[k + 1]
            if escape in "01234567" and re.fullmatch(r"[0-7]{3}", body[k + 1 : k + 4]):
                out.append(int(body[k + 1 : k + 4], 8) & 0xFF)
                k += 4
                continue
            out.append(_C_ESCAPES.get(escape, ord(escape) if escape.isascii() else 0x3F))
            k += 2
            continue
        out += char.encode("utf-8")
        k += 1
    return out.decode("utf-8", errors="replace")


def _strip_component(path: str) -> str:
    """`git apply -p1`: the path without its first component (`a/`, `b/`)."""
    return path.split("/", 1)[1] if "/" in path else path


def _file_header_path(header: str) -> str | None:
    """The path of a `--- ` / `+++ ` line's rest (None for /dev/null); a traditional diff may follow it with a tab
    and a timestamp."""
    header = header.rstrip("\r\n")
    if header.startswith('"'):
        end = re.match(r'"(?:[^"\\]|\\.)*"', header)
        name = _unquote(end.group(0)) if end else header
    else:
        name = header.split("\t", 1)[0].rstrip(" ")
    return None if name == "/dev/null" else _strip_component(name)


def _git_header_paths(rest: str) -> list[str]:
    """The two paths of a `diff --git a/X b/Y` line (bare or quoted); for bare paths with spaces, the split where
    both sides name the same file (a rename's paths also come from its `rename from` / `rename to` lines)."""
    if rest.startswith('"'):
        first = re.match(r'"(?:[^"\\]|\\.)*"', rest)
        if first is None:
            return []
        names = [_unquote(first.group(0)), _unquote(rest[first.end() :].strip())]
    elif rest.endswith('"') and ' "' in rest:
        k = rest.index(' "')
        names = [rest[:k], _unquote(rest[k + 1 :])]
    else:
        spaces = [k for k, c in enumerate(rest) if c == " "]
        same = [k for k in spaces if _strip_component(rest[:k]) == _strip_component(rest[k + 1 :])]
        k = same[0] if same else (rest.find(" b/") if " b/" in rest else (spaces[0] if spaces else -1))
        names = [rest[:k], rest[k + 1 :]] if k >= 0 else [rest]
    paths = [_strip_component(n) for n in names]
    return list(dict.fromkeys(p for p in paths if p))


def _apply_test_patch(task: Task, sandbox: Sandbox, test_patch: str) -> None:
    """Reset the files `test_patch` touches to the base commit (the agent may have edited or created them), then
    apply it, as the SWE-bench harness does."""
    paths = sorted(patch_paths(test_patch))
    if paths:
        quoted = " ".join(shlex.quote(p) for p in paths)
        base = shlex.quote(sandbox.base_commit)
        # files that exist at the base commit are checked out from it; the others are removed
        reset = (
            f'for f in {quoted}; do if git cat-file -e {base}:"$f" 2>/dev/null; then '
            f'git checkout -q {base} -- "$f"; else rm -f -- "$f"; fi; done'
        )
        result = sandbox.run(reset, timeout=300)
        if not result.ok:
            raise OracleError(f"task {task.instance_id}: could not reset the test files: {result.stderr.strip()}")
    applied = sandbox.apply_patch(test_patch)
    if not applied.ok:
        raise OracleError(
            f"task {task.instance_id}: its test_patch does not apply at the base commit: {applied.stderr.strip()}"
        )


def _run_swebench_eval(task: Task, sandbox: Sandbox, timeout: float) -> OracleResult:
    try:
        from swebench.harness.constants import FAIL_TO_PASS, PASS_TO_PASS, EvalType
        from swebench.harness.grading import get_eval_tests_report, get_logs_eval
        from swebench.harness.infra_failure import TIER_ENVIRONMENT, classify_text
        from swebench.harness.utils import make_test_spec
    except ImportError as error:
        raise OracleError(
            f"task {task.instance_id} ships a SWE-bench eval_script, which needs the swebench package "
            f'(pip install "entropo-trl[eval]"): {error}'
        ) from error
    instance = {
        "version": "",
        "eval_type": EvalType.PASS_AND_FAIL.value,
        **task.metadata,
        "instance_id": task.instance_id,
        "repo": task.repo,
        "image": task.image or "",
        "FAIL_TO_PASS": list(task.FAIL_TO_PASS),
        "PASS_TO_PASS": list(task.PASS_TO_PASS),
    }
    spec = make_test_spec(instance)
    script = f"{sandbox.scratch_dir}/entropo-eval.sh"
    sandbox.write_file(script, spec.eval_script)
    result = sandbox.run(f"bash {shlex.quote(script)}", timeout=timeout)
    output = _log_text(result)
    with tempfile.TemporaryDirectory(prefix="entropo-oracle-") as folder:
        log = Path(folder) / "test_output.txt"
        log.write_text(output, encoding="utf-8")
        status_map, valid = get_logs_eval(spec, str(log))
    if not valid:
        failure = classify_text(output)
        if failure is not None and failure[0] == TIER_ENVIRONMENT:
            raise OracleError(f"task {task.instance_id}: the evaluation environment failed ({failure[1]})")
        return OracleResult(
            0.0, {t: False for t in task.FAIL_TO_PASS}, {t: False for t in task.PASS_TO_PASS}, test_output=output
        )
    report = get_eval_tests_report(
        status_map,
        {FAIL_TO_PASS: spec.FAIL_TO_PASS, PASS_TO_PASS: spec.PASS_TO_PASS},
        eval_type=EvalType(spec.eval_type) if spec.eval_type else EvalType.PASS_AND_FAIL,
    )
    f2p = {t: t in report[FAIL_TO_PASS]["success"] for t in task.FAIL_TO_PASS}
    p2p = {t: t in report[PASS_TO_PASS]["success"] for t in task.PASS_TO_PASS}
    reward = 1.0 if all(f2p.values()) and all(p2p.values()) and not result.timed_out else 0.0
    return OracleResult(reward, f2p, p2p, test_output=output)


def _log_text(result: CommandResult) -> str:
    text = result.stdout + "\n" + result.stderr
    if result.timed_out:
        text += "\n>>>>> Tests Timed Out"
    return text

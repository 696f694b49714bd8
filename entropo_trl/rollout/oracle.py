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

An oracle that cannot run the tests at all (the test command is not found, the test patch does not apply, the
evaluation environment is broken) raises [`OracleError`]: that says nothing about the agent's patch, so the runner
does not record a reward for it.
"""

from __future__ import annotations

import re
import shlex
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..trajectory import Trajectory, parse_pytest_statuses
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

    @property
    def regression_pass_count(self) -> int:
        """PASS_TO_PASS tests that pass."""
        return sum(self.pass_to_pass.values())

    @property
    def regression_fail_count(self) -> int:
        """PASS_TO_PASS tests that do not pass: 0 when the patch is regression-free."""
        return len(self.pass_to_pass) - self.regression_pass_count

    def label(self, trajectory: Trajectory) -> Trajectory:
        """Write the verdict onto `trajectory` (in place): reward, regression pass and fail counts, and
        `metadata["patch_applied"]`; returns it."""
        trajectory.reward = self.reward
        trajectory.regression_pass_count = self.regression_pass_count
        trajectory.regression_fail_count = self.regression_fail_count
        trajectory.metadata["patch_applied"] = self.patch_applied
        return trajectory


def evaluate_patch(
    task: Task, patch: str, sandbox_factory: Callable[[Task], Sandbox], timeout: float = 900.0
) -> OracleResult:
    """Apply `patch` in a fresh sandbox of `task` and run its FAIL_TO_PASS + PASS_TO_PASS tests."""
    tests = list(task.FAIL_TO_PASS) + list(task.PASS_TO_PASS)
    if not tests:
        raise ValueError(f"task {task.instance_id} lists no FAIL_TO_PASS / PASS_TO_PASS tests to judge by")
    with sandbox_factory(task) as sandbox:
        if patch.strip():
            applied = sandbox.apply_patch(patch)
            if applied.exit_code != 0:
                return OracleResult(
                    0.0,
                    {t: False for t in task.FAIL_TO_PASS},
                    {t: False for t in task.PASS_TO_PASS},
                    patch_applied=False,
                    test_output=applied.stdout + applied.stderr,
                )
        if task.metadata.get("eval_script") and task.metadata.get("log_parser"):
            return _run_swebench_eval(task, sandbox, timeout)
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
    return OracleResult(reward, f2p, p2p, test_output=output)


# Django / unittest style ids, "test_name (module.Class)": what SWE-bench records for repositories not run by pytest
_UNITTEST_ID = re.compile(r"^\w+ \([\w.]+\)")
_DIFF_PATHS = re.compile(r"^diff --git a/(\S+) b/(\S+)$", re.MULTILINE)


def _apply_test_patch(task: Task, sandbox: Sandbox, test_patch: str) -> None:
    """Reset the files `test_patch` touches to the base commit (the agent may have edited or created them), then
    apply it, as the SWE-bench harness does."""
    paths = sorted({path for pair in _DIFF_PATHS.findall(test_patch) for path in pair})
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

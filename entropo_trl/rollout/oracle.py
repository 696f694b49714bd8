"""The test oracle: apply an episode's patch in a fresh sandbox, run the instance's tests, parse the results.

Reward 1 when every FAIL_TO_PASS and every PASS_TO_PASS test passes, else 0; the regression pass count is the number
of PASS_TO_PASS tests that pass (what the hybrid selector's regression stage ranks by).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field

from ..trajectory import parse_pytest_statuses
from .sandbox import Sandbox
from .tasks import Task


@dataclass
class OracleResult:
    reward: float
    fail_to_pass: dict[str, bool] = field(default_factory=dict)
    pass_to_pass: dict[str, bool] = field(default_factory=dict)
    patch_applied: bool = True
    test_output: str = ""

    @property
    def regression_pass_count(self) -> int:
        return sum(self.pass_to_pass.values())


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
        command = task.test_command + " " + " ".join(shlex.quote(t) for t in tests)
        result = sandbox.run(command, timeout=timeout)
    output = result.stdout + "\n" + result.stderr
    statuses = parse_pytest_statuses(output)
    f2p = {t: statuses.get(t) == "PASSED" for t in task.FAIL_TO_PASS}
    p2p = {t: statuses.get(t) == "PASSED" for t in task.PASS_TO_PASS}
    reward = 1.0 if all(f2p.values()) and all(p2p.values()) and not result.timed_out else 0.0
    return OracleResult(reward, f2p, p2p, test_output=output)

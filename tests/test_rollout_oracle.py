"""The test oracle on SWE-bench-shaped instances, run in local sandboxes: the instance's test patch, its own
evaluation script graded by swebench, test ids with spaces, and a test command that cannot run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from entropo_trl.rollout.oracle import OracleError, evaluate_patch
from entropo_trl.rollout.runner import default_sandbox_factory
from entropo_trl.rollout.tasks import DEFAULT_TEST_COMMAND, task_from_swebench

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

BUGGY = "def area(w, h):\n    return w + h\n"
FIXED = "def area(w, h):\n    return w * h\n"
OLD_TESTS = "from geo import area\n\n\ndef test_square():\n    assert area(2, 2) == 4\n"
# the instance's new tests: the FAIL_TO_PASS ones exist only once its test patch is applied
NEW_TESTS = (
    "import pytest\n\nfrom geo import area\n\n\ndef test_square():\n    assert area(2, 2) == 4\n\n\n"
    '@pytest.mark.parametrize("w, h", [(2, 3)], ids=["two by three"])\n'
    "def test_rectangle(w, h):\n    assert area(w, h) == 6\n"
)
F2P = ["tests/test_geo.py::test_rectangle[two by three]"]
P2P = ["tests/test_geo.py::test_square"]


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, env={**os.environ, **GIT_ENV}, check=True, capture_output=True)


def _diff(repo: Path, path: str, new: str) -> str:
    """The patch that turns `path` into `new` (the working tree is left as it was)."""
    target = repo / path
    old = target.read_text()
    target.write_text(new)
    try:
        return _git(repo, "diff").stdout.decode()
    finally:
        target.write_text(old)


@pytest.fixture
def instance(tmp_path):
    repo = tmp_path / "geo"
    (repo / "tests").mkdir(parents=True)
    (repo / "geo.py").write_text(BUGGY)
    (repo / "tests" / "test_geo.py").write_text(OLD_TESTS)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "base")
    base = _git(repo, "rev-parse", "HEAD").stdout.decode().strip()
    return {
        "instance_id": "geo__geo-1",
        "problem_statement": "area() adds instead of multiplying",
        "repo": "geo/geo",
        "base_commit": base,
        "repo_path": str(repo),
        "FAIL_TO_PASS": F2P,
        "PASS_TO_PASS": P2P,
        "test_patch": _diff(repo, "tests/test_geo.py", NEW_TESTS),
        "gold_patch": _diff(repo, "geo.py", FIXED),
        "test_command": f"{sys.executable} -m pytest -rA -p no:cacheprovider",
    }


def _eval_script(instance) -> str:
    """An evaluation script shaped like SWE-bench's (reset the test files, apply the test patch, run the tests between
    the output markers, reset again), written for a local checkout instead of /testbed."""
    base = instance["base_commit"]
    return "\n".join(
        [
            "#!/bin/bash",
            "set -uxo pipefail",
            f"git checkout {base} tests/test_geo.py",
            "git apply -v - <<'EOF_114329324912'",
            instance["test_patch"].rstrip("\n"),
            "EOF_114329324912",
            ": '>>>>> Start Test Output'",
            f"{sys.executable} -m pytest -rA -p no:cacheprovider tests/test_geo.py",
            ": '>>>>> End Test Output'",
            f"git checkout {base} tests/test_geo.py",
        ]
    )


def test_the_test_patch_is_applied_and_the_agents_test_edits_are_reset(instance):
    task = task_from_swebench(instance)
    factory = default_sandbox_factory("local")
    gold = evaluate_patch(task, instance["gold_patch"], factory)
    assert gold.reward == 1.0 and gold.fail_to_pass == {F2P[0]: True} and gold.regression_pass_count == 1
    assert gold.regression_fail_count == 0
    assert evaluate_patch(task, "", factory).reward == 0.0  # the bug is real
    # an agent that "fixes" the old test instead of the code: its test edit is reset before the tests run
    cheat = _diff(Path(instance["repo_path"]), "tests/test_geo.py", OLD_TESTS.replace("== 4", "== 4 or True"))
    result = evaluate_patch(task, cheat, factory)
    assert result.patch_applied and result.reward == 0.0 and result.fail_to_pass == {F2P[0]: False}


def test_the_oracle_counts_regression_failures_and_labels_the_trajectory(instance):
    """The PASS_TO_PASS tests that do not pass are the regression fail count (0: regression-free), written onto the
    episode's trajectory with the pass count, the reward and whether the patch applied."""
    from entropo_trl.trajectory import Trajectory

    task = task_from_swebench(instance)
    factory = default_sandbox_factory("local")
    gold = evaluate_patch(task, instance["gold_patch"], factory)
    assert (gold.regression_pass_count, gold.regression_fail_count) == (1, 0)
    breaking = _diff(Path(instance["repo_path"]), "geo.py", "def area(w, h):\n    return 0\n")  # breaks P2P too
    broken = evaluate_patch(task, breaking, factory)
    assert broken.pass_to_pass == {P2P[0]: False}
    assert (broken.regression_pass_count, broken.regression_fail_count) == (0, 1)
    unapplied = evaluate_patch(
        task, "diff --git a/nothing b/nothing\n--- a/nothing\n+++ b/nothing\n@@ -1 +1 @@\n-a\n+b\n", factory
    )
    assert not unapplied.patch_applied and unapplied.regression_fail_count == len(P2P)
    trajectory = Trajectory(instance_id=task.instance_id, messages=[{"role": "user", "content": "fix"}], reward=0.0)
    assert broken.label(trajectory) is trajectory
    assert (trajectory.reward, trajectory.regression_pass_count, trajectory.regression_fail_count) == (0.0, 0, 1)
    gold.label(trajectory)
    assert (trajectory.reward, trajectory.regression_pass_count, trajectory.regression_fail_count) == (1.0, 1, 0)
    assert trajectory.metadata["patch_applied"] is True
    assert unapplied.label(trajectory).metadata["patch_applied"] is False


def test_a_broken_test_patch_is_an_oracle_error(instance):
    broken = instance["test_patch"].replace("\n from geo import area", "\n from geo import nothing")  # bad context
    assert broken != instance["test_patch"]
    task = task_from_swebench({**instance, "test_patch": broken})
    with pytest.raises(OracleError, match="test_patch does not apply"):
        evaluate_patch(task, instance["gold_patch"], default_sandbox_factory("local"))


def test_an_instance_with_its_own_eval_script_is_graded_by_swebench(instance):
    pytest.importorskip("swebench")
    # swebench's pytest parser cuts test ids at the first space, and SWE-bench datasets store the ids it produced: the
    # instance's ids are graded with the instance's own parser
    f2p = ["tests/test_geo.py::test_rectangle[two"]
    shipped = {
        **instance,
        "FAIL_TO_PASS": f2p,
        "eval_script": _eval_script(instance),
        "log_parser": "parse_log_pytest",
        "version": "1.0",
    }
    shipped.pop("test_command")  # not used on this path: the script runs the tests
    task = task_from_swebench(shipped)
    factory = default_sandbox_factory("local")
    gold = evaluate_patch(task, instance["gold_patch"], factory)
    assert ">>>>> Start Test Output" in gold.test_output
    assert gold.reward == 1.0 and gold.fail_to_pass == {f2p[0]: True} and gold.pass_to_pass == {P2P[0]: True}
    unfixed = evaluate_patch(task, "", factory)
    assert unfixed.reward == 0.0 and unfixed.fail_to_pass == {f2p[0]: False} and unfixed.pass_to_pass == {P2P[0]: True}
    assert unfixed.regression_fail_count == 0  # the bug is unfixed, but nothing regressed


def test_a_test_command_that_cannot_run_is_an_oracle_error(instance):
    task = task_from_swebench({**instance, "test_command": "no-such-test-runner"})
    with pytest.raises(OracleError, match="could not run"):
        evaluate_patch(task, instance["gold_patch"], default_sandbox_factory("local"))


def test_unittest_style_ids_without_an_eval_script_are_an_oracle_error(instance):
    """Django's ids ("test_x (module.Class)") cannot be run as pytest node ids: rewarding 0 would be wrong."""
    task = task_from_swebench({**instance, "FAIL_TO_PASS": ["test_area (geo.tests.AreaTests)"]})
    task.test_command = DEFAULT_TEST_COMMAND
    with pytest.raises(OracleError, match="not pytest node ids"):
        evaluate_patch(task, instance["gold_patch"], default_sandbox_factory("local"))

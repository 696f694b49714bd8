"""The test oracle on SWE-bench-shaped instances and toy tasks, run in local sandboxes: the instance's test patch, its
own evaluation script graded by swebench, test ids with spaces, a test command that cannot run, and the test
infrastructure restored from the base commit (the conftest reward hack of issue 12 and other test edits)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from entropo_trl.data.test_logs import parse_pytest_statuses
from entropo_trl.data.trajectory import Trajectory
from entropo_trl.rollout.oracle import (
    OracleError,
    evaluate_patch,
    is_test_infrastructure,
    patch_paths,
    split_patch,
    task_test_files,
)
from entropo_trl.rollout.runner import default_sandbox_factory
from entropo_trl.rollout.tasks import DEFAULT_TEST_COMMAND, task_from_swebench
from entropo_trl.rollout.toy import CONFTEST_REWARD_HACK, make_toy_tasks

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
    assert result.dropped_test_edits == ["tests/test_geo.py"] and gold.dropped_test_edits == []


def test_the_oracle_counts_regression_failures_and_labels_the_trajectory(instance):
    """The PASS_TO_PASS tests that do not pass are the regression fail count (0: regression-free), written onto the
    episode's trajectory with the pass count, the reward and whether the patch applied."""
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


# --------------------------------------------------------------------------------------------------------------------
# test infrastructure: restored from the base commit, whatever the patch did to it


@pytest.fixture(scope="module")
def toy_tasks(tmp_path_factory):
    return make_toy_tasks(tmp_path_factory.mktemp("toy"), n=3)


def _patch_of(task, factory, edits):
    """The patch a model would hand in after `edits(sandbox)` in a fresh sandbox of `task`."""
    with factory(task) as sandbox:
        edits(sandbox)
        return sandbox.diff()


def _unguarded_reward(task, patch, factory):
    """The reward without the restoration: the patch applied and the tests run, as the oracle did before issue 12."""
    with factory(task) as sandbox:
        assert sandbox.apply_patch(patch).ok
        tests = [*task.FAIL_TO_PASS, *task.PASS_TO_PASS]
        result = sandbox.run(f"{task.test_command} {' '.join(tests)}", timeout=300)
    statuses = parse_pytest_statuses(result.stdout)
    return 1.0 if all(statuses.get(t) == "PASSED" for t in tests) else 0.0


def _create(relative, text):
    return lambda sandbox: sandbox.write_file(f"{sandbox.workdir}/{relative}", text)


def test_the_conftest_reward_hack_gets_nothing_on_the_toy_tasks(toy_tasks):
    """A patch that only adds a conftest.py forcing every outcome to "passed" was worth reward 1 on 3 of 3 toy tasks;
    the oracle removes the file the model created and the bug decides: reward 0, the conftest listed as dropped."""
    factory = default_sandbox_factory("local")
    for task in toy_tasks:
        patch = _patch_of(task, factory, _create("conftest.py", CONFTEST_REWARD_HACK))
        assert _unguarded_reward(task, patch, factory) == 1.0  # the hack works on the tests as they were run before
        result = evaluate_patch(task, patch, factory)
        assert result.patch_applied and result.reward == 0.0 and result.dropped_test_edits == ["conftest.py"]
        assert not any(result.fail_to_pass.values())
        trajectory = Trajectory(
            instance_id=task.instance_id, messages=[{"role": "user", "content": "fix"}], reward=1.0
        )
        assert result.label(trajectory).metadata["dropped_test_edits"] == ["conftest.py"]


@pytest.mark.parametrize(
    "path, text",
    [
        ("tests/conftest.py", CONFTEST_REWARD_HACK),
        ("pytest.ini", "[pytest]\naddopts = -p hack\n"),
        ("setup.cfg", "[tool:pytest]\naddopts = -p hack\n"),
    ],
)
def test_other_places_for_the_hack_are_dropped_too(toy_tasks, path, text):
    """A nested conftest.py, or a pytest configuration that loads the hook from a plugin module the patch adds."""
    task = toy_tasks[0]
    factory = default_sandbox_factory("local")

    def edits(sandbox):
        sandbox.write_file(f"{sandbox.workdir}/{path}", text)
        sandbox.write_file(f"{sandbox.workdir}/hack.py", CONFTEST_REWARD_HACK)

    patch = _patch_of(task, factory, edits)
    assert _unguarded_reward(task, patch, factory) == 1.0
    result = evaluate_patch(task, patch, factory)
    assert result.reward == 0.0 and result.dropped_test_edits == [path]  # hack.py is not test infrastructure


PYTEST_SHADOW = """import sys

for arg in sys.argv[1:]:
    if "::" in arg:
        print("PASSED", arg)
print("1 passed")
"""


def test_a_module_that_shadows_the_test_runner_gets_nothing(toy_tasks):
    """A top-level `pytest.py` runs instead of pytest under `python -m pytest` and prints every test as passed."""
    task = toy_tasks[0]
    factory = default_sandbox_factory("local")
    patch = _patch_of(task, factory, _create("pytest.py", PYTEST_SHADOW))
    assert _unguarded_reward(task, patch, factory) == 1.0
    result = evaluate_patch(task, patch, factory)
    assert result.reward == 0.0 and result.dropped_test_edits == ["pytest.py"]


def test_editing_an_existing_test_file_to_pass_gets_nothing(toy_tasks):
    factory = default_sandbox_factory("local")
    task = toy_tasks[0]

    def weaken(sandbox):
        path = f"{sandbox.workdir}/tests/test_core.py"
        sandbox.write_file(path, sandbox.read_file(path).replace("    assert ", "    assert True or "))

    patch = _patch_of(task, factory, weaken)
    assert _unguarded_reward(task, patch, factory) == 1.0
    result = evaluate_patch(task, patch, factory)
    assert result.reward == 0.0 and result.dropped_test_edits == ["tests/test_core.py"]
    assert result.regression_fail_count == 0  # the restored tests ran: the PASS_TO_PASS ones still pass


def test_a_genuine_fix_with_a_harmless_test_edit_still_passes(toy_tasks):
    """The fix counts; the test edits (one to an existing file, one new file) are dropped and listed."""
    factory = default_sandbox_factory("local")
    task = toy_tasks[1]
    fix = task.metadata["reference_fix"]

    def fix_and_add_tests(sandbox):
        source = f"{sandbox.workdir}/{fix['path']}"
        sandbox.write_file(source, sandbox.read_file(source).replace(fix["old"], fix["new"]))
        tests = f"{sandbox.workdir}/tests/test_core.py"
        sandbox.write_file(tests, sandbox.read_file(tests) + "\n\ndef test_more():\n    assert True\n")
        sandbox.write_file(f"{sandbox.workdir}/tests/test_extra.py", "def test_extra():\n    assert True\n")

    result = evaluate_patch(task, _patch_of(task, factory, fix_and_add_tests), factory)
    assert result.reward == 1.0 and result.regression_fail_count == 0
    assert result.dropped_test_edits == ["tests/test_core.py", "tests/test_extra.py"]
    clean = evaluate_patch(task, _patch_of(task, factory, lambda s: None), factory)
    trajectory = Trajectory(instance_id=task.instance_id, messages=[{"role": "user", "content": "fix"}], reward=1.0)
    assert clean.dropped_test_edits == [] and clean.label(trajectory).metadata["dropped_test_edits"] == []


def test_the_conftest_hack_gets_nothing_under_the_instances_eval_script(instance):
    """The SWE-bench path: the instance's script resets only its own test files; the oracle removes the conftest."""
    pytest.importorskip("swebench")
    shipped = {**instance, "eval_script": _eval_script(instance), "log_parser": "parse_log_pytest", "version": "1.0"}
    shipped["FAIL_TO_PASS"] = ["tests/test_geo.py::test_rectangle[two"]
    task = task_from_swebench(shipped)
    factory = default_sandbox_factory("local")
    hack = _patch_of(task, factory, _create("conftest.py", CONFTEST_REWARD_HACK))
    result = evaluate_patch(task, hack, factory)
    assert result.reward == 0.0 and result.dropped_test_edits == ["conftest.py"]


@pytest.mark.parametrize(
    "path, infrastructure",
    [
        ("conftest.py", True),
        ("src/pkg/conftest.py", True),
        ("tests/helpers.py", True),
        ("astropy/io/fits/tests/data/x.fits", True),
        ("test/util.py", True),
        ("testing/python/approx.py", True),
        ("pkg/test_io.py", True),
        ("pkg/io_test.py", True),
        ("pytest.ini", True),
        ("tox.ini", True),
        ("setup.cfg", True),
        ("pyproject.toml", True),
        ("sub/pyproject.toml", True),
        ("tests", True),
        ("pytest.py", True),  # `python -m pytest` imports the working directory first: these replace the runner
        ("pytest/__main__.py", True),
        ("_pytest/runner.py", True),
        ("sitecustomize.py", True),
        ("__pycache__/conftest.cpython-311-pytest-9.2.0.pyc", True),  # a forged cache runs instead of its source
        ("pkg/__pycache__/core.cpython-311.pyc", True),
        ("pkg/core.pyc", True),
        ("pkg/pytest.py", False),
        ("django/test/testcases.py", False),  # library code: `test/` and `testing/` count only at the top level
        ("numpy/testing/_private/utils.py", False),
        ("src/pkg/core.py", False),
        ("setup.py", False),
        ("pkg/contest.py", False),
    ],
)
def test_what_counts_as_test_infrastructure(path, infrastructure):
    assert is_test_infrastructure(path) is infrastructure


def test_the_test_ids_and_the_test_patch_name_test_files(instance):
    task = task_from_swebench({**instance, "PASS_TO_PASS": ["checks/geo_checks.py::test_square"]})
    assert task_test_files(task) == {"tests/test_geo.py", "checks/geo_checks.py"}
    assert is_test_infrastructure("checks/geo_checks.py", task_test_files(task))


def test_split_patch_reads_git_and_traditional_diffs(tmp_path):
    """Renames, quoted and spaced names, binary files, deletions and a traditional diff: each file's section and
    paths; the sections join back into the patch."""
    repo = tmp_path / "r"
    (repo / "tests").mkdir(parents=True)
    (repo / "src.py").write_text("a\nb\n")
    (repo / "tests" / "test_a.py").write_text("def test():\n    pass\n")
    (repo / "old.py").write_text("y\n")
    (repo / "we ird.py").write_text("x\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "base")
    (repo / "src.py").write_text("a\nc\n")
    (repo / "conftest.py").write_text(CONFTEST_REWARD_HACK)
    (repo / "tests" / "test_a.py").unlink()
    (repo / "we ird.py").write_text("z\n")
    (repo / "old.py").rename(repo / "new näme.py")
    (repo / "tests" / "data.bin").write_bytes(b"\0\1\2")
    _git(repo, "add", "-A")
    patch = _git(repo, "diff", "--cached", "--binary", "-M", "HEAD").stdout.decode()
    sections = split_patch(patch)
    assert "".join(s.text for s in sections) == patch
    assert [s.paths for s in sections] == [
        ["conftest.py"],
        ["old.py", "new näme.py"],
        ["src.py"],
        ["tests/data.bin"],
        ["tests/test_a.py"],
        ["we ird.py"],
    ]
    # a traditional diff: timestamps after a tab, a hunk line that looks like a file header
    traditional = (
        "notes\n--- a/foo.py\t2020-01-01\n+++ b/foo.py\t2020-01-02\n@@ -1 +1 @@\n-a\n+b\n"
        "--- a/tests/t.py\n+++ b/tests/t.py\n@@ -1,2 +1,2 @@\n x\n-a\n+--- b\n"
    )
    sections = split_patch(traditional)
    assert [(s.paths, s.text[:9]) for s in sections] == [
        ([], "notes\n"),
        (["foo.py"], "--- a/foo"),
        (["tests/t.py"], "--- a/tes"),
    ]
    assert patch_paths(traditional) == ["foo.py", "tests/t.py"]

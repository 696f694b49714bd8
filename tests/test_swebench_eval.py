"""SWE-bench evaluation glue, checked against the installed `swebench` package itself (no Docker, no network)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from entropo_trl.data.trajectory import Trajectory, write_trajectories
from entropo_trl.evaluation.harness import (
    DockerUnavailableError,
    HarnessReportError,
    docker_available,
    harness_command,
    read_report,
    run_harness,
)
from entropo_trl.evaluation.swebench import write_predictions

swebench = pytest.importorskip("swebench")

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "eval" / "swebench_eval.py"
PATCH = "diff --git a/x.py b/x.py\n--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-a = 1\n+a = 2\n"


def traj(instance_id, patch=PATCH, reward=1.0, source="m", **kw):
    messages = [{"role": "user", "content": "fix it"}, {"role": "assistant", "content": "done"}]
    return Trajectory(instance_id=instance_id, messages=messages, reward=reward, patch=patch, source=source, **kw)


def fake_docker(tmp_path, ok):
    """A docker CLI stand-in: `docker info` answers (ok) or fails like a CLI with no daemon."""
    path = tmp_path / ("docker-ok" if ok else "docker-down")
    if ok:
        path.write_text("#!/bin/sh\necho 27.0.1\n")
    else:
        path.write_text(
            "#!/bin/sh\necho 'Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
            "Is the docker daemon running?' >&2\nexit 1\n"
        )
    path.chmod(0o755)
    return str(path)


# --------------------------------------------------------------------------------------------------------------------
# predictions
# --------------------------------------------------------------------------------------------------------------------


def test_predictions_accepted_by_swebench_loader(tmp_path):
    from swebench.harness.utils import get_predictions_from_file

    out = tmp_path / "preds.jsonl"
    items = [traj("a__b-1"), ("a__b-2", ""), ("a__b-3", None), traj("a__b-4", patch="  \n")]
    written = write_predictions(out, items, "org/model")
    assert (written.written, written.empty, written.dropped_test_edits) == (4, 3, {})
    assert not Path(str(out) + ".partial").exists()
    # a non-"gold" path is read from the file only: no dataset download
    preds = get_predictions_from_file(str(out), "princeton-nlp/SWE-bench_Verified", "test")
    assert [p["instance_id"] for p in preds] == ["a__b-1", "a__b-2", "a__b-3", "a__b-4"]
    assert all(p["model_name_or_path"] == "org/model" for p in preds)
    by_id = {p["instance_id"]: p for p in preds}
    assert by_id["a__b-1"]["model_patch"] == PATCH
    # the harness's own empty-patch test (run_evaluation.get_dataset_from_preds)
    empty = {k for k, v in by_id.items() if v["model_patch"] == "" or v["model_patch"] is None}
    assert empty == {"a__b-2", "a__b-3", "a__b-4"}


def test_predictions_from_dict(tmp_path):
    out = tmp_path / "preds.jsonl"
    assert write_predictions(out, {"x-1": traj("x-1"), "x-2": "patch"}, "m").written == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        {"instance_id": "x-1", "model_name_or_path": "m", "model_patch": PATCH},
        {"instance_id": "x-2", "model_name_or_path": "m", "model_patch": "patch"},
    ]
    with pytest.raises(ValueError, match="x-9"):
        write_predictions(out, {"x-1": traj("x-9")}, "m")


def test_duplicate_instance_is_an_error_and_leaves_no_file(tmp_path):
    out = tmp_path / "preds.jsonl"
    with pytest.raises(ValueError, match="duplicate instance_id 'a__b-1'"):
        write_predictions(out, [traj("a__b-1"), traj("a__b-2"), ("a__b-1", "p")], "m")
    assert not out.exists() and not Path(str(out) + ".partial").exists()
    with pytest.raises(ValueError, match=".jsonl"):
        write_predictions(tmp_path / "preds.json", [traj("a")], "m")


GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def _git(cwd, *args):
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True)


@pytest.fixture
def repo_patches(tmp_path):
    """A repository at its base commit and three patches made in it with git: a fix that also edits a test file and
    adds a conftest.py, the conftest reward hack alone, and a clean fix."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "tests").mkdir()
    (repo / "pkg" / "core.py").write_text("def f():\n    return 1\n")
    (repo / "tests" / "test_core.py").write_text("def test_f():\n    assert False\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "base")

    def patch_of(files):
        for name, text in files.items():
            (repo / name).write_text(text)
        _git(repo, "add", "-A")
        patch = _git(repo, "diff", "--cached", "--binary", "HEAD").stdout
        _git(repo, "reset", "-q", "--hard", "HEAD")
        _git(repo, "clean", "-qfd")
        return patch

    fix = {"pkg/core.py": "def f():\n    return 2\n"}
    mixed = patch_of({**fix, "tests/test_core.py": "def test_f():\n    assert True\n", "conftest.py": "# hack\n"})
    return repo, {"a-1": mixed, "a-2": patch_of({"conftest.py": "# hack\n"}), "a-3": patch_of(fix)}


def test_predictions_leave_out_test_edits_by_default(tmp_path, repo_patches):
    """What the harness grades is the patch without its test-infrastructure edits (counted); the rest still applies."""
    repo, patches = repo_patches
    out = tmp_path / "preds.jsonl"
    summary = write_predictions(out, patches, "m")
    assert (summary.written, summary.empty, summary.num_dropped) == (3, 1, 3)
    assert summary.dropped_test_edits == {"a-1": ["conftest.py", "tests/test_core.py"], "a-2": ["conftest.py"]}
    rows = {r["instance_id"]: r["model_patch"] for r in map(json.loads, out.read_text().splitlines())}
    assert rows["a-1"] == rows["a-3"] == patches["a-3"]  # the fix alone, byte for byte
    assert rows["a-2"] == ""  # only test edits: an empty patch, counted unresolved by the harness
    (tmp_path / "fix.diff").write_text(rows["a-1"])
    _git(repo, "apply", "--check", str(tmp_path / "fix.diff"))
    kept = write_predictions(out, patches, "m", keep_test_edits=True)
    assert (kept.written, kept.empty, kept.dropped_test_edits) == (3, 0, {})
    rows = {r["instance_id"]: r["model_patch"] for r in map(json.loads, out.read_text().splitlines())}
    assert rows == patches


# --------------------------------------------------------------------------------------------------------------------
# reports, in the formats of swebench.harness.reporting.make_run_report and grading.get_eval_report
# --------------------------------------------------------------------------------------------------------------------


def summary_report(resolved, unresolved, error, empty):
    submitted = sorted(resolved + unresolved + error + empty)
    return {
        "total_instances": 500,
        "submitted_instances": len(submitted),
        "completed_instances": len(resolved) + len(unresolved),
        "resolved_instances": len(resolved),
        "unresolved_instances": len(unresolved),
        "infra_failure_instances": 0,
        "ambiguous_failure_instances": 0,
        "empty_patch_instances": len(empty),
        "error_instances": len(error),
        "completed_ids": sorted(resolved + unresolved),
        "incomplete_ids": ["not__submitted-1"],
        "empty_patch_ids": sorted(empty),
        "submitted_ids": submitted,
        "resolved_ids": sorted(resolved),
        "unresolved_ids": sorted(unresolved),
        "infra_failure_ids": [],
        "ambiguous_failure_ids": [],
        "failure_reasons": {},
        "error_ids": sorted(error),
        "schema_version": 2,
    }


def instance_report(instance_id, resolved):
    return {
        instance_id: {
            "patch_is_None": False,
            "patch_exists": True,
            "patch_successfully_applied": True,
            "resolved": resolved,
            "infra_failure": False,
            "tests_status": {"FAIL_TO_PASS": {"success": [], "failure": []}},
        }
    }


def write_instance_reports(root, run_id, model, flags):
    for instance_id, resolved in flags.items():
        folder = root / "logs" / "run_evaluation" / run_id / model.replace("/", "__") / instance_id
        folder.mkdir(parents=True)
        (folder / "report.json").write_text(json.dumps(instance_report(instance_id, resolved), indent=4))
    # the run's metadata file sits beside the model folders (run_evaluation.write_run_metadata)
    (root / "logs" / "run_evaluation" / run_id / "run.json").write_text(json.dumps({"dataset": "d", "split": "test"}))


def test_read_summary_report(tmp_path):
    report = summary_report(["a-1", "a-2"], ["a-3"], ["a-4"], ["a-5"])
    path = tmp_path / "org__model.run1.json"
    path.write_text(json.dumps(report, indent=4) + "\n")
    expected = {"a-1": True, "a-2": True, "a-3": False, "a-4": False, "a-5": False}
    assert read_report(path) == expected
    # a report directory, by run id and model name, or the only summary in it
    assert read_report(tmp_path, run_id="run1", model_name="org/model") == expected
    assert read_report(tmp_path) == expected


def test_read_per_instance_reports(tmp_path):
    flags = {"a-1": True, "a-2": False, "a-3": True}
    write_instance_reports(tmp_path, "run1", "org/model", flags)
    assert read_report(tmp_path) == flags
    assert read_report(tmp_path / "logs" / "run_evaluation" / "run1" / "org__model") == flags
    one = tmp_path / "logs" / "run_evaluation" / "run1" / "org__model" / "a-2" / "report.json"
    assert read_report(one) == {"a-2": False}
    # a second run below the same folder: ambiguous unless narrowed
    write_instance_reports(tmp_path / "other", "run2", "org/model", {"a-1": False})
    os.rename(tmp_path / "other" / "logs" / "run_evaluation" / "run2", tmp_path / "logs" / "run_evaluation" / "run2")
    with pytest.raises(HarnessReportError, match="run_id"):
        read_report(tmp_path)
    assert read_report(tmp_path, run_id="run1", model_name="org/model") == flags
    assert read_report(tmp_path, run_id="run2") == {"a-1": False}


def test_malformed_reports_name_the_file(tmp_path):
    write_instance_reports(tmp_path, "r", "m", {"a-1": True, "a-2": True})
    bad = tmp_path / "logs" / "run_evaluation" / "r" / "m" / "a-2" / "report.json"
    bad.write_text("{not json")
    with pytest.raises(HarnessReportError, match=r"a-2/report.json: not valid JSON"):
        read_report(tmp_path)
    assert read_report(tmp_path, strict=False) == {"a-1": True, "a-2": False}
    bad.write_text(json.dumps({"a-2": {"resolved": "yes"}}))
    with pytest.raises(HarnessReportError, match=r"a-2/report.json: 'a-2' has no boolean 'resolved'"):
        read_report(tmp_path)
    bad.write_text("")
    with pytest.raises(HarnessReportError, match="empty report file"):
        read_report(tmp_path)
    summary = tmp_path / "m.r.json"
    summary.write_text(json.dumps({"resolved_ids": "a-1", "submitted_ids": ["a-1"]}))
    with pytest.raises(HarnessReportError, match=r"m\.r\.json: 'resolved_ids' must be a list"):
        read_report(summary)
    with pytest.raises(FileNotFoundError):
        read_report(tmp_path / "missing.json")


# --------------------------------------------------------------------------------------------------------------------
# the harness command, parsed by swebench's own argparse
# --------------------------------------------------------------------------------------------------------------------

# Re-run run_evaluation's `__main__` block with parse_args spied on: the real parser parses the command line (types
# included), prints the namespace and exits before any evaluation starts.
SPY = textwrap.dedent(
    """
    import argparse, json, runpy, sys
    original = argparse.ArgumentParser.parse_args
    def spy(self, *args, **kwargs):
        namespace = original(self, *args, **kwargs)
        print("PARSED " + json.dumps(vars(namespace)))
        sys.exit(0)
    argparse.ArgumentParser.parse_args = spy
    sys.argv = ["run_evaluation.py", *sys.argv[1:]]
    runpy.run_module("swebench.harness.run_evaluation", run_name="__main__")
    """
)


def parse_with_swebench(cmd):
    assert cmd[1:3] == ["-m", "swebench.harness.run_evaluation"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", SPY, *cmd[3:]], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("PARSED "))
    return json.loads(line[len("PARSED ") :])


def test_harness_command_is_accepted_by_swebench(tmp_path):
    cmd = harness_command(
        tmp_path / "preds.jsonl",
        run_id="run1",
        max_workers=8,
        timeout=900,
        instance_ids=["a__b-1", "a__b-2"],
        report_dir=tmp_path / "reports",
        open_file_limit=8192,
    )
    assert cmd[0] == sys.executable
    parsed = parse_with_swebench(cmd)
    assert parsed["dataset_name"] == "princeton-nlp/SWE-bench_Verified"
    assert parsed["split"] == "test"
    assert parsed["predictions_path"] == str(tmp_path / "preds.jsonl")
    assert parsed["run_id"] == "run1"
    assert parsed["max_workers"] == 8 and parsed["timeout"] == 900 and parsed["open_file_limit"] == 8192
    assert parsed["instance_ids"] == ["a__b-1", "a__b-2"]
    assert parsed["report_dir"] == str(tmp_path / "reports")
    assert parse_with_swebench(harness_command("p.jsonl", run_id="r"))["instance_ids"] is None


def test_harness_flags_match_help():
    from entropo_trl.evaluation.harness import harness_flags

    flags = harness_flags()
    cmd = harness_command("p.jsonl", run_id="r", instance_ids=["x"], report_dir="d", open_file_limit=10)
    assert {arg for arg in cmd if arg.startswith("--")} <= flags
    if "--cache_level" not in flags:  # swebench 5.x removed it
        with pytest.raises(ValueError, match="--cache_level"):
            harness_command("p.jsonl", run_id="r", cache_level="env")
    with pytest.raises(ValueError, match="run_id"):
        harness_command("p.jsonl", run_id="")


# --------------------------------------------------------------------------------------------------------------------
# running the harness
# --------------------------------------------------------------------------------------------------------------------


def test_docker_available_reports_missing_cli_and_daemon(tmp_path):
    ok, reason = docker_available(str(tmp_path / "no-such-docker"))
    assert not ok and "not installed" in reason
    ok, reason = docker_available(fake_docker(tmp_path, ok=False))
    assert not ok and "Cannot connect to the Docker daemon" in reason
    assert docker_available(fake_docker(tmp_path, ok=True)) == (True, "Docker server 27.0.1")


def test_run_harness_without_daemon_raises(tmp_path):
    preds = tmp_path / "preds.jsonl"
    write_predictions(preds, [traj("a__b-1")], "m")
    with pytest.raises(DockerUnavailableError) as info:
        run_harness(preds, docker=fake_docker(tmp_path, ok=False), run_id="run1")
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert message.startswith("the SWE-bench harness needs a Docker daemon: ")
    assert f"Predictions are in {preds}" in message
    assert "-m swebench.harness.run_evaluation" in message and "--run_id run1" in message
    assert message.endswith("on a machine with Docker")


def test_run_harness_with_the_real_docker_cli(tmp_path):
    ok, _ = docker_available()
    if ok:
        pytest.skip("a Docker daemon answers here")
    preds = tmp_path / "preds.jsonl"
    write_predictions(preds, [traj("a__b-1")], "m")
    with pytest.raises(DockerUnavailableError, match="needs a Docker daemon"):
        run_harness(preds, run_id="run1")


FAKE_HARNESS = """#!{python}
# stands in for `python -m swebench.harness.run_evaluation`: writes the harness's outputs for the predictions
import argparse, json, os, sys
args = sys.argv[1:]
assert args[:2] == ["-m", "swebench.harness.run_evaluation"], args
parser = argparse.ArgumentParser()
for flag in ("--dataset_name", "--split", "--predictions_path", "--run_id", "--report_dir"):
    parser.add_argument(flag)
parser.add_argument("--max_workers", type=int)
parser.add_argument("--timeout", type=int)
parser.add_argument("--instance_ids", nargs="+")
a = parser.parse_args(args[2:])
preds = [json.loads(line) for line in open(a.predictions_path)]
model = preds[0]["model_name_or_path"].replace("/", "__")
resolved, unresolved, empty = [], [], []
for p in preds:
    if not p["model_patch"]:
        empty.append(p["instance_id"])
        continue
    ok = "fixed" in p["model_patch"]
    (resolved if ok else unresolved).append(p["instance_id"])
    folder = os.path.join("logs", "run_evaluation", a.run_id, model, p["instance_id"])
    os.makedirs(folder)
    json.dump({{p["instance_id"]: {{"patch_exists": True, "resolved": ok}}}}, open(os.path.join(folder, "report.json"), "w"))
print("Running", len(preds), "instances...")
if {summary}:
    report = {{"resolved_ids": sorted(resolved), "unresolved_ids": sorted(unresolved), "empty_patch_ids": empty,
              "error_ids": [], "submitted_ids": sorted(p["instance_id"] for p in preds), "schema_version": 2}}
    os.makedirs(a.report_dir or ".", exist_ok=True)
    json.dump(report, open(os.path.join(a.report_dir or ".", model + "." + a.run_id + ".json"), "w"))
"""


@pytest.mark.parametrize("summary", [True, False])
def test_run_harness_streams_and_reads_the_report(tmp_path, summary, capsys):
    python = tmp_path / "fake-python"
    python.write_text(FAKE_HARNESS.format(python=sys.executable, summary=summary))
    python.chmod(0o755)
    preds = tmp_path / "preds.jsonl"
    write_predictions(preds, [("a-1", "fixed"), ("a-2", "wrong"), ("a-3", "")], "org/model")
    work = tmp_path / "work"
    work.mkdir()
    resolved = run_harness(
        preds, docker=fake_docker(tmp_path, ok=True), cwd=work, run_id="r1", python=str(python), report_dir="reports"
    )
    assert resolved == {"a-1": True, "a-2": False, "a-3": False}
    assert "Running 3 instances..." in capsys.readouterr().out
    assert (work / "reports" / "org__model.r1.json").exists() == summary
    narrowed = run_harness(
        preds, docker=fake_docker(tmp_path, ok=True), cwd=tmp_path, run_id="r2", python=str(python),
        instance_ids=["a-1"], stream=False,
    )  # fmt: skip
    assert narrowed == {"a-1": True}


def test_run_harness_failure_carries_the_output(tmp_path):
    python = tmp_path / "fake-python"
    python.write_text(f"#!{sys.executable}\nimport sys\nprint('Traceback: boom')\nsys.exit(3)\n")
    python.chmod(0o755)
    preds = tmp_path / "preds.jsonl"
    write_predictions(preds, [("a-1", "p")], "m")
    with pytest.raises(RuntimeError, match=r"exited with 3(.|\n)*Traceback: boom"):
        run_harness(preds, docker=fake_docker(tmp_path, ok=True), cwd=tmp_path, run_id="r", python=str(python))


# --------------------------------------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------------------------------------


def run_cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )


def test_cli_writes_predictions_and_exits_2_without_docker(tmp_path):
    selection = tmp_path / "selected.jsonl"
    write_trajectories(selection, [traj("a__b-1"), traj("a__b-2", patch="")])
    preds = tmp_path / "out" / "preds.jsonl"
    result = run_cli(
        "--selection", selection, "--predictions", preds, "--model_name", "org/m", "--run", "--run_id", "r1",
        "--docker", fake_docker(tmp_path, ok=False), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "wrote 2 predictions (1 with an empty patch)" in result.stdout
    assert "the SWE-bench harness needs a Docker daemon" in result.stderr
    assert f"Predictions are in {preds}" in result.stderr
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [(r["instance_id"], r["model_name_or_path"], bool(r["model_patch"])) for r in rows] == [
        ("a__b-1", "org/m", True),
        ("a__b-2", "org/m", False),
    ]


def test_cli_pool_selects_one_per_instance(tmp_path):
    pool = tmp_path / "pool.jsonl"
    write_trajectories(
        pool,
        [
            traj("a__b-1", patch="unfinished", finished=False, num_steps=9),
            traj("a__b-1", patch="chosen", finished=True, num_steps=3),
            traj("a__b-2", patch="only", finished=True, num_steps=1),
        ],
    )
    preds = tmp_path / "preds.jsonl"
    result = run_cli("--pool", pool, "--predictions", preds, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {r["instance_id"]: r for r in map(json.loads, preds.read_text().splitlines())}
    assert {k: r["model_patch"] for k, r in rows.items()} == {"a__b-1": "chosen", "a__b-2": "only"}
    assert {r["model_name_or_path"] for r in rows.values()} == {"m"}  # the trajectories' source
    # a selection file must hold one trajectory per instance
    result = run_cli("--selection", pool, "--predictions", preds, cwd=tmp_path)
    assert result.returncode != 0 and "duplicate instance_id 'a__b-1'" in result.stderr


def test_cli_leaves_out_test_edits_unless_asked(tmp_path, repo_patches):
    _, patches = repo_patches
    selection = tmp_path / "selected.jsonl"
    write_trajectories(selection, [traj(instance_id, patch=patch) for instance_id, patch in patches.items()])
    preds = tmp_path / "preds.jsonl"
    result = run_cli("--selection", selection, "--predictions", preds, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote 3 predictions (1 with an empty patch)" in result.stdout
    assert "left out 3 test-infrastructure edits from 2 predictions" in result.stdout
    rows = {r["instance_id"]: r["model_patch"] for r in map(json.loads, preds.read_text().splitlines())}
    assert "conftest.py" not in rows["a-1"] and rows["a-2"] == ""
    result = run_cli("--selection", selection, "--predictions", preds, "--keep_test_edits", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "wrote 3 predictions (0 with an empty patch)" in result.stdout and "edits kept" in result.stdout
    rows = {r["instance_id"]: r["model_patch"] for r in map(json.loads, preds.read_text().splitlines())}
    assert rows == patches

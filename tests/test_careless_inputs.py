"""Careless inputs (issue 12, item 7): an `--output` that is an `--input` pool, pools without rewards in the selection
and the report, relative `--tasks` paths and broken `task.json` files. Rewards outside [0, 1] are covered with the
other malformed lines in test_trajectory.py, the servers' request handling in test_rollout_serve.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_trajectory import traj

from entropo_trl.data.cli import main as data_main
from entropo_trl.data.readers import read_trajectories
from entropo_trl.data.trajectory import write_trajectories
from entropo_trl.rollout.tasks import load_tasks
from entropo_trl.rollout.toy import make_toy_tasks

ROOT = Path(__file__).resolve().parents[1]


def swesmith_lines(instances: int = 3, per_instance: int = 2) -> list[dict]:
    """SWE-smith / SWE-agent lines: `instance_id` and `messages`, no reward (their files hold resolved runs)."""
    return [
        {"instance_id": f"owner__repo-{i}", "messages": traj(f"owner__repo-{i}", turns=2 + k).messages}
        for i in range(instances)
        for k in range(per_instance)
    ]


@pytest.fixture
def swesmith_file(tmp_path):
    path = tmp_path / "swesmith.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in swesmith_lines()))
    return path


# -- entropo-data --output that is an --input -------------------------------------------------------------------


@pytest.fixture
def pool_file(tmp_path):
    path = tmp_path / "pools" / "pool.jsonl"
    write_trajectories(path, [traj("A", 1.0), traj("A", 0.0), traj("B", 1.0)])
    return path


def test_output_that_is_the_input_is_refused_through_the_real_command(pool_file, tmp_path):
    before = pool_file.read_bytes()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "entropo_trl.data.cli",
            "sft",
            "--input",
            str(pool_file),
            "--output",
            str(pool_file),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"--output {pool_file} is the --input file {pool_file}" in result.stderr
    assert pool_file.read_bytes() == before
    assert sorted(p.name for p in pool_file.parent.iterdir()) == ["pool.jsonl"]  # no .partial either


@pytest.mark.parametrize("command", ["sft", "dpo", "kto", "verifier", "sharegpt-export", "sharegpt-import"])
@pytest.mark.parametrize("spelling", ["relative", "dot-dot", "symlink", "second input"])
def test_output_that_names_an_input_another_way_is_refused(
    pool_file, tmp_path, monkeypatch, capsys, command, spelling
):
    before = pool_file.read_bytes()
    other = tmp_path / "other.jsonl"
    write_trajectories(other, [traj("C", 1.0)])
    inputs = [str(pool_file)]
    if spelling == "relative":
        monkeypatch.chdir(pool_file.parent)
        output = "pool.jsonl"
    elif spelling == "dot-dot":
        monkeypatch.chdir(tmp_path)
        output = "pools/../pools/pool.jsonl"
    elif spelling == "symlink":
        link = tmp_path / "link.jsonl"
        link.symlink_to(pool_file)
        output = str(link)
    else:
        inputs = [str(other), str(pool_file)]
        output = str(pool_file)
    with pytest.raises(SystemExit) as info:
        data_main([command, "--input", *inputs, "--output", output])
    assert info.value.code == 2
    error = capsys.readouterr().err
    assert f"--output {output} is the --input file {pool_file}" in error
    assert pool_file.read_bytes() == before


def test_another_output_beside_the_input_still_works(pool_file, capsys):
    output = pool_file.with_name("sft.jsonl")
    assert data_main(["sft", "--input", str(pool_file), "--output", str(output)]) == 0
    assert len(output.read_text().splitlines()) == 3


# -- pools without rewards: unlabelled, never resolved ----------------------------------------------------------


def test_sft_on_swesmith_files_reads_them_as_resolved(swesmith_file, tmp_path, capsys):
    output = tmp_path / "sft.jsonl"
    assert data_main(["sft", "--input", str(swesmith_file), "--output", str(output), "--require_success"]) == 0
    assert len(output.read_text().splitlines()) == 6
    assert "reward (set to 1) in 6 records" in capsys.readouterr().out


def test_preference_data_from_swesmith_files_needs_a_default_reward(swesmith_file, tmp_path, capsys):
    output = tmp_path / "kto.jsonl"
    assert data_main(["kto", "--input", str(swesmith_file), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert output.read_text() == "" and "6 unlabelled" in printed and "reward (none: unlabelled) in 6" in printed
    assert data_main(["kto", "--input", str(swesmith_file), "--output", str(output), "--default_reward", "1"]) == 0
    assert [json.loads(line)["label"] for line in output.read_text().splitlines()] == [True] * 6
    with pytest.raises(SystemExit):
        data_main(["kto", "--input", str(swesmith_file), "--output", str(output), "--default_reward", "7.5"])
    assert "--default_reward must be in [0, 1], got 7.5" in capsys.readouterr().err


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "eval" / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_select_reports_a_pool_without_rewards_as_unlabelled(swesmith_file, tmp_path):
    printed = run_script("select.py", "--pool", str(swesmith_file), "--output", str(tmp_path / "sel.jsonl")).stdout
    assert "unlabelled: 3 of 3 instances" in printed
    assert "chosen resolve rate" not in printed and "%" not in printed
    chosen = list(read_trajectories(tmp_path / "sel.jsonl"))
    assert len(chosen) == 3 and not any(t.labelled for t in chosen)  # still unlabelled in the output pool


def test_select_counts_only_labelled_instances_in_a_mixed_pool(swesmith_file, tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    write_trajectories(mixed, [*read_trajectories(swesmith_file), traj("L", 0.0), traj("L", 0.0, turns=3)])
    printed = run_script("select.py", "--pool", str(mixed), "--output", str(tmp_path / "sel.jsonl")).stdout
    assert "chosen resolve rate 0/1 = 0.0% (from the pool's rewards over the 1 labelled instances)" in printed
    assert "unlabelled: 3 of 4 instances" in printed


def test_report_on_pools_without_rewards(swesmith_file, tmp_path):
    labelled = tmp_path / "labelled.jsonl"
    write_trajectories(labelled, [traj(f"i{k}", float(k % 2), turns=2 + j) for k in range(4) for j in range(2)])
    result = run_script(
        "report.py",
        "--pool",
        f"smith:{swesmith_file}",
        "--pool",
        f"ours:{labelled}",
        "--output",
        str(tmp_path / "report"),
        "--draws",
        "20",
    )
    assert "smith: unlabelled: 3 of 3 instances" in result.stdout
    report = (tmp_path / "report" / "report.md").read_text()
    assert "- smith: unlabelled: 3 of 3 instances" in report
    curves = report[report.index("## Resolve rate versus N") : report.index("## Selector ablation")]
    assert "| ours |" in curves and "smith" not in curves  # no resolve rate from placeholder rewards
    assert "## Selector's choice per instance (smith)" in report
    assert report.count("| 2 | ? |") == report.count("| unlabelled |") == 3  # no passing count, no reward

    alone = run_script("report.py", "--pool", f"smith:{swesmith_file}", "--output", str(tmp_path / "r2"))
    report = (tmp_path / "r2" / "report.md").read_text()
    assert "unlabelled: 3 of 3 instances" in alone.stdout
    assert "Resolve rate versus N" not in report and "no pool carries rewards" in report
    assert (tmp_path / "r2" / "diversity.png").exists() and not (tmp_path / "r2" / "best_of_n.png").exists()


# -- task sets -----------------------------------------------------------------------------------------------------


def test_relative_tasks_folder_from_another_cwd(tmp_path, monkeypatch):
    make_toy_tasks(tmp_path / "work" / "toy_tasks", n=2)
    monkeypatch.chdir(tmp_path / "work")
    for spelling in ("toy_tasks/", "toy_tasks", "./toy_tasks/../toy_tasks"):
        tasks = load_tasks(spelling)
        assert len(tasks) == 2
        for task in tasks:
            assert Path(task.repo_path).is_absolute() and (Path(task.repo_path) / "toolkit").is_dir(), task.repo_path
    monkeypatch.chdir(tmp_path / "work" / "toy_tasks")
    assert all(Path(t.repo_path).is_dir() for t in load_tasks("."))


def test_relative_repo_path_in_a_tasks_file_is_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "sets" / "checkouts" / "a").mkdir(parents=True)
    instance = {"instance_id": "a__a-1", "problem_statement": "fix", "repo_path": "checkouts/a"}
    (tmp_path / "sets" / "tasks.jsonl").write_text(json.dumps(instance) + "\n")
    (tmp_path / "sets" / "tasks.json").write_text(json.dumps([instance]))
    monkeypatch.chdir(tmp_path)
    for name in ("sets/tasks.jsonl", "sets/tasks.json"):
        [task] = load_tasks(name)
        assert Path(task.repo_path) == tmp_path / "sets" / "checkouts" / "a"


def test_task_json_repo_path_is_relative_to_its_task_folder(tmp_path, monkeypatch):
    [task] = make_toy_tasks(tmp_path / "toy", n=1)
    task_json = Path(task.repo_path).parent / "task.json"
    Path(task.repo_path).rename(Path(task.repo_path).parent / "checkout")
    task_json.write_text(json.dumps({**json.loads(task_json.read_text()), "repo_path": "checkout"}))
    monkeypatch.chdir(tmp_path)
    [again] = load_tasks("toy")
    assert again.repo_path == str(task_json.parent / "checkout")


BROKEN_TASKS = {
    "invalid JSON": ('{"instance_id": "x",\n "problem_statement": }', r"task\.json, line 2: invalid JSON"),
    "not an object": ("[1, 2]", r"task\.json: expected a JSON object"),
    "missing instance_id": (json.dumps({"problem_statement": "p"}), r"task\.json: missing or empty 'instance_id'"),
    "empty problem_statement": (
        json.dumps({"instance_id": "x", "problem_statement": ""}),
        r"task\.json: missing or empty 'problem_statement'",
    ),
    "repo_path not a string": (
        json.dumps({"instance_id": "x", "problem_statement": "p", "repo_path": 5}),
        r"task\.json: 'repo_path' must be a string",
    ),
    "test_command not a string": (
        json.dumps({"instance_id": "x", "problem_statement": "p", "test_command": ["pytest"]}),
        r"task\.json: 'test_command' must be a string",
    ),
    "FAIL_TO_PASS not a list": (
        json.dumps({"instance_id": "x", "problem_statement": "p", "FAIL_TO_PASS": "t::a"}),
        r"task\.json\.FAIL_TO_PASS: expected a JSON list",
    ),
    "repository missing": (
        json.dumps({"instance_id": "x", "problem_statement": "p", "repo_path": "nowhere"}),
        r"task\.json: 'repo_path': repository folder not found: .*nowhere",
    ),
}


@pytest.mark.parametrize("name", sorted(BROKEN_TASKS))
def test_broken_task_json_names_its_file_and_field(name, tmp_path):
    make_toy_tasks(tmp_path / "tasks", n=2)
    content, message = BROKEN_TASKS[name]
    broken = tmp_path / "tasks" / "toy__toolkit-2" / "task.json"
    broken.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_tasks(tmp_path / "tasks")
    assert str(broken) in str(info.value)


def test_broken_tasks_file_names_its_file(tmp_path):
    array = tmp_path / "tasks.json"
    array.write_text('[{"instance_id": "x",\n "problem_statement": "p"},\n oops]')
    with pytest.raises(ValueError, match=rf"{array}, line 3: invalid JSON"):
        load_tasks(array)
    array.write_text('["x"]')
    with pytest.raises(ValueError, match=rf"{array}\[0\]: expected a JSON object"):
        load_tasks(array)
    lines = tmp_path / "tasks.jsonl"
    lines.write_text(json.dumps({"instance_id": "x", "problem_statement": "p", "repo": 3}) + "\n")
    with pytest.raises(ValueError, match=rf"{lines}, line 1: 'repo' must be a string"):
        load_tasks(lines)

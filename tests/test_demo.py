import json
import os
import signal
import subprocess
import sys
import time


def test_demo_pipeline_small_killed_and_resumed(tmp_path):
    """`make demo`'s pipeline at a smaller size: killed once its rollout pool is written, then run again: the second
    run resumes (earlier stages are not redone) and finishes with every stage's output."""
    workdir = tmp_path / "demo"
    command = [
        sys.executable,
        "-m",
        "entropo_trl.demo",
        "--workdir",
        str(workdir),
        "--tasks",
        "2",
        "--samples",
        "2",
        "--steps",
        "1",
    ]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []
    deadline = time.time() + 300
    for line in first.stdout:
        lines.append(line)
        if line.startswith("[demo] 4/6") or time.time() > deadline:
            break
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert any(line.startswith("[demo] 3/6 rollouts") for line in lines), "".join(lines)

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout
    assert "[demo] 3/6 rollouts: done before" in out  # resumed, not started over
    assert "[demo] 6/6 select + report" in out
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["pool"]["passing"] > 0 and summary["pool"]["failing"] > 0
    assert all(steps >= 1 for steps in summary["training_steps"].values()) and len(summary["training_steps"]) == 4
    assert set(summary["selection"]) == {"toy__toolkit-1", "toy__toolkit-2"}
    report = (workdir / "report" / "report.md").read_text()
    assert "Selector's choice per instance" in report and "| toy__toolkit-1 |" in report
    assert (workdir / "report" / "best_of_n.png").stat().st_size > 10_000
    # resuming with other options would mix two runs: refused
    other = subprocess.run(command[:-1] + ["2"], env=env, capture_output=True, text=True, timeout=120)
    assert other.returncode != 0 and "holds a demo run made with other options" in other.stderr

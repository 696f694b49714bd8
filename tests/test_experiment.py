"""`entropo experiment` and the α sweep: the shipped sweep files parse into command lines the experiment accepts, and a
two-point sweep (α = β and α = 1.1 β) runs end to end on a CPU, offline, killed once and resumed: a tiny student, toy
tasks (two held out for evaluation, two for the scripted teacher's training data), the transformers server, the
isolated sandbox, W&B offline."""

import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import wandb_offline_history

from entropo_trl.experiment import ExperimentArguments, parse_args, recipe_file, training_command
from entropo_trl.train import RECIPES_DIR

ROOT = Path(__file__).resolve().parents[1]


def agent_command(sweep: dict, values: dict) -> list[str]:
    """The command line `wandb agent` runs for one point of a sweep: `${program}` and `${args}` (`--name=value` for
    each parameter) substituted into the sweep's `command`; `${env}` is the environment, left out."""
    args = [f"--{name}={value}" for name, value in values.items()]
    command = []
    for part in sweep["command"]:
        command += {"${env}": [], "${program}": [sweep["program"]], "${args}": args}.get(part, [part])
    return command


@pytest.mark.parametrize("name", ["alpha", "temperature"])
def test_the_shipped_sweeps_optimise_resolve_rate_and_their_commands_parse(name, monkeypatch):
    sweep = yaml.safe_load((RECIPES_DIR / "sweeps" / f"{name}.yaml").read_text())
    assert sweep["method"] == "grid"
    assert sweep["metric"] == {"name": "eval/resolve_rate@N", "goal": "maximize"}
    parameters = sweep["parameters"]
    if name == "alpha":
        assert parameters["alpha"]["values"] == [0.1, 0.105, 0.11, 0.12, 0.13, 0.15]
        assert parameters["beta"] == {"value": 0.1}  # alpha = beta: the multi-turn KTO baseline
    else:
        assert parameters["alpha"] == parameters["beta"] == {"value": 0.1}
        assert parameters["temperature"]["values"] == [0.5, 0.7, 1.0, 1.2, 1.5, 1.8]
    grid = [{k: v["value"] for k, v in parameters.items() if "value" in v}]
    for axis, spec in ((k, v) for k, v in parameters.items() if "values" in v):
        grid = [{**point, axis: value} for point in grid for value in spec["values"]]
    assert (ROOT / sweep["program"]).exists()
    monkeypatch.chdir(ROOT)  # the agent runs in the checkout the sweep was created from
    for point in grid:
        command = agent_command(sweep, point)
        assert command[:2] == ["python", "recipes/experiment.py"]
        args = parse_args(command[2:])
        assert (args.alpha, args.beta) == (point["alpha"], point["beta"])
        assert args.temperature == point.get("temperature", 0.7)
        # the paper's test time: N = 16 on SWE-bench Verified, 200 steps, 131,072 tokens, Docker, vLLM
        assert (args.n, args.max_steps, args.max_context_tokens, args.sandbox, args.server) == (
            16, 200, 131_072, "docker", "vllm"
        )  # fmt: skip
        assert args.tasks.endswith("swebench_verified.jsonl") and args.selector == "paper-verified"
        train = training_command(args, Path(args.output_dir) / "train")
        assert train[1:3] == ["-m", "accelerate.commands.launch"] and f"--alpha {point['alpha']}" in shlex.join(train)
        assert recipe_file(args.train_config, "train_config").startswith(str(RECIPES_DIR))


def test_resolve_rates_at_1_and_n_over_runs():
    """@1: every rollout is a run of N = 1 (mean ± std over sample indices); @N: the selector's pick among each run's
    block of N samples, mean ± std over runs. Ties in sample numbers keep the pool's order."""
    from entropo_trl.data.trajectory import Trajectory
    from entropo_trl.evaluation.resolve import by_sample, evaluate_pool
    from entropo_trl.evaluation.selection import HybridSelector, SelectorConfig

    def rollout(instance, sample, reward, steps):
        messages = [{"role": "user", "content": "fix"}] + [{"role": "assistant", "content": "x"}] * steps
        return Trajectory(instance_id=instance, messages=messages, reward=reward, finished=True, num_steps=steps,
                          patch=f"p{sample}", episode_id=f"{instance}/policy/{sample}")  # fmt: skip

    # samples 0-1 are run 0, 2-3 run 1; the `steps` stage (most turns) picks the longer of each block
    pool = {
        "a": [rollout("a", 3, 0.0, 9), rollout("a", 0, 1.0, 5), rollout("a", 1, 0.0, 2), rollout("a", 2, 1.0, 1)],
        "b": [rollout("b", 0, 0.0, 1), rollout("b", 1, 1.0, 4), rollout("b", 2, 0.0, 3), rollout("b", 3, 0.0, 2)],
    }
    evaluation = evaluate_pool(pool, HybridSelector(SelectorConfig(["steps"], steps="most")), n=2, runs=2)
    metrics = evaluation["metrics"]
    assert metrics["eval/resolve_rate@1"] == pytest.approx((0.5 + 0.5 + 0.5 + 0.0) / 4)
    # run 0: a picks sample 0 (1.0), b sample 1 (1.0); run 1: a picks sample 3 (0.0), b sample 2 (0.0)
    assert metrics["eval/resolve_rate@N"] == pytest.approx(0.5)
    assert metrics["eval/resolve_rate@N_std"] == pytest.approx(0.7071, abs=1e-4)
    assert metrics["eval/pass@1"] == pytest.approx(0.375)  # a: 2 of 4 pass, b: 1 of 4
    assert metrics["eval/pass@2"] == pytest.approx((5 / 6 + 1 / 2) / 2)  # 1 - C(n - c, 2) / C(n, 2)
    assert [point[0] for point in evaluation["curve"]] == [1, 2]
    tied = {"a": [rollout("a", 0, 0.0, 1), rollout("a", 0, 1.0, 1)]}
    assert [t.reward for t in by_sample(tied)["a"]] == [0.0, 1.0]


def test_a_rerun_with_other_settings_names_them(tmp_path):
    from entropo_trl.stages import pin_options

    pin_options(tmp_path, {"alpha": 0.1, "n": 16}, what="experiment", folder_flag="--output_dir")
    pin_options(tmp_path, {"alpha": 0.1, "n": 16}, what="experiment", folder_flag="--output_dir")
    with pytest.raises(SystemExit, match=r"n: 16 then, 8 now\); use another --output_dir"):
        pin_options(tmp_path, {"alpha": 0.1, "n": 8}, what="experiment", folder_flag="--output_dir")


def test_bad_settings_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(SystemExit, match="--tasks is required"):
        ExperimentArguments(model="m", dataset_name="d")
    with pytest.raises(SystemExit, match="bad --method 'kto'"):
        ExperimentArguments(model="m", dataset_name="d", tasks="t", method="kto")
    with pytest.raises(SystemExit, match="together"):
        ExperimentArguments(model="m", dataset_name="d", tasks="t", verifier_url="http://x")
    with pytest.raises(SystemExit, match="no shipped recipe"):
        recipe_file("nowhere/ekto.yaml", "train_config")
    with pytest.raises(SystemExit, match="unknown --selector 'paper_verified'"):
        ExperimentArguments(model="m", dataset_name="d", tasks="t", train_config="c", selector="paper_verified")
    with pytest.raises(SystemExit, match="--train_flags sets --alpha, --output_dir, which the experiment sets"):
        ExperimentArguments(
            model="m", dataset_name="d", tasks="t", train_config="c", train_flags="--alpha 1 --output_dir=x"
        )
    with pytest.raises(SystemExit, match="give one verifier"):
        ExperimentArguments(
            model="m",
            dataset_name="d",
            tasks="t",
            train_config="c",
            verifier="v",
            verifier_url="u",
            verifier_model="m",
        )
    with pytest.raises(SystemExit, match="give --train_config"):
        ExperimentArguments(model=str(tmp_path), dataset_name="d", tasks="t")


# ---------------------------------------------------------------------------------------------------------------------
# the two-point sweep on a CPU
# ---------------------------------------------------------------------------------------------------------------------

# The shipped paper config, run with only what a CPU forces (and what a test's minutes force) changed
SHIPPED_CONFIG = RECIPES_DIR / "experiments" / "qwen3-coder-30b-a3b-instruct.yaml"
CPU_FORCED = {
    "server": "transformers",  # no GPU: no vLLM
    "sandbox": "local",  # no Docker daemon: the isolated local sandbox, over toy repositories
    "accelerate_config": "",  # no GPUs for ZeRO-3: the training stage runs in one process
    "verifier_url": "",  # no second GPU server for the 30B verifier: selection without verifier scores
    "verifier_model": "",
    "train_flags": "--bf16 false --dtype float32 --max_steps 2",  # fp32 on a CPU; two optimiser steps
    "n": "2",  # minutes, not hours: 2 rollouts of 2 steps of 24 tokens per held-out task
    "max_steps": "2",
    "max_tokens": "24",
    "concurrency": "2",
}


@pytest.fixture(scope="module")
def sweep_setup(tmp_path_factory):
    """A tiny student (the SFT model), KTO rows from the scripted teacher on two toy tasks, and two held-out toy
    tasks."""
    from entropo_trl.rollout.sandbox import SandboxError, require_bwrap

    try:
        require_bwrap()
    except SandboxError as error:
        pytest.skip(f"the isolated sandbox is not available here: {error}")
    from entropo_trl.data.builders import build_kto_rows
    from entropo_trl.data.readers import read_trajectories
    from entropo_trl.demo import teacher_rollouts
    from entropo_trl.rollout.toy import make_toy_tasks
    from entropo_trl.testing import build_tiny_model, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("sweep")
    tokenizer = build_tiny_tokenizer("qwen3")
    build_tiny_model(tokenizer).save_pretrained(root / "sft")
    tokenizer.save_pretrained(root / "sft")
    make_toy_tasks(root / "train_tasks", n=4)
    (root / "heldout").mkdir()
    for name in ("toy__toolkit-3", "toy__toolkit-4"):
        shutil.move(root / "train_tasks" / name, root / "heldout" / name)
    from entropo_trl.rollout.tasks import load_tasks

    asyncio.run(teacher_rollouts(load_tasks(root / "train_tasks"), root / "teacher.jsonl", {"n": 2}))
    rows = build_kto_rows(read_trajectories([str(root / "teacher.jsonl")]))
    with open(root / "kto.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return root


def experiment(root: Path, alpha: float, **popen):
    command = [sys.executable, "-m", "entropo_trl", "experiment", "--config", str(SHIPPED_CONFIG), f"--alpha={alpha}"]
    command += [
        "--model",
        str(root / "sft"),
        "--dataset_name",
        str(root / "kto.jsonl"),
        "--tasks",
        str(root / "heldout"),
    ]
    command += ["--output_dir", str(root / "experiments" / f"a{alpha}")]
    command += [part for name, value in CPU_FORCED.items() for part in (f"--{name}", value)]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TQDM_DISABLE": "1"}
    return subprocess.Popen(command, env=env, cwd=root, text=True, start_new_session=True, **popen)


def finish(process, timeout=900) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


def test_a_two_point_sweep_runs_end_to_end_killed_once_and_resumed(sweep_setup):
    root = sweep_setup
    first = root / "experiments" / "a0.1"
    process = experiment(root, 0.1, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (first / "merge.done").exists():  # killed in its rollout stage, the server and sandboxes running
        assert process.poll() is None and time.monotonic() < deadline, "the experiment stopped before merging"
        time.sleep(0.5)
    time.sleep(3)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (first / "eval.json").exists()

    resumed = finish(experiment(root, 0.1, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    assert "1/5 train: done before" in resumed and "2/5 merge: done before" in resumed
    assert "3/5 rollouts" in resumed and "5/5 evaluate" in resumed
    finish(experiment(root, 0.11, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))

    for alpha in (0.1, 0.11):
        folder = root / "experiments" / f"a{alpha}"
        evaluation = json.loads((folder / "eval.json").read_text())
        assert evaluation["alpha"] == alpha and evaluation["n"] == 2 and evaluation["labelled_instances"] == 2
        pool = [json.loads(line) for line in (folder / "rollouts" / "pool.jsonl").read_text().splitlines()]
        episodes = [t["episode_id"] for t in pool]
        assert len(episodes) == len(set(episodes)) == 4  # 2 held-out tasks x N = 2, each once after the kill
        assert {t["instance_id"] for t in pool} == {"toy__toolkit-3", "toy__toolkit-4"}

        # one W&B run holds the training metrics and the evaluation
        run_id = (folder / "wandb_run_id").read_text().strip()
        history = wandb_offline_history(folder)
        assert set(history) == {run_id}
        keys = {key for row in history[run_id] for key in row}
        assert {"train/loss", "eval/resolve_rate@1", "eval/resolve_rate@N", "eval/pass@1", "eval/pass@2"} <= keys
        assert "eval/distinct_patches" in keys
        logged = next(row for row in history[run_id] if "eval/resolve_rate@N" in row)
        assert logged["eval/resolve_rate@N"] == pytest.approx(evaluation["metrics"]["eval/resolve_rate@N"])

    # the report's alpha-sweep figure shows both points
    report = subprocess.run(
        [sys.executable, "-m", "entropo_trl", "report", "--sweep", str(root / "experiments"), "--output",
         str(root / "report"), "--draws", "50"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    text = (root / "report" / "report.md").read_text()
    sweep_section = text[text.index("## Alpha sweep") :].split("\n## ")[0]
    rows = [line.split("|")[1].strip() for line in sweep_section.splitlines() if line.startswith("| 0.")]
    assert rows == ["0.1", "0.11"]
    assert (root / "report" / "alpha_sweep.png").stat().st_size > 0

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from entropo_trl.data.readers import ReadStats, read_trajectories
from entropo_trl.data.test_logs import parse_pytest_statuses
from entropo_trl.demo import solving_step
from entropo_trl.rollout.client import ChatClient
from entropo_trl.rollout.oracle import evaluate_patch
from entropo_trl.rollout.pool import errors_path
from entropo_trl.rollout.runner import RolloutConfig, RolloutSummary, default_sandbox_factory, run_rollouts
from entropo_trl.rollout.scaffold import Action
from entropo_trl.rollout.serve import serve_scripted
from entropo_trl.rollout.tasks import load_tasks, task_from_swebench
from entropo_trl.rollout.toy import make_toy_tasks

ROOT = Path(__file__).resolve().parents[1]


def _workdir(messages):
    return re.search(r"repository in the (\S+) directory", messages[1]["content"]).group(1)


def solver(tasks):
    """A scripted policy that fixes the planted bug: view, edit, test, finish."""
    fixes = {t.problem_statement: t.metadata["reference_fix"] for t in tasks}

    def respond(messages):
        step = sum(m["role"] == "assistant" for m in messages)
        workdir = _workdir(messages)
        fix = next(f for issue, f in fixes.items() if issue in messages[1]["content"])
        path = f"{workdir}/{fix['path']}"
        return solving_step(step, path, fix)

    return respond


def quitter(messages):
    return Action("finish", {"command": "submit"}, "I give up.").to_text()


def looper(messages):
    return Action("execute_bash", {"cmd": "ls"}, "Looking around.").to_text()


@pytest.fixture(scope="module")
def toy_tasks(tmp_path_factory):
    return make_toy_tasks(tmp_path_factory.mktemp("toy"), n=3)


def _run(tasks, respond, pool, sandbox_factory=None, **config):
    async def go():
        with serve_scripted(respond) as server:
            async with ChatClient(server.base_url, "scripted") as client:
                return await run_rollouts(
                    tasks, client, pool, RolloutConfig(**config), sandbox_factory=sandbox_factory, progress=False
                )

    return asyncio.run(go())


def test_toy_tasks_have_a_real_bug_and_the_reference_fix_passes(toy_tasks):
    factory = default_sandbox_factory("local")
    for task in toy_tasks:
        assert task.FAIL_TO_PASS and task.PASS_TO_PASS
        assert evaluate_patch(task, "", factory).reward == 0.0  # the bug is real
        fix = task.metadata["reference_fix"]
        with factory(task) as sandbox:
            source = sandbox.read_file(f"{sandbox.workdir}/{fix['path']}")
            sandbox.write_file(f"{sandbox.workdir}/{fix['path']}", source.replace(fix["old"], fix["new"]))
            patch = sandbox.diff()
        result = evaluate_patch(task, patch, factory)
        assert result.reward == 1.0 and result.regression_pass_count == len(task.PASS_TO_PASS)
        assert evaluate_patch(task, "not a patch\n", factory).patch_applied is False


def test_scripted_solver_giver_up_and_looper(toy_tasks, tmp_path):
    pool = tmp_path / "pool.jsonl"
    summary = _run(toy_tasks[:2], solver(toy_tasks), pool, n=1, max_steps=10, concurrency=2)
    assert summary.ran == 2 and summary.passed == 2
    solved = list(read_trajectories(pool))
    for t in solved:
        assert t.reward == 1.0 and t.finished and t.exit_reason == "agent" and t.num_steps == 4
        assert (
            t.regression_pass_count > 0 and t.regression_fail_count == 0 and "+" in t.patch and t.source == "scripted"
        )
        assert t.messages[0]["content"].startswith("You are a programming agent")
        assert t.messages[-1]["role"] == "assistant" and "<function=finish>" in t.messages[-1]["content"]
        assert all(m["content"].rstrip().split("\n")[-1].startswith("Steps Remaining:") for m in t.messages[3::2])

    quit_pool = tmp_path / "quit.jsonl"
    _run(toy_tasks[:1], quitter, quit_pool, max_steps=10)
    [gave_up] = list(read_trajectories(quit_pool))
    assert gave_up.reward == 0.0 and gave_up.finished and gave_up.patch == ""

    loop_pool = tmp_path / "loop.jsonl"
    _run(toy_tasks[:1], looper, loop_pool, max_steps=3)
    [looped] = list(read_trajectories(loop_pool))
    assert looped.finished is False and looped.exit_reason == "max_step_limit" and looped.num_steps == 3
    assert looped.reward == 0.0 and looped.messages[-1]["content"].endswith("Steps Remaining: 0")


def test_rerun_skips_finished_episodes(toy_tasks, tmp_path):
    pool = tmp_path / "pool.jsonl"
    first = _run(toy_tasks, quitter, pool, n=2, max_steps=2, concurrency=3)
    assert first.ran == 6
    second = _run(toy_tasks, quitter, pool, n=2, max_steps=2)
    assert second.ran == 0 and second.skipped == 6
    third = _run(toy_tasks, quitter, pool, n=3, max_steps=2)
    assert third.ran == 3
    trajectories = list(read_trajectories(pool))
    ids = [t.episode_id for t in trajectories]
    assert len(ids) == len(set(ids)) == 9
    # every episode ran in its own temporary checkout, but is recorded under /testbed: same task, same prompt
    for task in toy_tasks:
        prompts = {json.dumps(t.prompt) for t in trajectories if t.instance_id == task.instance_id}
        assert len(prompts) == 1 and "/testbed" in next(iter(prompts))


def test_prompt_size_comes_from_the_servers_count(toy_tasks, tmp_path, monkeypatch):
    """After the first step the client is told the prompt's size (the server's last count plus an estimate of the new
    observation) instead of estimating the whole conversation from its characters."""
    hints = []
    complete = ChatClient.complete

    async def spy(self, messages, sampling=None, *, prompt_tokens_hint=None, **kwargs):
        hints.append(prompt_tokens_hint)
        return await complete(self, messages, sampling, prompt_tokens_hint=prompt_tokens_hint, **kwargs)

    monkeypatch.setattr(ChatClient, "complete", spy)
    _run(toy_tasks[:1], looper, tmp_path / "pool.jsonl", max_steps=3)
    assert hints[0] is None and all(isinstance(h, int) for h in hints[1:]) and len(hints) == 3
    assert 0 < hints[1] < hints[2]


def test_time_and_token_limits_end_episodes(toy_tasks, tmp_path):
    timed = tmp_path / "timed.jsonl"
    _run(toy_tasks[:1], looper, timed, max_steps=10, max_episode_seconds=1e-6)
    [t] = read_trajectories(timed)
    assert t.exit_reason == "traj_time_limit" and t.num_steps == 1 and not t.finished

    async def small_context():
        with serve_scripted(looper) as server:
            async with ChatClient(server.base_url, "scripted", max_context_tokens=2_500) as client:
                return await run_rollouts(
                    toy_tasks[:1], client, tmp_path / "tokens.jsonl", RolloutConfig(max_steps=50), progress=False
                )

    assert asyncio.run(small_context()).exit_reasons == {"token_limit": 1}
    [t] = read_trajectories(tmp_path / "tokens.jsonl")
    assert 0 < t.num_steps < 50 and not t.finished


def test_an_endpoint_that_refuses_every_request_records_nothing(toy_tasks, tmp_path):
    from entropo_trl.rollout.serve import StubHTTPError

    def unknown_model(messages):
        raise StubHTTPError(404, "The model `scripted` does not exist.")

    summary = _run(toy_tasks[:1], unknown_model, tmp_path / "pool.jsonl", n=2)
    assert summary.ran == 0 and summary.errors == 2  # errors, run again after a restart; not 0-step trajectories
    assert not (tmp_path / "pool.jsonl").exists() or not (tmp_path / "pool.jsonl").read_text()
    errors = [json.loads(line) for line in errors_path(tmp_path / "pool.jsonl").read_text().splitlines()]
    assert len(errors) == 2 and all("HTTP 404" in e["error"] and "does not exist" in e["error"] for e in errors)


def test_a_failure_after_the_first_step_is_an_error_too(toy_tasks, tmp_path):
    """An endpoint that goes away mid-episode: the episode is not recorded (no `llm_query_error` trajectory labelled
    0), and a rerun runs it again from the start."""
    from entropo_trl.rollout.serve import StubHTTPError

    def dies_at_step_two(messages):
        if sum(m["role"] == "assistant" for m in messages) == 1:
            raise StubHTTPError(503, "overloaded")
        return looper(messages)

    async def go():
        with serve_scripted(dies_at_step_two) as server:
            async with ChatClient(server.base_url, "scripted", max_retries=1, backoff=0.01) as client:
                config = RolloutConfig(max_steps=3, oracle=False)
                return await run_rollouts(toy_tasks[:1], client, tmp_path / "pool.jsonl", config, progress=False)

    summary = asyncio.run(go())
    assert summary.ran == 0 and summary.errors == 1 and "1 episodes errored" in str(summary)
    assert not (tmp_path / "pool.jsonl").exists() or not (tmp_path / "pool.jsonl").read_text()
    assert _run(toy_tasks[:1], looper, tmp_path / "pool.jsonl", max_steps=3, oracle=False).ran == 1


def test_a_request_refused_after_the_first_step_ends_the_episode_recorded(toy_tasks, tmp_path):
    """A 400 once the conversation has grown is this conversation's, not the endpoint's: a rerun would meet it again,
    so the episode ends there, recorded, and does not count towards stopping the run."""
    from entropo_trl.rollout.serve import StubHTTPError

    def refuses_step_two(messages):
        if sum(m["role"] == "assistant" for m in messages) == 1:
            raise StubHTTPError(400, "invalid request")
        return looper(messages)

    summary = _run(toy_tasks[:1], refuses_step_two, tmp_path / "pool.jsonl", max_steps=3, oracle=False)
    assert summary.ran == 1 and summary.errors == 0
    (trajectory,) = read_trajectories(tmp_path / "pool.jsonl")
    assert trajectory.exit_reason == "llm_request_refused" and trajectory.num_steps == 1 and not trajectory.finished


def test_each_sample_gets_its_own_seed(toy_tasks, tmp_path):
    from entropo_trl.rollout.client import SamplingParams

    async def go():
        with serve_scripted(quitter) as server:
            async with ChatClient(server.base_url, "scripted") as client:
                config = RolloutConfig(n=3, sampling=SamplingParams(seed=7), oracle=False)
                await run_rollouts(toy_tasks[:1], client, tmp_path / "pool.jsonl", config, progress=False)
            return sorted(body["seed"] for body in server.requests)

    assert asyncio.run(go()) == [7, 8, 9]


def test_sandbox_root_holds_the_local_checkouts(toy_tasks, tmp_path):
    root = tmp_path / "boxes"
    root.mkdir()
    pool = tmp_path / "pool.jsonl"
    checkouts = []
    make = default_sandbox_factory("local", str(root))

    def factory(task):
        sandbox = make(task)
        checkouts.append(sandbox.checkout)  # the private checkout on the host, mounted at /testbed inside
        return sandbox

    summary = _run(toy_tasks[:1], quitter, pool, factory, n=2, max_steps=2, sandbox_root=str(root))
    assert summary.ran == 2 and len(checkouts) == 4  # two episodes, and the oracle's sandbox for each
    assert all(t.metadata["workdir"] == "/testbed" for t in read_trajectories(pool))
    for checkout in checkouts:
        assert Path(checkout).parent.parent == root.resolve()  # root/entropo-sandbox-XXX/repo
        assert not Path(checkout).exists()  # removed after the episode
    with pytest.raises(ValueError, match="local sandboxes only"):
        RolloutConfig(sandbox="docker", sandbox_root=str(root))


def test_sigkill_and_restart_five_times_gives_exactly_the_pool(toy_tasks, tmp_path):
    pool = tmp_path / "pool.jsonl"
    rng = random.Random(0)
    with serve_scripted(solver(toy_tasks), delay=0.02) as server:
        command = [
            sys.executable,
            "-m",
            "entropo_trl.rollout.cli",
            "--tasks",
            str(Path(toy_tasks[0].repo_path).parents[1]),
            "--pool",
            str(pool),
            "--base_url",
            server.base_url,
            "--model",
            "scripted",
            "--n",
            "3",
            "--concurrency",
            "3",
            "--max_steps",
            "8",
            "--sandbox_root",  # what a killed runner leaves behind stays in the test's folder
            str(tmp_path / "sandboxes"),
        ]
        env = {**os.environ, "TQDM_DISABLE": "1"}
        for _ in range(5):
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(rng.uniform(0.8, 3.0))
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            if pool.exists():
                list(read_trajectories(pool, "entropo"))  # whole records only (an unfinished append is skipped)
        final = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert final.returncode == 0, final.stderr[-3000:]
    stats = ReadStats()
    trajectories = list(read_trajectories(pool, stats=stats))
    assert stats.num_skipped == 0  # no torn line left
    ids = [t.episode_id for t in trajectories]
    assert len(ids) == len(set(ids)) == 3 * len(toy_tasks)
    assert all(t.reward == 1.0 for t in trajectories)


def test_swebench_instances_load(tmp_path):
    instance = {
        "instance_id": "astropy__astropy-12907",
        "repo": "astropy/astropy",
        "base_commit": "d16bfe0",
        "problem_statement": "Modeling's separability_matrix ...",
        "FAIL_TO_PASS": json.dumps(["t::a"]),
        "PASS_TO_PASS": json.dumps(["t::b", "t::c"]),
        "version": "4.3",
    }
    path = tmp_path / "instances.jsonl"
    path.write_text(json.dumps(instance) + "\n")
    [task] = load_tasks(path)
    assert task.FAIL_TO_PASS == ["t::a"] and task.PASS_TO_PASS == ["t::b", "t::c"]
    assert task.image == "swebench/sweb.eval.x86_64.astropy_1776_astropy-12907:latest"
    assert task.metadata == {"version": "4.3"}
    with pytest.raises(ValueError, match="line 1.*problem_statement"):
        path.write_text(json.dumps({**instance, "problem_statement": ""}) + "\n")
        load_tasks(path)
    with pytest.raises(ValueError, match="FAIL_TO_PASS"):
        task_from_swebench({**instance, "FAIL_TO_PASS": "not json"})


def test_parse_pytest_statuses():
    log = "PASSED tests/a.py::test_x\nFAILED tests/a.py::test_y - AssertionError\ntests/a.py::test_z PASSED [ 50%]\n"
    assert parse_pytest_statuses(log) == {
        "tests/a.py::test_x": "PASSED",
        "tests/a.py::test_y": "FAILED",
        "tests/a.py::test_z": "PASSED",
    }


def test_cli_with_a_local_transformers_model(toy_tasks, tmp_path, tokenizer, tiny_model_dir):
    """The CPU path of `entropo-rollout`: a tiny random model served with transformers drives real episodes (its
    random text holds no valid call, so each step's observation says so) until the step limit."""
    from entropo_trl.rollout.cli import main

    tokenizer.save_pretrained(tiny_model_dir)
    pool = tmp_path / "pool.jsonl"
    main(
        [
            "--tasks",
            str(Path(toy_tasks[0].repo_path).parents[1]),
            "--limit",
            "1",
            "--pool",
            str(pool),
            "--serve_transformers",
            str(tiny_model_dir),
            "--max_steps",
            "2",
            "--max_tokens",
            "8",
            "--n",
            "2",
        ]
    )
    trajectories = list(read_trajectories(pool))
    assert len(trajectories) == 2
    for t in trajectories:
        assert t.exit_reason == "max_step_limit" and not t.finished and t.reward == 0.0 and t.num_steps == 2
        errors = ("No function call found", "missing its closing", "Unknown function", "has no name")
        assert any(e in t.messages[3]["content"] for e in errors), t.messages[3]["content"]
        assert t.metadata["completion_tokens"] > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--base_url", "http://127.0.0.1:9/v1"], "--model is required"),
        (["--base_url", "http://127.0.0.1:9/v1", "--model", "m", "--serve_transformers", "x"], "exactly one of"),
        (["--base_url", "http://127.0.0.1:9/v1", "--model", "m", "--n", "0"], "must be >= 1"),
        (["--base_url", "http://127.0.0.1:9/v1", "--model", "m", "--tensor_parallel_size", "4"], "--serve_vllm only"),
        (["--base_url", "http://127.0.0.1:9/v1", "--model", "m", "--limit", "0"], "--limit must be >= 1"),
        (["--base_url", "http://127.0.0.1:9/v1", "--model", "m", "--top_p", "7"], "top_p"),
        (
            ["--base_url", "http://127.0.0.1:9/v1", "--model", "m", "--sandbox", "docker", "--sandbox_root", "/tmp"],
            "local sandboxes only",
        ),
        (["--base_url", "http://127.0.0.1:9/v1", "--model", "m", "--max_retries", "-1"], "--max_retries must be"),
        (["--base_url", "http://127.0.0.1:9/v1", "--model", "m", "--retry_backoff", "nan"], "--retry_backoff must"),
        (["--base_url", "http://127.0.0.1:9/v1", "--model", "m", "--max_context_tokens", "0"], "--max_context_tok"),
        (["--base_url", "http://127.0.0.1:9/v1", "--model", "m", "--request_timeout", "0"], "--request_timeout must"),
        (["--base_url", "http://127.0.0.1:9/v1", "--model", "m", "--sandbox", "vm"], "invalid choice"),
    ],
)
def test_cli_rejects_bad_options_before_starting_anything(tmp_path, capsys, extra, message):
    from entropo_trl.rollout.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--tasks", str(tmp_path), "--pool", str(tmp_path / "pool.jsonl"), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "pool.jsonl").exists()


@pytest.mark.parametrize(
    "extra, steps, context",
    [
        ([], 100, 65_536),
        (["--preset", "eval"], 200, 131_072),
        (["--preset", "eval", "--max_steps", "50"], 50, 131_072),
        (["--preset", "eval", "--max_context_tokens", "32768", "--temperature", "0.2"], 200, 32_768),
    ],
)
def test_cli_presets_set_the_papers_limits(tmp_path, monkeypatch, extra, steps, context):
    """`--preset eval` is the paper's test-time setting (200 steps, 131,072 tokens, temperature 0.7, top_p 0.8,
    top_k 20), down to the served model's context; pool generation keeps the authors' 100 steps and 65,536 tokens."""
    import types

    import entropo_trl.rollout.serve
    from entropo_trl.rollout import cli

    seen = {}

    async def fake_run(args, config, base_url, model):
        seen.update(config=config, context=args.max_context_tokens, base_url=base_url)
        return RolloutSummary(args.pool, 0, 0, 0, 0)

    def fake_vllm(server_args):
        seen["served"] = server_args
        return types.SimpleNamespace(base_url="http://127.0.0.1:1/v1", stop=lambda: None)

    monkeypatch.setattr(cli, "_run", fake_run)
    monkeypatch.setattr(entropo_trl.rollout.serve, "start_vllm_server", fake_vllm)
    cli.main(["--tasks", str(tmp_path), "--pool", str(tmp_path / "p.jsonl"), "--serve_vllm", "org/model", *extra])
    config = seen["config"]
    assert config.max_steps == steps and seen["context"] == context and seen["served"].max_model_len == context
    temperature = 0.2 if "--temperature" in extra else 0.7  # a flag overrides its default
    assert (config.sampling.temperature, config.sampling.top_p, config.sampling.top_k) == (temperature, 0.8, 20)

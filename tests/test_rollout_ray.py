"""Rollouts as Ray tasks (`run_rollouts_ray`, `entropo rollout --ray`) on a local two-CPU Ray cluster: the same pool as
without Ray, retries after a killed worker and after infrastructure errors (never of a finished episode), resume after
a killed driver, and the per-node sweep of what dead runs left."""

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from entropo_trl.data.readers import ReadStats, read_trajectories
from entropo_trl.rollout.client import ChatClient, SamplingParams
from entropo_trl.rollout.pool import errors_path
from entropo_trl.rollout.ray_runner import ClientSpec, run_rollouts_ray
from entropo_trl.rollout.runner import RolloutConfig, run_rollouts
from entropo_trl.rollout.sandbox import SANDBOX_PREFIX, make_sandbox, sweep_stale_containers
from entropo_trl.rollout.sandbox.docker import owner_label
from entropo_trl.rollout.scaffold import Action
from entropo_trl.rollout.serve import StubHTTPError, serve_scripted
from entropo_trl.rollout.tasks import Task
from entropo_trl.rollout.toy import make_toy_tasks


def step_of(messages):
    return sum(m["role"] == "assistant" for m in messages)


def looper(messages):
    """Looks around until the step limit."""
    return Action("execute_bash", {"cmd": "ls"}, "Looking around.").to_text()


def quitter(messages):
    return Action("finish", {"command": "submit"}, "I give up.").to_text()


def episode_starts(server, tasks):
    """How many times each episode was started, from the first requests the server kept: (instance_id, sample) ->
    count (each sample has its own seed, counted from 0)."""
    return collections.Counter(
        (next(t.instance_id for t in tasks if t.problem_statement in body["messages"][1]["content"]), body["seed"])
        for body in server.requests
        if step_of(body["messages"]) == 0
    )


class PidReportingFactory:
    """The default local sandbox, after writing the pid of the worker that makes it to `folder/instance_id`."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def __call__(self, task):
        (self.folder / task.instance_id).write_text(str(os.getpid()))
        return make_sandbox("local", task)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of two CPUs (the tests that need it skip when the `[ray]` extra is not installed)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def toy_tasks(tmp_path_factory):
    return make_toy_tasks(tmp_path_factory.mktemp("toy"), n=3)


def pool_ids(pool):
    stats = ReadStats()
    ids = [t.episode_id for t in read_trajectories(pool, stats=stats)]
    assert stats.num_skipped == 0  # no torn or foreign line
    return ids


def test_the_pool_is_the_same_as_without_ray_and_dead_runs_are_swept(cluster, toy_tasks, tmp_path):
    root = tmp_path / "boxes"
    root.mkdir()
    # what a killed run left: a sandbox folder whose owner process is gone
    make_stale = (
        "import tempfile; from entropo_trl.rollout.sandbox.checkout import SANDBOX_PREFIX, _owned_prefix; "
        f"print(tempfile.mkdtemp(prefix=_owned_prefix(SANDBOX_PREFIX), dir={str(root)!r}))"
    )
    stale = subprocess.run([sys.executable, "-c", make_stale], capture_output=True, text=True, check=True)
    assert Path(stale.stdout.strip()).is_dir() and Path(stale.stdout.strip()).name.startswith(SANDBOX_PREFIX)
    config = RolloutConfig(n=2, max_steps=3, oracle=False, sandbox_root=str(root), sampling=SamplingParams(seed=0))

    async def local():
        async with ChatClient(server.base_url, "scripted") as client:
            return await run_rollouts(toy_tasks, client, tmp_path / "local.jsonl", config, progress=False)

    with serve_scripted(looper) as server:
        without_ray = asyncio.run(local())
        spec = ClientSpec(server.base_url, "scripted")
        with_ray = run_rollouts_ray(toy_tasks, spec, tmp_path / "ray.jsonl", config, progress=False)
        again = run_rollouts_ray(toy_tasks, spec, tmp_path / "ray.jsonl", config, progress=False)
    ids = pool_ids(tmp_path / "ray.jsonl")
    assert sorted(ids) == sorted(pool_ids(tmp_path / "local.jsonl")) and len(ids) == len(set(ids)) == 6
    assert (with_ray.ran, with_ray.errors, with_ray.exit_reasons) == (6, 0, {"max_step_limit": 6})
    assert (with_ray.ran, with_ray.exit_reasons) == (without_ray.ran, without_ray.exit_reasons)
    assert str(with_ray).startswith("6 episodes run (0 already in")
    assert (again.ran, again.skipped) == (0, 6)  # a rerun skips what is recorded
    for trajectory in read_trajectories(tmp_path / "ray.jsonl"):
        assert trajectory.num_steps == 3 and trajectory.metadata["workdir"] == "/testbed"
    assert not Path(stale.stdout.strip()).exists()  # swept on the node at the start


def test_a_worker_killed_mid_episode_reruns_that_episode_once(cluster, toy_tasks, tmp_path):
    pids, marker = tmp_path / "pids", tmp_path / "killed"
    pids.mkdir()
    victim = toy_tasks[0]

    def kills_a_worker_at_step_two(messages):
        if victim.problem_statement in messages[1]["content"] and step_of(messages) == 1 and not marker.exists():
            marker.write_text("")
            os.kill(int((pids / victim.instance_id).read_text()), signal.SIGKILL)
        return looper(messages)

    config = RolloutConfig(max_steps=3, oracle=False, sampling=SamplingParams(seed=0))
    with serve_scripted(kills_a_worker_at_step_two) as server:
        summary = run_rollouts_ray(
            toy_tasks,
            ClientSpec(server.base_url, "scripted"),
            tmp_path / "pool.jsonl",
            config,
            sandbox_factory=PidReportingFactory(pids),
            progress=False,
        )
        starts = episode_starts(server, toy_tasks)
    assert marker.exists()  # the worker was killed
    assert summary.ran == 3 and summary.errors == 0 and not errors_path(tmp_path / "pool.jsonl").exists()
    ids = pool_ids(tmp_path / "pool.jsonl")
    assert len(ids) == len(set(ids)) == 3
    assert starts == {(t.instance_id, 0): 2 if t is victim else 1 for t in toy_tasks}  # the victim's rerun only


def test_infrastructure_errors_are_retried_then_recorded_and_finished_episodes_never_rerun(
    cluster, toy_tasks, tmp_path
):
    broken = toy_tasks[1]

    def refuses_one_task(messages):
        if broken.problem_statement in messages[1]["content"]:
            raise StubHTTPError(503, "this replica is down")
        return quitter(messages)

    missing_repo = Task("gone__repo-1", "Fix it.", repo_path=str(tmp_path / "no-such-repo"))
    config = RolloutConfig(oracle=False, sampling=SamplingParams(seed=0))
    with serve_scripted(refuses_one_task) as server:
        spec = ClientSpec(server.base_url, "scripted", max_retries=0)
        summary = run_rollouts_ray(
            [*toy_tasks, missing_repo], spec, tmp_path / "pool.jsonl", config, max_retries=1, progress=False
        )
        starts = episode_starts(server, toy_tasks)
    assert (summary.ran, summary.errors) == (2, 2) and "2 episodes errored" in str(summary)
    assert sorted(pool_ids(tmp_path / "pool.jsonl")) == sorted(f"{t.instance_id}/scripted/0" for t in toy_tasks[::2])
    errors = [json.loads(line) for line in errors_path(tmp_path / "pool.jsonl").read_text().splitlines()]
    by_episode = {e["episode_id"]: e["error"] for e in errors}
    assert len(errors) == 2  # one line per episode, after Ray's retry
    assert by_episode[f"{broken.instance_id}/scripted/0"].startswith("LLMError") and "503" in str(by_episode)
    assert by_episode["gone__repo-1/scripted/0"].startswith("SandboxError: repository folder not found")
    # the broken episode was tried twice (max_retries=1), the finished ones once
    assert starts == {(t.instance_id, 0): 2 if t is broken else 1 for t in toy_tasks}


def test_a_refused_request_is_recorded_without_a_retry(cluster, toy_tasks, tmp_path):
    """A 4xx answer (here an unknown model's 404) would be refused again: no retry, one errors line per episode."""

    def unknown_model(messages):
        raise StubHTTPError(404, "The model `scripted` does not exist.")

    config = RolloutConfig(oracle=False, sampling=SamplingParams(seed=0))
    with serve_scripted(unknown_model) as server:
        spec = ClientSpec(server.base_url, "scripted", max_retries=0)
        summary = run_rollouts_ray(toy_tasks, spec, tmp_path / "pool.jsonl", config, max_retries=2, progress=False)
        starts = episode_starts(server, toy_tasks)
    assert (summary.ran, summary.errors) == (0, 3)
    errors = [json.loads(line) for line in errors_path(tmp_path / "pool.jsonl").read_text().splitlines()]
    assert [e["error"].split(":")[0] for e in errors] == ["EpisodeRefused"] * 3 and "404" in errors[0]["error"]
    assert starts == {(t.instance_id, 0): 1 for t in toy_tasks}  # each tried once, not 1 + max_retries times


def test_killing_the_driver_and_rerunning_resumes(cluster, toy_tasks, tmp_path):
    pool = tmp_path / "pool.jsonl"
    with serve_scripted(looper, delay=0.15) as server:
        command = [
            sys.executable,
            "-m",
            "entropo_trl.rollout.cli",
            "--ray",
            cluster,
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
            "--max_steps",
            "4",
            "--seed",
            "0",
            "--no_oracle",
            "--max_in_flight",
            "2",
            "--sandbox_root",
            str(tmp_path / "boxes"),
        ]
        env = {**os.environ, "TQDM_DISABLE": "1"}
        driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not (pool.exists() and pool.read_text().count("\n") >= 2):
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the driver recorded nothing in 120 s"
            time.sleep(0.05)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        before = pool_ids(pool)
        assert 2 <= len(before) < 9
        summary = run_rollouts_ray(
            toy_tasks,
            ClientSpec(server.base_url, "scripted"),
            pool,
            RolloutConfig(n=3, max_steps=4, oracle=False, sampling=SamplingParams(seed=0)),
            progress=False,
        )
        starts = episode_starts(server, toy_tasks)
    ids = pool_ids(pool)
    assert len(ids) == len(set(ids)) == 9 and ids[: len(before)] == before
    assert summary.skipped == len(before) and summary.ran == 9 - len(before) and summary.errors == 0
    for episode in before:  # recorded before the kill: not run again
        instance, _, sample = episode.split("/")
        assert starts[(instance, int(sample))] == 1
    assert set(starts) == {(t.instance_id, k) for t in toy_tasks for k in range(3)}


def test_docker_sweep_removes_only_this_hosts_containers_of_dead_processes(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = os.uname().nodename
    log = tmp_path / "docker.log"
    fake = tmp_path / "docker"
    me = owner_label(os.getpid())  # a live process, as its containers are labelled
    reused = f"{host}:{os.getpid()}:1"  # a live pid, but started at another time: its owner is gone
    listing = f"c1 {host}:{dead.pid}:5\\nc2 {me}\\nc3 other-host:{dead.pid}:5\\nc4 \\nc5 {reused}\\n"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n[ "$1" = ps ] && printf "{listing}"\nexit 0\n')
    fake.chmod(0o755)
    assert sweep_stale_containers(str(fake)) == ["c1", "c5"]
    assert log.read_text().splitlines()[-1] == "rm -f c1 c5"


def test_cli_ray_flags(tmp_path, capsys, monkeypatch):
    from entropo_trl.rollout.cli import main

    base = ["--tasks", str(tmp_path), "--pool", str(tmp_path / "p.jsonl"), "--base_url", "http://127.0.0.1:9/v1"]
    for extra, message in [
        (["--cpus_per_episode", "2"], "apply to --ray only"),
        (["--ray", "auto", "--cpus_per_episode", "0"], "--cpus_per_episode must be > 0"),
        (["--ray", "auto", "--max_in_flight", "0"], "--max_in_flight must be >= 1"),
        (["--ray", "auto", "--concurrency", "64"], "with --ray, Ray's CPUs and --max_in_flight do"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([*base, "--model", "m", *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--model", "m", "--ray", "local"])
    assert exit_info.value.code == 2 and "pip install entropo-trl[ray]" in capsys.readouterr().err
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, entropo_trl.rollout.ray_runner, entropo_trl.rollout.cli; print('ray' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "False"  # Ray is imported when a run starts, not before


def test_two_endpoints_keep_each_episode_on_one_and_a_stopped_one_moves_its_episodes(cluster, toy_tasks, tmp_path):
    """Ray workers and two endpoints that log the `X-Session-ID` of every request they answer: each episode's requests
    all reach one endpoint, both get work; an endpoint stopped mid-run moves its episodes to the other, and every
    episode is recorded once."""
    from test_rollout_endpoints import Endpoint

    config = RolloutConfig(n=4, max_steps=3, oracle=False, sampling=SamplingParams(seed=0))
    made = [Endpoint(), Endpoint(), Endpoint(answers=4), Endpoint()]
    first, second, going, staying = made
    try:
        spec = ClientSpec([first.url, second.url], "scripted", max_retries=1, backoff=0.01)
        summary = run_rollouts_ray(toy_tasks, spec, tmp_path / "pool.jsonl", config, progress=False)
        ids = pool_ids(tmp_path / "pool.jsonl")
        assert summary.ran == 12 and summary.errors == 0 and len(ids) == len(set(ids)) == 12
        assert set(first.served) | set(second.served) == set(ids)
        assert not set(first.served) & set(second.served)  # no episode on both
        assert first.served and second.served  # both got work
        assert all((first.served + second.served).count(episode) == 3 for episode in ids)  # every request, one place

        spec = ClientSpec([going.url, staying.url], "scripted", max_retries=1, backoff=0.01)
        summary = run_rollouts_ray(toy_tasks, spec, tmp_path / "moved.jsonl", config, progress=False)
        ids = pool_ids(tmp_path / "moved.jsonl")
        assert summary.ran == 12 and summary.errors == 0 and len(ids) == len(set(ids)) == 12
        trajectories = list(read_trajectories(tmp_path / "moved.jsonl"))
        moved = [t for t in trajectories if "moved_endpoints" in t.metadata]
        assert moved and all(t.metadata["moved_endpoints"] == [going.url, staying.url] for t in moved)
        # the episodes the stopped endpoint had started and not finished moved, and only those
        unfinished = {episode for episode in going.served if going.served.count(episode) < 3}
        assert {t.episode_id for t in moved} == unfinished
        for t in trajectories:  # every episode finished, on the endpoint that answered its last request
            last = going.url if going.served.count(t.episode_id) == 3 else staying.url
            assert t.num_steps == 3 and t.metadata["endpoint"] == last
    finally:
        for endpoint in made:
            endpoint.stop()


def test_the_episodes_of_a_run_share_the_endpoints_health_in_a_worker():
    """An endpoint found down by one episode stays out of rotation for the run's next episodes in the same worker (a
    fresh client per episode would forget it and pay the retries again); another run starts with fresh health."""
    spec = ClientSpec("http://127.0.0.1:9/v1,http://127.0.0.1:10/v1", "scripted")
    first, second, other = spec.client("run-a"), spec.client("run-a"), spec.client("run-b")
    first.endpoints.failed("http://127.0.0.1:9/v1")
    assert second.endpoints is first.endpoints and not second.endpoints.in_rotation("http://127.0.0.1:9/v1")
    assert other.endpoints is not first.endpoints and other.endpoints.in_rotation("http://127.0.0.1:9/v1")
    assert spec.client().endpoints is not first.endpoints  # no run: a client of its own

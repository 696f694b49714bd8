"""Benchmark: rollouts past one process: 1 vs 2 endpoints, Ray vs the single-process runner, Ray's dispatch overhead.

    python bench/rollout_scaleout.py            # needs the [ray] extra
    python bench/rollout_scaleout.py --json out.json

Stub endpoints: OpenAI-compatible scripted servers on 127.0.0.1, each in its own process (as vLLM replicas would be),
answer every request in 50 ms with a cheap command (`echo`), then `finish` at the 20th step. Each serves at most
`--slots` requests at once (a replica's batch: its throughput is bounded, so a second endpoint can add to it). Toy
tasks, no test oracle, `--sandbox host` by default (the echo commands are trusted; the bench measures dispatch, not
isolation: `--sandbox local` measures with bubblewrap).

Side by side in one run (each row: `--episodes` episodes, `--in_flight` at once; the client's endpoint list as
`--base_url URL1,URL2` would give it):

- the single-process runner (`run_rollouts`) with 1 and with 2 endpoints;
- `run_rollouts_ray` on a local Ray instance (`--ray_cpus` CPUs, `cpus_per_episode = ray_cpus / in_flight`) with 1
  and with 2 endpoints, its workers warmed by a first run;
- Ray's dispatch overhead per episode: `--sequential` episodes one at a time, through Ray (max_in_flight=1) and
  through the runner (concurrency 1), against one endpoint, side by side in `--rounds` rounds; overhead = (Ray's
  seconds per episode - the runner's) / the runner's, the median over the rounds. Target: at most 5 %.
"""

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from entropo_trl.rollout.client import ChatClient  # noqa: E402
from entropo_trl.rollout.ray_runner import ClientSpec, run_rollouts_ray  # noqa: E402
from entropo_trl.rollout.runner import RolloutConfig, run_rollouts  # noqa: E402
from entropo_trl.rollout.scaffold import Action  # noqa: E402
from entropo_trl.rollout.serve import serve_scripted  # noqa: E402
from entropo_trl.rollout.toy import make_toy_tasks  # noqa: E402


def stub_server(url_file: str, steps: int, delay: float, slots: int) -> None:
    """One stub endpoint: `delay` seconds per request, at most `slots` requests at once."""
    busy = threading.BoundedSemaphore(slots)

    def respond(messages):
        with busy:
            time.sleep(delay)
        step = sum(m["role"] == "assistant" for m in messages)
        if step >= steps - 1:
            return Action("finish", {"command": "submit"}, "Done.").to_text()
        return Action("execute_bash", {"cmd": f"echo step {step}"}, "Next step.").to_text()

    with serve_scripted(respond) as server:
        Path(url_file).write_text(server.base_url)
        while True:
            time.sleep(3600)


def start_stubs(count: int, workdir: str, args) -> tuple[list[subprocess.Popen], list[str]]:
    servers, urls = [], []
    for i in range(count):
        url_file = Path(workdir) / f"url-{i}"
        flags = ["--steps", str(args.steps), "--delay", str(args.delay), "--slots", str(args.slots)]
        servers.append(subprocess.Popen([sys.executable, __file__, "--serve_stub", str(url_file), *flags]))
        while not url_file.exists() or not url_file.read_text():
            if servers[-1].poll() is not None:
                raise RuntimeError("a stub server exited")
            time.sleep(0.05)
        urls.append(url_file.read_text())
    return servers, urls


def run_local(tasks, urls: list[str], pool: str, config: RolloutConfig) -> float:
    async def go():
        async with ChatClient(urls, "stub") as client:
            return await run_rollouts(tasks, client, pool, config, progress=False)

    start = time.perf_counter()
    summary = asyncio.run(go())
    assert summary.ran == len(tasks) * config.n and summary.exit_reasons == {"agent": summary.ran}, summary
    return time.perf_counter() - start


def run_ray(tasks, urls: list[str], pool: str, config: RolloutConfig, cpus_per_episode: float, max_in_flight=None):
    """Seconds of a `run_rollouts_ray` run (by default twice as many episodes submitted as run at once: a worker
    that finishes one gets the next at once)."""
    start = time.perf_counter()
    summary = run_rollouts_ray(
        tasks,
        ClientSpec(urls, "stub"),
        pool,
        config,
        cpus_per_episode=cpus_per_episode,
        max_in_flight=max_in_flight,
        progress=False,
    )
    assert summary.ran == len(tasks) * config.n and summary.exit_reasons == {"agent": summary.ran}, summary
    return time.perf_counter() - start


def measure(args) -> dict:
    import ray

    settings = {k: v for k, v in vars(args).items() if k not in ("serve_stub", "json")}
    workdir = tempfile.mkdtemp(prefix="entropo-bench-")
    tasks = make_toy_tasks(workdir + "/tasks", n=4)
    servers, urls = start_stubs(2, workdir, args)  # before Ray starts: no fork of a process that runs Ray
    limits = {"max_steps": args.steps + 1, "oracle": False, "sandbox": args.sandbox}
    config = RolloutConfig(n=args.episodes // len(tasks), concurrency=args.in_flight, **limits)
    sequential = RolloutConfig(n=args.sequential, concurrency=1, **limits)
    pools = iter(f"{workdir}/pool-{i}.jsonl" for i in range(100))
    rows = {}
    try:
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        cpus_per_episode = args.ray_cpus / args.in_flight  # `in_flight` episodes run at once
        # warm-up: start the workers (they import the library and prepare the tasks' checkouts once). The Ray rows
        # come straight after it: Ray stops idle workers beyond its CPU count within seconds.
        run_ray(tasks, urls, next(pools), config, cpus_per_episode)
        for endpoints in (1, 2):
            rows[f"ray, {endpoints} endpoint(s)"] = run_ray(
                tasks, urls[:endpoints], next(pools), config, cpus_per_episode
            )
        for endpoints in (1, 2):
            rows[f"runner, {endpoints} endpoint(s)"] = run_local(tasks, urls[:endpoints], next(pools), config)
        runner_each, ray_each = [], []
        for _ in range(args.rounds):  # side by side, one episode at a time
            runner_each.append(run_local(tasks[:1], urls[:1], next(pools), sequential) / args.sequential)
            ray_each.append(run_ray(tasks[:1], urls[:1], next(pools), sequential, args.ray_cpus, 1) / args.sequential)
    finally:
        ray.shutdown()
        for server in servers:
            server.kill()
            server.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    episodes = config.n * len(tasks)
    return {
        "settings": {**settings, "episodes": episodes, "cpus": os.cpu_count()},
        "throughput": {name: {"seconds": s, "episodes_per_s": episodes / s} for name, s in rows.items()},
        "sequential": {
            "runner_s_per_episode": statistics.median(runner_each),
            "ray_s_per_episode": statistics.median(ray_each),
            "ray_overhead_share": statistics.median((r - s) / s for r, s in zip(ray_each, runner_each)),
            "ray_overhead_share_per_round": [round((r - s) / s, 4) for r, s in zip(ray_each, runner_each)],
        },
    }


def print_table(result: dict) -> None:
    settings = result["settings"]
    print(
        f"{settings['episodes']} episodes of {settings['steps']} steps, {settings['in_flight']} in flight, "
        f"{settings['delay'] * 1000:.0f} ms per request, {settings['slots']} slots per endpoint, "
        f"{settings['cpus']} CPUs, sandbox {settings['sandbox']}"
    )
    print(f"{'run':<24} {'seconds':>8} {'episodes/s':>11}")
    for name, row in result["throughput"].items():
        print(f"{name:<24} {row['seconds']:>8.2f} {row['episodes_per_s']:>11.2f}")
    seq = result["sequential"]
    print(
        f"one episode at a time: runner {seq['runner_s_per_episode']:.3f} s, Ray {seq['ray_s_per_episode']:.3f} s "
        f"per episode (medians); Ray's dispatch overhead {seq['ray_overhead_share']:+.1%} (target <= 5 %; per "
        f"round {', '.join(f'{x:+.1%}' for x in seq['ray_overhead_share_per_round'])})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=32, help="episodes per throughput row (a multiple of 4)")
    parser.add_argument("--in_flight", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds per request")
    parser.add_argument("--slots", type=int, default=2, help="requests one stub endpoint serves at once")
    parser.add_argument("--ray_cpus", type=float, default=2.0, help="CPUs of the local Ray instance")
    parser.add_argument("--sequential", type=int, default=4, help="episodes one at a time, for the overhead")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the overhead's side-by-side runs")
    parser.add_argument("--sandbox", default="host", choices=("host", "local"))
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--serve_stub", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_stub:
        return stub_server(args.serve_stub, args.steps, args.delay, args.slots)
    result = measure(args)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

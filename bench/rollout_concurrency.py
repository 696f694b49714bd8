"""Benchmark: rollout concurrency and the local sandbox's per-call overhead.

    python bench/rollout_concurrency.py

Concurrency: a stub OpenAI-compatible server on 127.0.0.1, in its own process, answers every request in 50 ms with a cheap command
(`echo`), then `finish` at the 20th step. One episode alone, then 32 episodes at once (concurrency 32), each in its own
local sandbox (a private git checkout of a toy repository), without the test oracle. Speed-up = 32 x T(1) / T(32);
ideal is 32; the target is >= 70 % of it. T(1) and T(32) are measured side by side in each of `--rounds` rounds (the
median is reported), once per sandbox root: the default temporary directory, and /dev/shm (a tmpfs) where it exists.

Sandbox overhead: median wall time of `run("true")` in the isolated local sandbox (bubblewrap; target: at most 30 ms
over plain `bash -c`) and in the unisolated host sandbox, minus the median of running `bash -c true` directly with
`subprocess.run`, the three measured interleaved.
"""

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from entropo_trl.rollout.client import ChatClient  # noqa: E402
from entropo_trl.rollout.runner import RolloutConfig, run_rollouts  # noqa: E402
from entropo_trl.rollout.sandbox import BwrapSandbox, LocalSandbox, require_bwrap  # noqa: E402
from entropo_trl.rollout.scaffold import Action  # noqa: E402
from entropo_trl.rollout.serve import serve_scripted  # noqa: E402
from entropo_trl.rollout.toy import make_toy_tasks  # noqa: E402


def policy(steps: int):
    def respond(messages):
        step = sum(m["role"] == "assistant" for m in messages)
        if step >= steps - 1:
            return Action("finish", {"command": "submit"}, "Done.").to_text()
        return Action("execute_bash", {"cmd": f"echo step {step}"}, "Next step.").to_text()

    return respond


def stub_server(steps: int, delay: float, url_file: str) -> None:
    """The stub LLM server, in its own process (as vLLM would be): it must not share the runner's GIL."""
    with serve_scripted(policy(steps), delay=delay) as server:
        Path(url_file).write_text(server.base_url)
        while True:
            time.sleep(3600)


def concurrency_part(episodes: int, steps: int, delay: float, roots: list[str | None], rounds: int) -> list[dict]:
    workdir = tempfile.mkdtemp(prefix="entropo-bench-")
    [task] = make_toy_tasks(workdir + "/tasks", n=1)
    url_file = Path(workdir) / "url"
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve_stub", str(url_file), "--steps", str(steps), "--delay", str(delay)]
    )
    try:
        while not url_file.exists() or not url_file.read_text():
            if server.poll() is not None:
                raise RuntimeError("the stub server exited")
            time.sleep(0.05)
        base_url = url_file.read_text()

        async def run(n: int, root: str | None, pool: str) -> tuple[float, dict]:
            async with ChatClient(base_url, "stub") as client:
                config = RolloutConfig(n=n, concurrency=n, max_steps=steps + 1, oracle=False, sandbox_root=root)
                start, cpu_start, children_start = time.perf_counter(), time.process_time(), _children_cpu()
                server_start = _process_cpu(server.pid)
                summary = await run_rollouts([task], client, pool, config, progress=False)
                elapsed = time.perf_counter() - start
                cpu = {
                    "runner_cpu_s": time.process_time() - cpu_start,
                    "sandbox_processes_cpu_s": _children_cpu() - children_start,
                    "stub_server_cpu_s": _process_cpu(server.pid) - server_start,
                }
            assert summary.ran == n and summary.exit_reasons == {"agent": n}, summary
            return elapsed, cpu

        results = []
        for root in roots:
            # the first sandbox of a task prepares a checkout that later ones copy: prepare it before timing anything,
            # so that T(1) and T(32) both measure the steady state
            LocalSandbox(task.repo_path, task.base_commit, root=root).close()
            per_round = []
            for k in range(rounds):  # T(1) and T(32) side by side in each round
                single, _ = asyncio.run(run(1, root, f"{workdir}/one-{len(results)}-{k}.jsonl"))
                many, cpu = asyncio.run(run(episodes, root, f"{workdir}/many-{len(results)}-{k}.jsonl"))
                per_round.append({"one_episode_s": single, f"{episodes}_episodes_s": many, "cpu": cpu})
            fractions = [episodes * r["one_episode_s"] / r[f"{episodes}_episodes_s"] / episodes for r in per_round]
            best = per_round[fractions.index(statistics.median_low(fractions))]
            results.append(
                {
                    "sandbox_root": root or tempfile.gettempdir(),
                    "episodes": episodes,
                    "steps": steps,
                    "llm_delay_s": delay,
                    "fraction_of_ideal_median": statistics.median(fractions),
                    "fraction_of_ideal_per_round": [round(f, 3) for f in fractions],
                    "median_round": best,
                }
            )
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of another process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def overhead_part(calls: int) -> dict:
    require_bwrap()
    workdir = tempfile.mkdtemp(prefix="entropo-bench-")
    [task] = make_toy_tasks(workdir + "/tasks", n=1)
    times = {"isolated": [], "host": [], "bash": []}
    with BwrapSandbox(task.repo_path) as isolated, LocalSandbox(task.repo_path) as host:
        for _ in range(calls):
            for name, call in (
                ("isolated", lambda: isolated.run("true")),
                ("host", lambda: host.run("true")),
                ("bash", lambda: subprocess.run(["bash", "-c", "true"], cwd=host.workdir, capture_output=True)),
            ):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    shutil.rmtree(workdir, ignore_errors=True)
    medians = {name: 1000 * statistics.median(values) for name, values in times.items()}
    return {
        "calls": calls,
        "isolated_run_median_ms": medians["isolated"],
        "host_run_median_ms": medians["host"],
        "bash_direct_median_ms": medians["bash"],
        "isolated_overhead_median_ms": medians["isolated"] - medians["bash"],
        "host_overhead_median_ms": medians["host"] - medians["bash"],
        "isolated_over_bash_ratio": medians["isolated"] / medians["bash"],
        "isolated_overhead_target_ms": 30,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5, help="T(1), T(N) pairs measured side by side")
    parser.add_argument(
        "--sandbox_roots",
        default="default,/dev/shm",
        help="comma-separated folders for the sandboxes ('default': the temporary directory); missing ones are skipped",
    )
    parser.add_argument("--overhead_only", action="store_true", help="only the sandbox overhead part")
    parser.add_argument("--serve_stub", metavar="URL_FILE", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.serve_stub:
        stub_server(cli.steps, cli.delay, cli.serve_stub)
        return
    roots = [None if r == "default" else r for r in cli.sandbox_roots.split(",") if r == "default" or Path(r).is_dir()]
    results = {"cpus": os.cpu_count(), "sandbox_overhead": overhead_part(cli.calls)}
    if not cli.overhead_only:
        results["concurrency"] = concurrency_part(cli.episodes, cli.steps, cli.delay, roots, cli.rounds)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

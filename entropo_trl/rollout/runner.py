"""The rollout runner: N episodes per task, concurrently, into an append-only, resumable trajectory pool.

    from entropo_trl.rollout import ChatClient, RolloutConfig, load_tasks, run_rollouts

    async with ChatClient("http://127.0.0.1:8000/v1", "Qwen/Qwen3-Coder-30B-A3B-Instruct") as client:
        summary = await run_rollouts(load_tasks("tasks/"), client, "pool.jsonl", RolloutConfig(n=16))

Each finished episode (agent finished, or a step / token / time limit hit) is labelled by the oracle and appended to
the pool as one line. A restarted run reads the pool's `episode_id`s (`{instance_id}/{source}/{sample}`) and skips
the episodes already there; episodes that were in flight when the process died are run again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..trajectory import ReadStats, Trajectory, read_trajectories, write_trajectories
from .client import ChatClient, ContextLimitExceeded, LLMError, SamplingParams, estimate_prompt_tokens
from .oracle import evaluate_patch
from .sandbox import DockerSandbox, LocalSandbox, Sandbox, default_docker_setup
from .scaffold import SYSTEM_PROMPT, instance_prompt, parse_action, with_steps_remaining
from .tasks import Task
from .tools import ToolState, execute

logger = logging.getLogger(__name__)


@dataclass
class RolloutConfig:
    """Limits and sampling of the rollouts (defaults: the authors' values, DESIGN §4)."""

    n: int = 1  # episodes per task
    concurrency: int = 8  # episodes in flight
    max_steps: int = 100  # assistant turns
    max_tokens_per_call: int = 16_384  # caps `sampling.max_tokens` (the context limit is the client's)
    tool_timeout: float = 90.0  # seconds per tool call
    max_episode_seconds: float = 50_000.0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    source: str | None = None  # recorded as the trajectories' source; default: the client's model name
    sandbox: str = "local"  # "local" or "docker"
    # where local sandboxes make their private copies (None: the system's temporary directory). A tmpfs such as
    # /dev/shm makes copying and deleting checkouts much cheaper, at the cost of memory: one checkout per episode in
    # flight, plus up to `sandbox.MAX_TEMPLATES` prepared ones.
    sandbox_root: str | None = None
    oracle: bool = True  # label each trajectory by running its tests
    oracle_timeout: float = 900.0
    # the repository path written into recorded trajectories in place of the sandbox's own (None: keep it)
    record_workdir: str | None = "/testbed"

    def __post_init__(self):
        if self.n < 1 or self.concurrency < 1 or self.max_steps < 1 or self.max_tokens_per_call < 1:
            raise ValueError("n, concurrency, max_steps and max_tokens_per_call must be >= 1")
        for name in ("tool_timeout", "max_episode_seconds", "oracle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.sandbox not in ("local", "docker"):
            raise ValueError(f"sandbox must be 'local' or 'docker', got {self.sandbox!r}")
        if self.sandbox_root is not None and self.sandbox == "docker":
            raise ValueError("sandbox_root applies to local sandboxes only (docker containers have their own disk)")


def default_sandbox_factory(backend: str = "local", root: str | None = None) -> Callable[[Task], Sandbox]:
    """A fresh sandbox per episode: a private copy of `task.repo_path` under `root` (local) or a container of
    `task.image`."""

    def make(task: Task) -> Sandbox:
        if backend == "docker":
            if not task.image:
                raise ValueError(f"task {task.instance_id} has no Docker image")
            sandbox = DockerSandbox(
                task.image, setup=task.metadata.get("docker_setup") or default_docker_setup(task.image)
            )
            sandbox.start()
            return sandbox
        if not task.repo_path:
            raise ValueError(f"task {task.instance_id} has no local repository (repo_path); use the docker sandbox")
        return LocalSandbox(task.repo_path, task.base_commit, root=root)

    return make


def episode_id(task: Task, source: str, sample: int) -> str:
    return f"{task.instance_id}/{source}/{sample}"


async def _blocking(executor: ThreadPoolExecutor | None, fn, *args):
    """Run blocking sandbox / tool work off the event loop (asyncio's default pool has only cpu_count + 4 threads,
    which would serialise 32 concurrent episodes)."""
    return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args))


async def run_episode(
    task: Task,
    client: ChatClient,
    config: RolloutConfig,
    sample: int,
    sandbox_factory: Callable[[Task], Sandbox],
    executor: ThreadPoolExecutor | None = None,
) -> Trajectory:
    """One episode: the agent loop in a fresh sandbox, then the oracle's label."""
    source = config.source or client.model
    start = time.monotonic()
    sandbox = await _blocking(executor, sandbox_factory, task)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": instance_prompt(task.problem_statement, sandbox.workdir, config.max_steps)},
    ]
    state, exit_reason, finished = ToolState(), "max_step_limit", False
    sampling = replace(
        config.sampling,
        max_tokens=min(config.sampling.max_tokens, config.max_tokens_per_call),
        # samples of one task share their prompt: one seed for all would make them the same episode
        seed=None if config.sampling.seed is None else config.sampling.seed + sample,
    )
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    hint = None  # the prompt's size from the server's last count, plus an estimate of what came after it
    try:
        for step in range(config.max_steps):
            try:
                completion = await client.complete(messages, sampling, prompt_tokens_hint=hint)
            except ContextLimitExceeded:
                exit_reason = "token_limit"
                break
            except LLMError as exc:
                status = exc.status or 0
                if status in (401, 403, 404) or (step == 0 and 400 <= status < 500 and status != 429):
                    # the endpoint refuses every request (credentials, model name, parameters): not an episode to
                    # record with a reward, but an error, counted and run again after a restart
                    raise
                logger.warning(f"{task.instance_id} sample {sample}: LLM query failed: {exc}")
                exit_reason = "llm_query_error"
                break
            usage["prompt_tokens"] = completion.prompt_tokens
            usage["completion_tokens"] += completion.completion_tokens
            messages.append({"role": "assistant", "content": completion.text})
            action = parse_action(completion.text)
            result = await _blocking(executor, execute, action, sandbox, state, config.tool_timeout)
            if result.done:
                exit_reason, finished = "agent", True
                break
            observation = {
                "role": "user",
                "content": with_steps_remaining(result.observation, config.max_steps - step - 1),
            }
            messages.append(observation)
            if completion.prompt_tokens > 0:
                hint = completion.prompt_tokens + completion.completion_tokens + estimate_prompt_tokens([observation])
            if time.monotonic() - start > config.max_episode_seconds:
                exit_reason = "traj_time_limit"
                break
        patch = await _blocking(executor, sandbox.diff)
    finally:
        await _blocking(executor, sandbox.close)
    if config.record_workdir and sandbox.workdir != config.record_workdir:
        # A local sandbox lives in a fresh temporary folder per episode; recorded under one stable name (as the Docker
        # images' /testbed), episodes of the same task share their prompt exactly, which preference pairs need.
        messages = [{**m, "content": m["content"].replace(sandbox.workdir, config.record_workdir)} for m in messages]
    trajectory = Trajectory(
        instance_id=task.instance_id,
        messages=messages,
        reward=0.0,
        finished=finished,
        exit_reason=exit_reason,
        patch=patch,
        num_steps=sum(m["role"] == "assistant" for m in messages),
        source=source,
        episode_id=episode_id(task, source, sample),
        metadata={
            "sample": sample,
            "seconds": round(time.monotonic() - start, 3),
            "workdir": sandbox.workdir,
            **usage,
        },
    )
    trajectory.metadata["labelled"] = bool(config.oracle and (task.FAIL_TO_PASS or task.PASS_TO_PASS))
    if trajectory.metadata["labelled"]:
        result = await _blocking(executor, evaluate_patch, task, patch, sandbox_factory, config.oracle_timeout)
        result.label(trajectory)
    return trajectory


@dataclass
class RolloutSummary:
    pool: str
    total: int  # episodes the task set asks for
    skipped: int  # already in the pool
    ran: int
    passed: int
    exit_reasons: dict[str, int] = field(default_factory=dict)
    errors: int = 0  # episodes that failed outside the agent loop (sandbox, oracle); not written, retried on restart

    def __str__(self) -> str:
        rate = f"{self.passed / self.ran:.1%}" if self.ran else "n/a"
        return (
            f"{self.ran} episodes run ({self.skipped} already in {self.pool}), {self.passed} passed ({rate}); "
            f"exit reasons {self.exit_reasons}" + (f"; {self.errors} failed (see the log)" if self.errors else "")
        )


def done_episodes(pool: str | Path) -> set[str]:
    """The `episode_id`s already in a pool (a torn last line is counted as not done)."""
    if not Path(pool).exists():
        return set()
    stats = ReadStats()
    done = {t.episode_id for t in read_trajectories(pool, "entropo", on_error="skip", stats=stats) if t.episode_id}
    if stats.num_skipped:
        logger.warning(f"{pool}: {stats.summary()}")
    return done


async def run_rollouts(
    tasks: Sequence[Task],
    client: ChatClient,
    pool: str | Path,
    config: RolloutConfig | None = None,
    sandbox_factory: Callable[[Task], Sandbox] | None = None,
    progress: bool = True,
) -> RolloutSummary:
    """Run `config.n` episodes per task (skipping those already in `pool`), `config.concurrency` at a time, and
    append each trajectory to `pool` as it finishes."""
    config = config or RolloutConfig()
    factory = sandbox_factory or default_sandbox_factory(config.sandbox, config.sandbox_root)
    source = config.source or client.model
    done = done_episodes(pool)
    todo = [(task, k) for task in tasks for k in range(config.n) if episode_id(task, source, k) not in done]
    total = len(tasks) * config.n
    summary = RolloutSummary(str(pool), total, total - len(todo), 0, 0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=total - len(todo), desc="rollouts", unit="episode")
    semaphore = asyncio.Semaphore(config.concurrency)
    executor = ThreadPoolExecutor(max_workers=config.concurrency + 4, thread_name_prefix="entropo-rollout")
    write_lock = asyncio.Lock()

    async def one(task: Task, sample: int) -> None:
        async with semaphore:
            try:
                trajectory = await run_episode(task, client, config, sample, factory, executor)
            except Exception:  # noqa: BLE001 - one broken episode must not stop the pool; it is retried on restart
                logger.exception(f"episode {episode_id(task, source, sample)} failed")
                summary.errors += 1
                return
        async with write_lock:
            await _blocking(executor, write_trajectories, pool, [trajectory])
            summary.ran += 1
            summary.passed += trajectory.passed
            summary.exit_reasons[trajectory.exit_reason] = summary.exit_reasons.get(trajectory.exit_reason, 0) + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(success=f"{summary.passed / summary.ran:.0%}", refresh=False)

    try:
        await asyncio.gather(*(one(task, sample) for task, sample in todo))
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        if bar is not None:
            bar.close()
    return summary

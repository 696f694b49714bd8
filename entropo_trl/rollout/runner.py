"""The rollout runner: N episodes per task, concurrently, into an append-only, resumable trajectory pool.

    from entropo_trl.rollout import ChatClient, RolloutConfig, load_tasks, run_rollouts

    async with ChatClient("http://127.0.0.1:8000/v1", "Qwen/Qwen3-Coder-30B-A3B-Instruct") as client:
        summary = await run_rollouts(load_tasks("tasks/"), client, "pool.jsonl", RolloutConfig(n=16))

Each finished episode (agent finished, or a step / token / time limit hit) is labelled by the oracle and appended to
the pool as one line. A restarted run reads the pool's `episode_id`s (`{instance_id}/{source}/{sample}`) and skips
the episodes already there; episodes that were in flight when the process died are run again.

Episodes that fail for reasons outside the model's answers go to an errors file beside the pool instead, and several
runners on one pool share the work through claims on the episodes in flight (both in `rollout/pool.py`). The
secrets the runner knows are redacted from what the model is shown and from what is written (`rollout/redaction.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..data.trajectory import Trajectory, write_trajectories
from .client import ChatClient, Completion, ContextLimitExceeded, LLMError, SamplingParams, estimate_prompt_tokens
from .oracle import evaluate_patch
from .pool import EpisodeClaims, PoolIndex, claims_path, done_episodes, episode_id, errors_path, record_error
from .redaction import known_secrets, redact
from .sandbox import (
    SANDBOX_BACKENDS,
    Sandbox,
    default_sandbox_factory,
    sweep_stale_pods,
    sweep_stale_sandboxes,
)
from .scaffold import SYSTEM_PROMPT, instance_prompt, parse_action, with_steps_remaining
from .tasks import Task
from .tools import ToolState, execute

logger = logging.getLogger(__name__)

CLAIM_POLL_SECONDS = 0.5
"""How often a runner with nothing left but episodes that other runners hold looks at the pool and claims again."""


@dataclass
class RolloutConfig:
    """Limits and sampling of the rollouts (defaults: the authors' values, docs/design.md, 'Rollouts')."""

    n: int = 1  # episodes per task
    concurrency: int = 8  # episodes in flight
    max_steps: int = 100  # assistant turns
    max_tokens_per_call: int = 16_384  # caps `sampling.max_tokens` (the context limit is the client's)
    tool_timeout: float = 90.0  # seconds per tool call
    max_episode_seconds: float = 50_000.0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    source: str | None = None  # recorded as the trajectories' source; default: the client's model name
    # "local" (isolated: bubblewrap), "host" (unisolated, trusted models only) or "docker"
    sandbox: str = "local"
    # where local sandboxes make their private copies (None: the system's temporary directory). A tmpfs such as
    # /dev/shm makes copying and deleting checkouts much cheaper, at the cost of memory: one checkout per episode in
    # flight, plus up to `sandbox.MAX_TEMPLATES` prepared ones.
    sandbox_root: str | None = None
    oracle: bool = True  # label each trajectory by running its tests
    oracle_timeout: float = 900.0
    # the repository path written into recorded trajectories in place of the sandbox's own (None: keep it)
    record_workdir: str | None = "/testbed"
    # start no new episode once this many episodes in a row could not reach the model (the endpoint is down, or
    # refuses every request); None: never stop early
    stop_after_llm_errors: int | None = 16

    @property
    def sandbox_lifetime(self) -> float:
        """The longest a container or pod may live: an episode's or an oracle check's time limit, plus 10 minutes."""
        return max(self.max_episode_seconds, self.oracle_timeout) + 600

    def __post_init__(self):
        if self.n < 1 or self.concurrency < 1 or self.max_steps < 1 or self.max_tokens_per_call < 1:
            raise ValueError("n, concurrency, max_steps and max_tokens_per_call must be >= 1")
        for name in ("tool_timeout", "max_episode_seconds", "oracle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.sandbox not in SANDBOX_BACKENDS:
            raise ValueError(f"sandbox must be one of {', '.join(SANDBOX_BACKENDS)}; got {self.sandbox!r}")
        if self.sandbox_root is not None and self.sandbox in ("docker", "k8s"):
            raise ValueError(
                f"sandbox_root applies to local sandboxes only ({self.sandbox} sandboxes have their own disk)"
            )
        if self.stop_after_llm_errors is not None and self.stop_after_llm_errors < 1:
            raise ValueError(f"stop_after_llm_errors must be >= 1 or None, got {self.stop_after_llm_errors}")


# ------------------------------------------------------------------------------------------------------ episodes


async def _blocking(executor: ThreadPoolExecutor | None, fn, *args):
    """Run blocking sandbox / tool work off the event loop (asyncio's default pool has only cpu_count + 4 threads,
    which would serialise 32 concurrent episodes)."""
    return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args))


async def _make_sandbox(executor: ThreadPoolExecutor | None, factory: Callable[[Task], Sandbox], task: Task):
    """`factory(task)` off the event loop. If the episode is cancelled meanwhile (SIGINT, SIGTERM), the sandbox that
    the thread is still making is waited for and closed, so that none is left behind."""
    future = asyncio.get_running_loop().run_in_executor(executor, factory, task)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            sandbox = await future
            await _blocking(executor, sandbox.close)
        raise


def _refuses_the_conversation(error: LLMError) -> bool:
    """A client error (4xx other than a timeout or a rate limit): the server refuses this request as it is."""
    return error.status is not None and 400 <= error.status < 500 and error.status not in (408, 409, 429)


class _Episode:
    """One episode's agent loop, `run` → `step` → `query`: the conversation with the model about `task` in `sandbox`,
    the tools' state, the tokens used, the endpoints that answered (`endpoints`, in the order they served it), and how
    the episode ended (`exit_reason`, `finished`)."""

    def __init__(
        self,
        task: Task,
        client: ChatClient,
        config: RolloutConfig,
        sample: int,
        sandbox: Sandbox,
        executor: ThreadPoolExecutor | None,
        secrets: Sequence[tuple[str, str]],
        start: float,
    ):
        self.client, self.config, self.sandbox, self.executor = client, config, sandbox, executor
        self.secrets, self.start = secrets, start
        # the session id of every request: its endpoint is picked by it, and session-aware routers keep it together
        self.episode_id = episode_id(task, config.source or client.model, sample)
        self.endpoints: list[str] = []
        self.messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": instance_prompt(task.problem_statement, sandbox.workdir, config.max_steps)},
        ]
        self.state, self.exit_reason, self.finished = ToolState(), "max_step_limit", False
        self.sampling = replace(
            config.sampling,
            max_tokens=min(config.sampling.max_tokens, config.max_tokens_per_call),
            # samples of one task share their prompt: one seed for all would make them the same episode
            seed=None if config.sampling.seed is None else config.sampling.seed + sample,
        )
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self.hint: int | None = (
            None  # the prompt's size from the server's last count, plus an estimate of what came after it
        )

    async def run(self) -> None:
        """Steps until the agent finishes or a step, token or time limit ends the episode."""
        for step in range(self.config.max_steps):
            if await self.step(step):
                return
            if time.monotonic() - self.start > self.config.max_episode_seconds:
                self.exit_reason = "traj_time_limit"
                return

    async def step(self, step: int) -> bool:
        """One turn: the model's answer, its action run in the sandbox, and the observation it gets back. True when
        the episode ends here."""
        completion = await self.query(step)
        if completion is None:
            return True
        self.usage["prompt_tokens"] = completion.prompt_tokens
        self.usage["completion_tokens"] += completion.completion_tokens
        self.messages.append({"role": "assistant", "content": completion.text})
        action = parse_action(completion.text)
        result = await _blocking(self.executor, execute, action, self.sandbox, self.state, self.config.tool_timeout)
        if result.done:
            self.exit_reason, self.finished = "agent", True
            return True
        steps_left = self.config.max_steps - step - 1
        observation = {
            "role": "user",
            # redacted before the model sees it: neither its next turns nor the record can repeat a key
            "content": with_steps_remaining(redact(result.observation, self.secrets), steps_left),
        }
        self.messages.append(observation)
        if completion.prompt_tokens > 0:
            self.hint = completion.prompt_tokens + completion.completion_tokens + estimate_prompt_tokens([observation])
        return False

    async def query(self, step: int) -> Completion | None:
        """The model's answer to the conversation so far; None when the conversation cannot go on (it outgrew the
        context, or the server refuses it once it has grown), with `exit_reason` set."""
        try:
            completion = await self.client.complete(
                self.messages, self.sampling, prompt_tokens_hint=self.hint, session_id=self.episode_id
            )
        except ContextLimitExceeded:
            self.exit_reason = "token_limit"
            return None
        except LLMError as error:
            if step == 0 or not _refuses_the_conversation(error):
                raise  # the endpoint, not this conversation: an error, retried on rerun
            # a definite 4xx once the conversation has grown (not a context error the client recognised): the same
            # request would be refused on every rerun, so the episode ends here, recorded
            self.exit_reason = "llm_request_refused"
            return None
        if not self.endpoints or self.endpoints[-1] != completion.endpoint:  # its endpoint failed: it moved
            self.endpoints.append(completion.endpoint)
        return completion


def _record(task: Task, config: RolloutConfig, source: str, sample: int, episode: _Episode, patch: str) -> Trajectory:
    """The finished episode as an unlabelled trajectory (reward 0), its messages under `config.record_workdir`; its
    metadata names the endpoint that served it (`endpoint`, the last one) and, when it moved because an endpoint
    failed, every endpoint in the order they served it (`moved_endpoints`)."""
    messages, workdir, endpoints = episode.messages, episode.sandbox.workdir, episode.endpoints
    if config.record_workdir and workdir != config.record_workdir:
        # A local sandbox lives in a fresh temporary folder per episode; recorded under one stable name (as the Docker
        # images' /testbed), episodes of the same task share their prompt exactly, which preference pairs need.
        messages = [{**m, "content": m["content"].replace(workdir, config.record_workdir)} for m in messages]
    return Trajectory(
        instance_id=task.instance_id,
        messages=messages,
        reward=0.0,
        finished=episode.finished,
        exit_reason=episode.exit_reason,
        patch=patch,
        num_steps=sum(m["role"] == "assistant" for m in messages),
        source=source,
        episode_id=episode_id(task, source, sample),
        metadata={
            "sample": sample,
            "seconds": round(time.monotonic() - episode.start, 3),
            "workdir": workdir,
            **episode.usage,
            **({"endpoint": endpoints[-1]} if endpoints else {}),
            **({"moved_endpoints": list(endpoints)} if len(endpoints) > 1 else {}),
        },
    )


async def _score(
    trajectory: Trajectory,
    task: Task,
    config: RolloutConfig,
    sandbox_factory: Callable[[Task], Sandbox],
    executor: ThreadPoolExecutor | None,
) -> None:
    """Label `trajectory` by the oracle's run of the task's tests on its patch, when `config.oracle` is set and the
    task has tests (`metadata["labelled"]` says which)."""
    trajectory.metadata["labelled"] = bool(config.oracle and (task.FAIL_TO_PASS or task.PASS_TO_PASS))
    if trajectory.metadata["labelled"]:
        result = await _blocking(
            executor, evaluate_patch, task, trajectory.patch, sandbox_factory, config.oracle_timeout
        )
        result.label(trajectory)


async def run_episode(
    task: Task,
    client: ChatClient,
    config: RolloutConfig,
    sample: int,
    sandbox_factory: Callable[[Task], Sandbox],
    executor: ThreadPoolExecutor | None = None,
) -> Trajectory:
    """One episode: the agent loop in a fresh sandbox, then the oracle's label.

    Raises what the episode cannot be recorded for: [`LLMError`] when the model could not be reached or gave no
    chat completion (after the client's retries), and errors of the sandbox or the oracle. The conversation growing
    past the context ([`ContextLimitExceeded`]) ends the episode normally (`exit_reason="token_limit"`), and so does
    a client error (4xx) after the first step, which a rerun would meet again (`exit_reason="llm_request_refused"`)."""
    source = config.source or client.model
    secrets = known_secrets(client.api_key)
    start = time.monotonic()
    sandbox = await _make_sandbox(executor, sandbox_factory, task)
    episode = _Episode(task, client, config, sample, sandbox, executor, secrets, start)
    try:
        await episode.run()
        patch = await _blocking(executor, sandbox.diff)
    finally:
        await _blocking(executor, sandbox.close)
    trajectory = _record(task, config, source, sample, episode, patch)
    await _score(trajectory, task, config, sandbox_factory, executor)
    # the oracle judged the patch as written; the record keeps no secret, wherever the model put it
    trajectory.messages = redact(trajectory.messages, secrets)
    trajectory.patch = redact(trajectory.patch, secrets)
    trajectory.metadata = redact(trajectory.metadata, secrets)
    return trajectory


# ------------------------------------------------------------------------------------------------------- the run


@dataclass
class RolloutSummary:
    """What a run of [`run_rollouts`] did, counted in episodes; its `str` is the one-line report."""

    pool: str
    total: int  # episodes the task set asks for
    skipped: int  # already in the pool when the run started
    ran: int  # recorded by this run
    passed: int
    exit_reasons: dict[str, int] = field(default_factory=dict)
    # episodes that could not be recorded (model unreachable, sandbox or oracle failures): not in the pool, one line
    # each in `errors_file`, run again by a rerun
    errors: int = 0
    errors_file: str = ""
    by_others: int = 0  # recorded meanwhile by other runners of the same pool
    not_started: int = 0  # left for a rerun after `stop_after_llm_errors` episodes in a row could not reach the model
    dropped_test_edits: int = 0  # the model's edits to test infrastructure that the oracle did not let count

    def __str__(self) -> str:
        rate = f"{self.passed / self.ran:.1%}" if self.ran else "n/a"
        text = (
            f"{self.ran} episodes run ({self.skipped} already in {self.pool}), {self.passed} passed ({rate}); "
            f"exit reasons {self.exit_reasons}"
        )
        if self.by_others:
            text += f"; {self.by_others} recorded by other runners"
        if self.dropped_test_edits:
            text += f"; {self.dropped_test_edits} test-infrastructure edits dropped by the oracle"
        if self.errors:
            text += f"; {self.errors} episodes errored, not recorded (see {self.errors_file}; a rerun runs them again)"
        if self.not_started:
            text += f"; {self.not_started} not started, as the model could not be reached (a rerun runs them)"
        return text

    def add(self, trajectory: Trajectory, bar=None) -> None:
        """Count a recorded episode, and move the progress bar (if any) with the running success rate."""
        self.ran += 1
        self.passed += trajectory.passed
        self.exit_reasons[trajectory.exit_reason] = self.exit_reasons.get(trajectory.exit_reason, 0) + 1
        self.dropped_test_edits += len(trajectory.metadata.get("dropped_test_edits") or ())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(success=f"{self.passed / self.ran:.0%}", refresh=False)


def episodes_left(
    tasks: Sequence[Task], config: RolloutConfig, source: str, index: PoolIndex
) -> deque[tuple[Task, int]]:
    """The (task, sample) pairs of the run that are not in the pool yet (a resumed run skips what is done)."""
    done = done_episodes(index)
    return deque((task, k) for task in tasks for k in range(config.n) if episode_id(task, source, k) not in done)


def progress_bar(total: int, initial: int):
    """A tqdm bar over the run's episodes, starting at those already in the pool."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="rollouts", unit="episode")


class _Run:
    """One call of [`run_rollouts`]: the episodes left to do, the claims and threads that run them, and the summary
    and progress bar that count them. `concurrency` workers share it on one event loop."""

    def __init__(
        self,
        tasks: Sequence[Task],
        client: ChatClient,
        pool: str | Path,
        config: RolloutConfig,
        sandbox_factory: Callable[[Task], Sandbox],
        progress: bool,
    ):
        self.client, self.pool, self.config, self.factory = client, pool, config, sandbox_factory
        self.source = config.source or client.model
        self.secrets = known_secrets(client.api_key)
        self.index = PoolIndex(pool)
        self.todo = episodes_left(tasks, config, self.source, self.index)
        total = len(tasks) * config.n
        self.summary = RolloutSummary(
            str(pool), total, total - len(self.todo), 0, 0, errors_file=str(errors_path(pool))
        )
        self.bar = progress_bar(total, total - len(self.todo)) if progress else None
        self.claims = EpisodeClaims(claims_path(pool))
        self.executor = ThreadPoolExecutor(max_workers=config.concurrency + 4, thread_name_prefix="entropo-rollout")
        self.write_lock = asyncio.Lock()
        self.held_elsewhere: list[tuple[Task, int]] = []  # claimed by another runner when tried: tried again later
        self.llm_errors_in_a_row = 0

    def stopped(self) -> bool:
        """Whether `stop_after_llm_errors` episodes in a row could not reach the model: start no more."""
        limit = self.config.stop_after_llm_errors
        return limit is not None and self.llm_errors_in_a_row >= limit

    async def worker(self) -> None:
        """Take episodes off the list until none is left or the run is stopped."""
        while self.todo or self.held_elsewhere:
            if self.stopped():
                return
            if not self.todo:  # only episodes that other runners hold are left: wait for them to finish or go away
                await asyncio.sleep(CLAIM_POLL_SECONDS)
                self.todo.extend(self.held_elsewhere)
                self.held_elsewhere.clear()
                continue
            await self.take(*self.todo.popleft())

    async def take(self, task: Task, sample: int) -> None:
        """Claim one episode and run it, unless another runner has recorded it meanwhile (counted as theirs) or holds
        it now (tried again later)."""
        episode = episode_id(task, self.source, sample)
        claimed = self.claims.claim(episode)
        try:
            if episode in self.index.refresh():  # recorded by another runner since this one read the pool
                self.summary.by_others += 1
                if self.bar is not None:
                    self.bar.update(1)
            elif not claimed:
                self.held_elsewhere.append((task, sample))
            else:
                await self.run_claimed(task, sample, episode)
        finally:
            if claimed:
                self.claims.release(episode)

    async def run_claimed(self, task: Task, sample: int, episode: str) -> None:
        """Run a claimed episode and record it: its trajectory in the pool, or its error in the errors file."""
        try:
            trajectory = await run_episode(task, self.client, self.config, sample, self.factory, self.executor)
        except Exception as error:  # noqa: BLE001 - one broken episode must not stop the pool; it is retried on rerun
            await self.record_failure(episode, error)
            return
        self.llm_errors_in_a_row = 0
        await self.append(trajectory)
        self.count(trajectory)

    async def record_failure(self, episode: str, error: Exception) -> None:
        """Log an episode that could not be recorded, count it, and write it to the errors file."""
        logger.error(f"episode {episode} errored, not recorded: {redact(str(error), self.secrets)}")
        self.llm_errors_in_a_row = self.llm_errors_in_a_row + 1 if isinstance(error, LLMError) else 0
        self.summary.errors += 1
        await _blocking(self.executor, record_error, errors_path(self.pool), episode, error, self.secrets)

    async def append(self, trajectory: Trajectory) -> None:
        """Write `trajectory` to the pool, one writer at a time; the write is finished even if the run is cancelled
        meanwhile, so the episode's claim is released only once its line is whole."""
        async with self.write_lock:
            write = asyncio.get_running_loop().run_in_executor(
                self.executor, write_trajectories, self.pool, [trajectory]
            )
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await write
                raise

    def count(self, trajectory: Trajectory) -> None:
        """Add a recorded episode to the summary and the progress bar."""
        self.summary.add(trajectory, self.bar)

    def close(self) -> None:
        """Count what was not started, give back the claims still held, stop the threads and close the bar."""
        self.summary.not_started = len(self.todo) + len(self.held_elsewhere)
        self.claims.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.bar is not None:
            self.bar.close()


async def run_rollouts(
    tasks: Sequence[Task],
    client: ChatClient,
    pool: str | Path,
    config: RolloutConfig | None = None,
    sandbox_factory: Callable[[Task], Sandbox] | None = None,
    progress: bool = True,
) -> RolloutSummary:
    """Run `config.n` episodes per task (skipping those already in `pool`), `config.concurrency` at a time, and
    append each trajectory to `pool` as it finishes.

    Each episode is claimed first (see [`EpisodeClaims`]): other runners on the same pool skip it while it runs, and
    an episode another runner holds is waited for (it is taken over if that runner dies or fails it). Episodes that
    fail outside the model's answers are logged to `errors_path(pool)` and counted in `summary.errors`."""
    config = config or RolloutConfig()
    factory = sandbox_factory or default_sandbox_factory(config.sandbox, config.sandbox_root, config.sandbox_lifetime)
    run = _Run(tasks, client, pool, config, factory, progress)
    try:
        # what killed runs left behind goes first: copies whose processes are gone, pods past their time
        if config.sandbox == "k8s":
            await _blocking(run.executor, sweep_stale_pods)
        elif config.sandbox != "docker":
            await _blocking(run.executor, sweep_stale_sandboxes, config.sandbox_root)
        await asyncio.gather(*(run.worker() for _ in range(config.concurrency)))
    finally:
        run.close()
    return run.summary

"""The rollout runner: N episodes per task, concurrently, into an append-only, resumable trajectory pool.

    from entropo_trl.rollout import ChatClient, RolloutConfig, load_tasks, run_rollouts

    async with ChatClient("http://127.0.0.1:8000/v1", "Qwen/Qwen3-Coder-30B-A3B-Instruct") as client:
        summary = await run_rollouts(load_tasks("tasks/"), client, "pool.jsonl", RolloutConfig(n=16))

Each finished episode (agent finished, or a step / token / time limit hit) is labelled by the oracle and appended to
the pool as one line. A restarted run reads the pool's `episode_id`s (`{instance_id}/{source}/{sample}`) and skips
the episodes already there; episodes that were in flight when the process died are run again.

Beside the pool `pool.jsonl`:

- `pool.jsonl.errors.jsonl`: one JSON line per episode that failed for reasons outside the model's answers (the
  endpoint unreachable, timeouts and HTTP errors after the client's retries, responses that are not chat
  completions, sandboxes or oracles that would not run). Nothing is written to the pool for such an episode, so a
  rerun runs it again. A model that answers, however badly, gives a normal trajectory.
- `pool.jsonl.claims/`: the episodes in flight, one file each, held under an exclusive `flock` by the runner that
  runs it. Several runners (processes) on one pool and one machine share the work through it, and every episode is
  recorded once. The kernel drops a dead process's locks, so a killed runner's episodes can be taken at once.

The values of the API-key variables the runner knows (`SECRET_VARIABLES`, other `*_API_KEY` / `*_TOKEN` /
`*_SECRET` / `*_PASSWORD` variables, and the client's own key) are redacted from what the model is shown and from what
is written, as a second line of defence behind the sandbox's cleared environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..data.trajectory import Trajectory, write_trajectories
from .client import ChatClient, ContextLimitExceeded, LLMError, SamplingParams, estimate_prompt_tokens
from .oracle import evaluate_patch
from .sandbox import SANDBOX_BACKENDS, Sandbox, make_sandbox, sweep_stale_sandboxes
from .scaffold import SYSTEM_PROMPT, instance_prompt, parse_action, with_steps_remaining
from .tasks import Task
from .tools import ToolState, execute

logger = logging.getLogger(__name__)

SECRET_VARIABLES = (
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "WANDB_API_KEY",
    "GITHUB_TOKEN",
    "GH_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GOOGLE_API_KEY",
    "GEMINI_API_KEY",
    "AZURE_OPENAI_API_KEY",
    "MISTRAL_API_KEY",
    "TOGETHER_API_KEY",
    "OPENROUTER_API_KEY",
    "VLLM_API_KEY",
)
"""Environment variables whose values the runner redacts from observations and records (besides these, any variable
named like `*_API_KEY`, `*_TOKEN`, `*_SECRET`, `*_PASSWORD`)."""

_SECRET_NAME = re.compile(r"(?:^|_)(?:API_KEY|TOKEN|SECRET|SECRET_KEY|PASSWORD|ACCESS_KEY)$")
_MIN_SECRET_CHARS = 8  # shorter values ("1", "true") are not keys, and redacting them would garble observations

CLAIM_POLL_SECONDS = 0.5
"""How often a runner with nothing left but episodes that other runners hold looks at the pool and claims again."""


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

    def __post_init__(self):
        if self.n < 1 or self.concurrency < 1 or self.max_steps < 1 or self.max_tokens_per_call < 1:
            raise ValueError("n, concurrency, max_steps and max_tokens_per_call must be >= 1")
        for name in ("tool_timeout", "max_episode_seconds", "oracle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.sandbox not in SANDBOX_BACKENDS:
            raise ValueError(f"sandbox must be one of {', '.join(SANDBOX_BACKENDS)}; got {self.sandbox!r}")
        if self.sandbox_root is not None and self.sandbox == "docker":
            raise ValueError("sandbox_root applies to local sandboxes only (docker containers have their own disk)")
        if self.stop_after_llm_errors is not None and self.stop_after_llm_errors < 1:
            raise ValueError(f"stop_after_llm_errors must be >= 1 or None, got {self.stop_after_llm_errors}")


def default_sandbox_factory(backend: str = "local", root: str | None = None) -> Callable[[Task], Sandbox]:
    """A fresh sandbox per episode ([`make_sandbox`]): an isolated private checkout of `task.repo_path` under `root`
    ("local"), the same unisolated ("host"), or a container of `task.image` ("docker")."""
    if backend not in SANDBOX_BACKENDS:
        raise ValueError(f"sandbox must be one of {', '.join(SANDBOX_BACKENDS)}; got {backend!r}")
    return functools.partial(make_sandbox, backend, root=root)


def episode_id(task: Task, source: str, sample: int) -> str:
    return f"{task.instance_id}/{source}/{sample}"


def errors_path(pool: str | Path) -> Path:
    """The errors file of a pool: `{pool}.errors.jsonl`."""
    return Path(f"{pool}.errors.jsonl")


def claims_path(pool: str | Path) -> Path:
    """The folder of a pool's claims on episodes in flight: `{pool}.claims`."""
    return Path(f"{pool}.claims")


# -------------------------------------------------------------------------------------------------- redaction


def known_secrets(*extra: str | None) -> list[tuple[str, str]]:
    """(name, value) of the secrets to redact: the environment's `SECRET_VARIABLES` and other variables named like
    keys, plus `extra` values (the client's API key), longest value first; values under 8 characters are left out."""
    found = {
        value: name
        for name, value in os.environ.items()
        if (name in SECRET_VARIABLES or _SECRET_NAME.search(name)) and len(value) >= _MIN_SECRET_CHARS
    }
    for value in extra:
        if value and len(value) >= _MIN_SECRET_CHARS:
            found.setdefault(value, "API key")
    return sorted(((name, value) for value, name in found.items()), key=lambda item: -len(item[1]))


def redact(value: Any, secrets: Sequence[tuple[str, str]]) -> Any:
    """`value` with every secret's value replaced by `[redacted NAME]`, in strings, lists and dict values."""
    if not secrets:
        return value
    if isinstance(value, str):
        for name, secret in secrets:
            if secret in value:
                value = value.replace(secret, f"[redacted {name}]")
        return value
    if isinstance(value, list):
        return [redact(item, secrets) for item in value]
    if isinstance(value, dict):
        return {key: redact(item, secrets) for key, item in value.items()}
    return value


# ----------------------------------------------------------------------------------------- errors, claims, pool


def record_error(path: str | Path, episode: str, error: BaseException, secrets: Sequence[tuple[str, str]] = ()):
    """Append `{"episode_id", "error", "time", "pid"}` as one line to an errors file (one `write` under `flock`, so
    concurrent runners do not interleave)."""
    line = {
        "episode_id": episode,
        "error": redact(f"{type(error).__name__}: {error}", secrets),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pid": os.getpid(),
    }
    data = (json.dumps(line, ensure_ascii=False) + "\n").encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
    finally:
        os.close(fd)


class EpisodeClaims:
    """Claims on episodes, shared by every runner of one pool on one machine: a folder with one file per episode in
    flight, held under an exclusive `flock` while its episode runs and removed when it is done.

    The kernel releases a process's locks when it exits, however it exits (SIGKILL included), so a killed runner's
    episodes can be claimed again at once: no heartbeat or expiry is needed. A leftover file without a lock is free.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._held: dict[str, int] = {}

    def _path(self, episode: str) -> Path:
        return self.folder / (hashlib.sha256(episode.encode()).hexdigest()[:32] + ".lock")

    def claim(self, episode: str) -> bool:
        """Take `episode` for this runner; False if another runner (or another claim of this process) holds it."""
        path = self._path(episode)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder was removed by a runner that finished: make it again
                self.folder.mkdir(parents=True, exist_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # locked a file its holder removed in between: claim the path's current file instead
                os.close(fd)
                continue
            note = {"episode_id": episode, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(note) + "\n").encode(), 0)
            self._held[episode] = fd
            return True

    def release(self, episode: str) -> None:
        """Give `episode` back (after its trajectory is in the pool, or after it failed)."""
        fd = self._held.pop(episode)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(episode))  # while still locked: see the inode check in `claim`
        finally:
            os.close(fd)

    def close(self) -> None:
        """Release every claim still held, and remove the folder if no other runner uses it."""
        for episode in list(self._held):
            self.release(episode)
        with contextlib.suppress(OSError):
            self.folder.rmdir()


class PoolIndex:
    """The `episode_id`s recorded in a pool, read incrementally: each `refresh` parses only the lines appended since
    the last one. A last line without its newline (a write in progress, or one a killed writer never finished) is
    not counted until it is complete."""

    def __init__(self, pool: str | Path):
        self.path = Path(pool)
        self.episodes: set[str] = set()
        self.unreadable = 0  # complete lines that are not JSON objects with an episode_id
        self._offset = 0

    def refresh(self) -> set[str]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return self.episodes
        if size < self._offset:  # replaced or cut by someone else: read it again
            self.episodes, self.unreadable, self._offset = set(), 0, 0
        if size == self._offset:
            return self.episodes
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read(size - self._offset)
        end = data.rfind(b"\n")
        if end < 0:
            return self.episodes
        for line in data[:end].split(b"\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                self.unreadable += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("episode_id"), str):
                self.episodes.add(record["episode_id"])
            else:
                self.unreadable += 1
        self._offset += end + 1
        return self.episodes


def _refuses_the_conversation(error: LLMError) -> bool:
    """A client error (4xx other than a timeout or a rate limit): the server refuses this request as it is."""
    return error.status is not None and 400 <= error.status < 500 and error.status not in (408, 409, 429)


def done_episodes(pool: str | Path | PoolIndex) -> set[str]:
    """The `episode_id`s already in a pool (a torn last line is counted as not done); given a [`PoolIndex`], it is
    refreshed (and keeps its place for later refreshes)."""
    index = pool if isinstance(pool, PoolIndex) else PoolIndex(pool)
    done = set(index.refresh())
    if index.unreadable:
        logger.warning(f"{index.path}: {index.unreadable} lines without an episode_id skipped")
    return done


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
            except LLMError as error:
                if step == 0 or not _refuses_the_conversation(error):
                    raise  # the endpoint, not this conversation: an error, retried on rerun
                # a definite 4xx once the conversation has grown (not a context error the client recognised): the same
                # request would be refused on every rerun, so the episode ends here, recorded
                exit_reason = "llm_request_refused"
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
                # redacted before the model sees it: neither its next turns nor the record can repeat a key
                "content": with_steps_remaining(redact(result.observation, secrets), config.max_steps - step - 1),
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
    # the oracle judged the patch as written; the record keeps no secret, wherever the model put it
    trajectory.messages = redact(trajectory.messages, secrets)
    trajectory.patch = redact(trajectory.patch, secrets)
    trajectory.metadata = redact(trajectory.metadata, secrets)
    return trajectory


# ------------------------------------------------------------------------------------------------------- the run


@dataclass
class RolloutSummary:
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
    factory = sandbox_factory or default_sandbox_factory(config.sandbox, config.sandbox_root)
    source = config.source or client.model
    secrets = known_secrets(client.api_key)
    index = PoolIndex(pool)
    done = done_episodes(index)
    todo = deque((task, k) for task in tasks for k in range(config.n) if episode_id(task, source, k) not in done)
    total = len(tasks) * config.n
    summary = RolloutSummary(str(pool), total, total - len(todo), 0, 0, errors_file=str(errors_path(pool)))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=total - len(todo), desc="rollouts", unit="episode")
    claims = EpisodeClaims(claims_path(pool))
    executor = ThreadPoolExecutor(max_workers=config.concurrency + 4, thread_name_prefix="entropo-rollout")
    write_lock = asyncio.Lock()
    held_elsewhere: list[tuple[Task, int]] = []  # claimed by another runner when tried: tried again later
    llm_errors_in_a_row = 0

    def stopped() -> bool:
        return config.stop_after_llm_errors is not None and llm_errors_in_a_row >= config.stop_after_llm_errors

    async def run_claimed(task: Task, sample: int, episode: str) -> None:
        nonlocal llm_errors_in_a_row
        try:
            trajectory = await run_episode(task, client, config, sample, factory, executor)
        except Exception as error:  # noqa: BLE001 - one broken episode must not stop the pool; it is retried on rerun
            logger.error(f"episode {episode} errored, not recorded: {redact(str(error), secrets)}")
            llm_errors_in_a_row = llm_errors_in_a_row + 1 if isinstance(error, LLMError) else 0
            summary.errors += 1
            await _blocking(executor, record_error, errors_path(pool), episode, error, secrets)
            return
        llm_errors_in_a_row = 0
        async with write_lock:
            # finished even if the run is cancelled meanwhile: the claim is released only once the line is whole
            write = asyncio.get_running_loop().run_in_executor(executor, write_trajectories, pool, [trajectory])
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await write
                raise
        summary.ran += 1
        summary.passed += trajectory.passed
        summary.exit_reasons[trajectory.exit_reason] = summary.exit_reasons.get(trajectory.exit_reason, 0) + 1
        summary.dropped_test_edits += len(trajectory.metadata.get("dropped_test_edits") or ())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(success=f"{summary.passed / summary.ran:.0%}", refresh=False)

    async def worker() -> None:
        while todo or held_elsewhere:
            if stopped():
                return
            if not todo:  # only episodes that other runners hold are left: wait for them to finish or go away
                await asyncio.sleep(CLAIM_POLL_SECONDS)
                todo.extend(held_elsewhere)
                held_elsewhere.clear()
                continue
            task, sample = todo.popleft()
            episode = episode_id(task, source, sample)
            claimed = claims.claim(episode)
            try:
                if episode in index.refresh():  # recorded by another runner since this one read the pool
                    summary.by_others += 1
                    if bar is not None:
                        bar.update(1)
                elif not claimed:
                    held_elsewhere.append((task, sample))
                else:
                    await run_claimed(task, sample, episode)
            finally:
                if claimed:
                    claims.release(episode)

    try:
        if config.sandbox != "docker":  # what killed runs left behind (their processes are gone) goes first
            await _blocking(executor, sweep_stale_sandboxes, config.sandbox_root)
        await asyncio.gather(*(worker() for _ in range(config.concurrency)))
    finally:
        summary.not_started = len(todo) + len(held_elsewhere)
        claims.close()
        executor.shutdown(wait=False, cancel_futures=True)
        if bar is not None:
            bar.close()
    return summary

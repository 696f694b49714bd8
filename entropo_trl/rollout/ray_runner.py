"""Rollouts on a Ray cluster: one Ray task per episode, the pool written by the driver alone.

    from entropo_trl.rollout.ray_runner import ClientSpec, run_rollouts_ray

    spec = ClientSpec(["http://10.0.0.5:8000/v1", "http://10.0.0.6:8000/v1"], "Qwen/Qwen3-Coder-30B-A3B-Instruct")
    summary = run_rollouts_ray(load_tasks("tasks/"), spec, "pool.jsonl", RolloutConfig(n=16), address="auto")

Each episode is a Ray task (`cpus_per_episode` CPUs, spread over the nodes). The task builds its own [`ChatClient`]
from a small picklable [`ClientSpec`], creates its sandbox on the node that runs it (the isolated local sandbox of the
task's repository, which must exist at the same path on every node, or a container from that node's Docker daemon),
runs [`run_episode`] and returns the trajectory to the driver. The driver is the only writer of the pool and its
errors file, with the same whole-line appends and the same claims as [`run_rollouts`]: restarting it resumes (the
episodes already in the pool are skipped) and no shared filesystem is needed.

Ray reruns an episode whose worker or node died, and one that raised an infrastructure error
([`INFRASTRUCTURE_ERRORS`]: the endpoint unreachable, a sandbox or oracle that would not run), up to `max_retries`
times; an episode that returned is never run again. At most `max_in_flight` episodes are submitted at once, more as
others finish. At the start, every node removes the sandboxes that runs which are gone left behind.

Ray is an optional extra (`pip install entropo-trl[ray]`), imported only here, when a run starts. The cluster how-to
is docs/cluster.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..data.trajectory import from_entropo, write_trajectories
from .client import ChatClient, LLMError
from .endpoints import parse_endpoints
from .oracle import OracleError
from .pool import EpisodeClaims, PoolIndex, claims_path, episode_id, errors_path, record_error
from .redaction import known_secrets, redact
from .runner import (
    CLAIM_POLL_SECONDS,
    RolloutConfig,
    RolloutSummary,
    default_sandbox_factory,
    episodes_left,
    progress_bar,
    run_episode,
)
from .sandbox import Sandbox, SandboxError, sweep_stale_containers, sweep_stale_pods, sweep_stale_sandboxes
from .tasks import Task

logger = logging.getLogger(__name__)

RAY_MISSING = "Ray is not installed: `pip install entropo-trl[ray]` (or `pip install 'ray>=2.9'`)"

INFRASTRUCTURE_ERRORS: tuple[type[Exception], ...] = (LLMError, SandboxError, OracleError)
"""The errors of an episode that Ray retries: they say nothing about the model's answers."""

CANCEL_GRACE_SECONDS = 30.0
"""How long a stopped run waits for its cancelled episodes to close their sandboxes."""

WAIT_SECONDS = 1.0
"""How long the driver waits for an episode at a time (signals such as Ctrl-C are handled in between)."""


def import_ray():
    """The `ray` module; an ImportError that names the extra to install when it is missing."""
    try:
        import ray
    except ImportError as error:
        raise ImportError(RAY_MISSING) from error
    return ray


@dataclass(frozen=True)
class ClientSpec:
    """What a worker needs to build its own [`ChatClient`]: the endpoints (a list, or one string with URLs separated
    by commas), the model and the client's options. `api_key=None`: each worker's own `OPENAI_API_KEY`."""

    base_urls: tuple[str, ...] | list[str] | str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 600.0
    max_retries: int = 5
    backoff: float = 1.0
    max_context_tokens: int = 65_536
    endpoint_backoff: float = 30.0
    endpoint_max_backoff: float = 600.0

    def __post_init__(self):
        object.__setattr__(self, "base_urls", tuple(parse_endpoints(self.base_urls)))

    def client(self, run: str | None = None) -> ChatClient:
        """A client of these endpoints (one request at a time: a worker runs one episode). Clients of one `run` in one
        worker process share the endpoints' health (Ray reuses workers): an endpoint found down stays out of rotation
        for the run's next episodes too, instead of costing each of them its retries."""
        options = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("base_urls", "model")}
        client = ChatClient(list(self.base_urls), self.model, **options)
        if run is not None:
            client.endpoints = _ENDPOINT_HEALTH.setdefault((run, self), client.endpoints)
        return client


_ENDPOINT_HEALTH: dict[tuple[str, ClientSpec], Any] = {}
"""Per worker process: the [`EndpointPool`] of each run's spec, shared by the episodes of the run it runs."""


class EpisodeRefused(Exception):
    """The endpoint refused an episode's request for good (a 4xx other than 429, e.g. an unknown model or a bad key):
    recorded as an error without a retry, which would only be refused again."""


def episode_task(
    task: Task,
    sample: int,
    spec: ClientSpec,
    config: RolloutConfig,
    sandbox_factory: Callable[[Task], Sandbox] | None,
    run: str | None = None,
) -> dict[str, Any]:
    """One episode, in a Ray worker: its client (sharing the endpoints' health with the `run`'s other episodes in
    this worker), its sandbox on this node, [`run_episode`]; the trajectory as a dict. Raises what `run_episode`
    raises (the driver records it), a refused request as [`EpisodeRefused`] (not retried)."""
    factory = sandbox_factory or default_sandbox_factory(config.sandbox, config.sandbox_root, config.sandbox_lifetime)

    async def episode():
        async with spec.client(run) as client:
            return await run_episode(task, client, config, sample, factory)

    try:
        return asyncio.run(episode()).to_dict()
    except LLMError as error:
        if error.status is not None and 400 <= error.status < 500 and error.status != 429:
            raise EpisodeRefused(str(error)) from error
        raise


# -------------------------------------------------------------------------------------------- sweeping the nodes


def sweep_node(backend: str, root: str | None) -> list[str]:
    """What runs that are gone left on this node: their sandbox folders under `root`, or their containers."""
    return sweep_stale_containers() if backend == "docker" else sweep_stale_sandboxes(root)


def sweep_nodes(ray, config: RolloutConfig) -> int:
    """Run [`sweep_node`] once on every alive node of the cluster; how many sandboxes were removed. Pods belong to no
    node: with `k8s` the driver sweeps them once."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if config.sandbox == "k8s":
        try:
            return len(sweep_stale_pods())
        except SandboxError as error:  # the driver may have no cluster configuration of its own: the workers do
            logger.warning(f"stale pods not swept from the driver: {error}")
            return 0
    sweep = ray.remote(num_cpus=0)(sweep_node)
    refs = [
        sweep.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(
            config.sandbox, config.sandbox_root
        )
        for node in ray.nodes()
        if node["Alive"]
    ]
    return sum(len(removed) for removed in ray.get(refs))


# ------------------------------------------------------------------------------------------------------ the driver


def _cause(error: BaseException) -> BaseException:
    """The episode's own exception inside Ray's wrapper (`RayTaskError.cause`), else `error` itself."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


class _RayRun:
    """One call of [`run_rollouts_ray`] on the driver: the episodes left, those in flight (Ray object refs), the
    claims, the pool and its errors file, and the summary and progress bar that count them."""

    def __init__(self, ray, tasks, spec, pool, config, remote, max_in_flight, progress):
        self.ray, self.spec, self.pool, self.config = ray, spec, pool, config
        self.remote, self.max_in_flight = remote, max_in_flight
        self.source = config.source or spec.model
        self.secrets = known_secrets(spec.api_key, os.environ.get("OPENAI_API_KEY"))
        self.index = PoolIndex(pool)
        self.todo = episodes_left(tasks, config, self.source, self.index)
        total = len(tasks) * config.n
        self.summary = RolloutSummary(
            str(pool), total, total - len(self.todo), 0, 0, errors_file=str(errors_path(pool))
        )
        self.bar = progress_bar(total, self.summary.skipped) if progress else None
        self.claims = EpisodeClaims(claims_path(pool))
        self.in_flight: dict[Any, str] = {}  # object ref -> episode id
        self.held_elsewhere: list[tuple[Task, int]] = []  # claimed by another runner when tried: tried again later
        self.llm_errors_in_a_row = 0
        self.run_token = uuid.uuid4().hex  # the episodes of this run share the endpoints' health in each worker

    def stopped(self) -> bool:
        """Whether `stop_after_llm_errors` episodes in a row could not reach the model: submit no more."""
        limit = self.config.stop_after_llm_errors
        return limit is not None and self.llm_errors_in_a_row >= limit

    def run(self, sandbox_factory) -> None:
        """Submit episodes up to `max_in_flight` and record each as it returns, until none is left."""
        while self.in_flight or ((self.todo or self.held_elsewhere) and not self.stopped()):
            while self.todo and len(self.in_flight) < self.max_in_flight and not self.stopped():
                self.submit(*self.todo.popleft(), sandbox_factory)
            if self.in_flight:
                self.collect()
            elif self.held_elsewhere and not self.todo:  # only episodes another runner holds: wait for them
                time.sleep(CLAIM_POLL_SECONDS)
                self.todo.extend(self.held_elsewhere)
                self.held_elsewhere.clear()

    def submit(self, task: Task, sample: int, sandbox_factory) -> None:
        """Claim an episode and submit it as a Ray task, unless another runner recorded it (counted as theirs) or
        holds it (tried again later)."""
        episode = episode_id(task, self.source, sample)
        if not self.claims.claim(episode):
            self.held_elsewhere.append((task, sample))
            return
        if episode in self.index.refresh():
            self.claims.release(episode)
            self.summary.by_others += 1
            if self.bar is not None:
                self.bar.update(1)
            return
        ref = self.remote.options(name=episode).remote(
            task, sample, self.spec, self.config, sandbox_factory, self.run_token
        )
        self.in_flight[ref] = episode

    def collect(self) -> None:
        """Record the episodes that returned meanwhile: each trajectory in the pool, each failure in the errors file."""
        ready, _ = self.ray.wait(list(self.in_flight), num_returns=1, timeout=WAIT_SECONDS)
        for ref in ready:
            episode = self.in_flight.pop(ref)
            try:
                record = self.ray.get(ref)
            except Exception as error:  # noqa: BLE001 - one broken episode must not stop the pool; rerun runs it
                self.record_failure(episode, _cause(error))
            else:
                trajectory = from_entropo(record)
                write_trajectories(self.pool, [trajectory])
                self.llm_errors_in_a_row = 0
                self.summary.add(trajectory, self.bar)
            finally:
                self.claims.release(episode)

    def record_failure(self, episode: str, error: BaseException) -> None:
        """Log an episode that could not be recorded (after Ray's retries), count it, write it to the errors file."""
        logger.error(f"episode {episode} errored, not recorded: {redact(str(error), self.secrets)}")
        reached_no_model = isinstance(error, (LLMError, EpisodeRefused))
        self.llm_errors_in_a_row = self.llm_errors_in_a_row + 1 if reached_no_model else 0
        self.summary.errors += 1
        record_error(errors_path(self.pool), episode, error, self.secrets)

    def close(self) -> None:
        """Cancel the episodes still in flight and give them time to close their sandboxes (the workers go when the
        driver disconnects), count what was not started, give the claims back and close the bar."""
        for ref in self.in_flight:
            self.ray.cancel(ref)
        if self.in_flight:
            self.ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=CANCEL_GRACE_SECONDS)
        self.summary.not_started = len(self.todo) + len(self.held_elsewhere)
        self.claims.close()
        if self.bar is not None:
            self.bar.close()


def connect(ray, address: str | None) -> bool:
    """Connect this process to Ray: `None` keeps a connection it already has (else starts a local instance),
    "local" starts a local instance, "auto" joins the cluster this node belongs to, anything else is the address of
    a cluster. True when this call connected (and the caller should disconnect)."""
    if ray.is_initialized():
        return False
    if address in (None, "local"):
        ray.init()
    else:
        ray.init(address=address)
    return True


def run_rollouts_ray(
    tasks: Sequence[Task],
    client_spec: ClientSpec,
    pool: str | Path,
    config: RolloutConfig | None = None,
    *,
    address: str | None = None,
    cpus_per_episode: float = 1.0,
    max_retries: int = 2,
    max_in_flight: int | None = None,
    sandbox_factory: Callable[[Task], Sandbox] | None = None,
    progress: bool = True,
) -> RolloutSummary:
    """Run `config.n` episodes per task on a Ray cluster (skipping those already in `pool`) and append each
    trajectory to `pool` as it returns.

    `address`: see [`connect`]. Each episode is a task with `num_cpus=cpus_per_episode` (a fraction is fine: an
    episode mostly waits for the model), spread over the nodes, rerun up to `max_retries` times after an
    infrastructure error or the loss of its worker. `max_in_flight` episodes at most are submitted at once (default:
    twice as many as the cluster's CPUs hold). `sandbox_factory` (picklable; default: `config.sandbox` on each node)
    makes the sandboxes in the workers. `config.concurrency` does not apply: Ray's resources bound the episodes."""
    config = config or RolloutConfig()
    if not cpus_per_episode > 0 or max_retries < 0 or (max_in_flight is not None and max_in_flight < 1):
        raise ValueError("cpus_per_episode must be > 0, max_retries >= 0 and max_in_flight >= 1")
    ray = import_ray()
    connected = connect(ray, address)
    try:
        if max_in_flight is None:
            max_in_flight = max(1, int(2 * ray.cluster_resources().get("CPU", 1) / cpus_per_episode))
        removed = sweep_nodes(ray, config)
        if removed:
            logger.info(f"removed {removed} sandboxes that earlier runs left on the cluster's nodes")
        remote = ray.remote(
            num_cpus=cpus_per_episode,
            max_retries=max_retries,
            retry_exceptions=list(INFRASTRUCTURE_ERRORS),
            scheduling_strategy="SPREAD",
        )(episode_task)
        run = _RayRun(ray, tasks, client_spec, pool, config, remote, max_in_flight, progress)
        try:
            run.run(sandbox_factory)
        finally:
            run.close()
        return run.summary
    finally:
        if connected:
            ray.shutdown()

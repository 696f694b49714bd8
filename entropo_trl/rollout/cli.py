"""`entropo-rollout`: N rollouts per task into an append-only, resumable trajectory pool.

    entropo-rollout --tasks tasks/ --pool pool.jsonl --base_url http://127.0.0.1:8000/v1 \\
        --model Qwen/Qwen3-Coder-30B-A3B-Instruct --n 16 --concurrency 32
    entropo-rollout --tasks swebench_verified.jsonl --sandbox docker --serve_vllm Qwen/Qwen3-Coder-30B-A3B-Instruct \\
        --tensor_parallel_size 4 --pool pool.jsonl
    entropo-rollout --tasks toy_tasks/ --serve_transformers ./tiny-model --pool pool.jsonl --max_steps 10
    entropo-rollout --ray auto --tasks swebench_verified.jsonl --sandbox docker --base_url URL1,URL2 --model M --n 16

Rerunning the same command resumes: episodes already in the pool are skipped. Several commands may run on one pool
at once (on one machine): they share the episodes, and each is recorded once. `--ray auto|ADDRESS|local` runs each
episode as a Ray task on a cluster (the `[ray]` extra; docs/cluster.md), this process alone writing the pool.

Episodes that fail outside the model's answers (the endpoint unreachable, HTTP errors after retries, a response that
is not a chat completion, a sandbox or oracle that will not run) are not recorded: each is one line in
`POOL.errors.jsonl`, and a rerun runs it again.

Exit status: 0 when every episode asked for is in the pool; 1 when some errored or were not started (the summary
says how many); 2 for bad options; 130 after Ctrl-C and 143 after SIGTERM (episodes in flight are dropped, their
sandboxes removed).

`--preset pool` (the default) uses the authors' limits for preference pools: 100 steps, a 65,536-token context;
`--preset eval` the paper's test-time limits: 200 steps, 131,072 tokens. Both sample at temperature 0.7, top_p 0.8,
top_k 20 (the Qwen3 card's settings, which the paper uses). An explicit flag overrides its preset's value.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from .client import ChatClient, SamplingParams
from .runner import RolloutConfig, RolloutSummary, run_rollouts
from .sandbox import SANDBOX_BACKENDS
from .tasks import load_tasks

if TYPE_CHECKING:
    from .serve import ServerHandle

# Limits and sampling per use: preference pools (the authors' rollout settings) and test-time scaling (the paper's
# evaluation: 200 steps, 131,072 tokens).
# Both sample as the Qwen3 card says (temperature 0.7, top_p 0.8, top_k 20: the flags' defaults).
PRESETS = {
    "pool": {"max_steps": 100, "max_context_tokens": 65_536},
    "eval": {"max_steps": 200, "max_context_tokens": 131_072},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entropo rollout", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", required=True, help="a folder of local tasks or a SWE-bench-format JSON/JSONL file")
    parser.add_argument("--pool", required=True, help="the JSONL pool to append trajectories to")
    parser.add_argument(
        "--base_url",
        help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1, or several comma-separated (a,b,c): each "
        "episode stays on one (rendezvous hashing of its id, header X-Session-ID), moving only when it fails",
    )
    parser.add_argument("--model", help="model name sent to the endpoint (and recorded as the source)")
    parser.add_argument("--api_key", default=None, help="the endpoint's key (default: $OPENAI_API_KEY)")
    parser.add_argument(
        "--request_timeout", type=float, default=600.0, help="seconds to connect, and to wait for each response"
    )
    parser.add_argument(
        "--max_retries", type=int, default=5, help="retries of a request after connection errors, timeouts, 429, 5xx"
    )
    parser.add_argument("--retry_backoff", type=float, default=1.0, help="first wait between retries, doubled after")
    parser.add_argument("--serve_vllm", metavar="MODEL", help="start `vllm serve MODEL` and use it")
    parser.add_argument("--serve_transformers", metavar="PATH", help="serve a local model with transformers (CPU)")
    parser.add_argument("--tensor_parallel_size", type=int, default=1)
    parser.add_argument("--data_parallel_size", type=int, default=1)
    parser.add_argument("--source", help="source recorded in the trajectories (default: the model name)")
    parser.add_argument("--n", type=int, default=1, help="rollouts per task")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="pool",
        help="limits and sampling: 'pool' (100 steps, 65,536 tokens; preference data) or 'eval' (200 steps, 131,072 "
        "tokens; test-time scaling, as in the paper); flags below override it",
    )
    parser.add_argument("--max_steps", type=int, help="assistant turns per episode (pool 100, eval 200)")
    parser.add_argument("--max_context_tokens", type=int, help="context window (pool 65,536, eval 131,072)")
    parser.add_argument("--max_tokens", type=int, default=16_384, help="tokens per completion")
    parser.add_argument("--tool_timeout", type=float, default=90.0)
    parser.add_argument("--max_episode_seconds", type=float, default=50_000.0)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=20)
    parser.add_argument("--repetition_penalty", type=float, default=1.05)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--sandbox",
        choices=SANDBOX_BACKENDS,
        default="local",
        help="local: an isolated bubblewrap sandbox (default); docker: a container per episode; k8s: a Kubernetes pod "
        "per episode; host: commands run on this machine without isolation (trusted models only)",
    )
    parser.add_argument(
        "--sandbox_root",
        help="folder for the local sandboxes' private checkouts (default: the temporary directory; a tmpfs such as "
        "/dev/shm is faster if memory allows one checkout per episode in flight, plus up to 8 prepared ones)",
    )
    parser.add_argument("--no_oracle", action="store_true", help="do not run the tests (reward stays 0)")
    parser.add_argument("--limit", type=int, help="only the first N tasks")
    parser.add_argument(
        "--stop_after_llm_errors",
        type=int,
        default=16,
        help="start no new episode after this many in a row could not reach the model (0: never stop)",
    )
    _add_ray_flags(parser)
    return parser


def _add_ray_flags(parser: argparse.ArgumentParser) -> None:
    ray = parser.add_argument_group("Ray (episodes as tasks on a cluster; pip install entropo-trl[ray])")
    ray.add_argument(
        "--ray",
        metavar="auto|ADDRESS|local",
        help="run each episode as a Ray task: 'auto' joins the cluster of this node, 'local' starts Ray on this "
        "machine, anything else is a cluster's address; the sandboxes are made on the nodes that run the episodes",
    )
    ray.add_argument(
        "--cpus_per_episode", type=float, default=1.0, help="Ray CPUs each episode holds (a fraction is fine)"
    )
    ray.add_argument(
        "--ray_max_retries",
        type=int,
        default=2,
        help="reruns of an episode whose worker died or that met an infrastructure error (never of a finished one)",
    )
    ray.add_argument(
        "--max_in_flight", type=int, help="episodes submitted at once (default: twice the cluster's CPUs' worth)"
    )


SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens", "seed")
"""The flags that set the `SamplingParams` field of the same name."""
ROLLOUT_FLAGS = (
    "n",
    "concurrency",
    "max_steps",
    "tool_timeout",
    "max_episode_seconds",
    "source",
    "sandbox",
    "sandbox_root",
)
"""The flags that set the `RolloutConfig` field of the same name."""


def _flag_values(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names}


def _config(args: argparse.Namespace) -> RolloutConfig:
    return RolloutConfig(
        **_flag_values(args, ROLLOUT_FLAGS),
        max_tokens_per_call=args.max_tokens,
        sampling=SamplingParams(**_flag_values(args, SAMPLING_FLAGS)),
        oracle=not args.no_oracle,
        stop_after_llm_errors=args.stop_after_llm_errors or None,
    )


class Terminated(Exception):
    """SIGTERM arrived: unwind like Ctrl-C, so that servers are stopped and sandboxes removed."""


def _on_sigterm(signum, frame):
    raise Terminated


async def _run(args, config: RolloutConfig, base_url: str, model: str) -> RolloutSummary:
    # inside the event loop, SIGTERM cancels the run (as asyncio does for Ctrl-C): each episode in flight closes its
    # sandbox and gives its claim back
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    try:
        tasks = load_tasks(args.tasks)[: args.limit]
        async with ChatClient(
            base_url,
            model,
            api_key=args.api_key,
            timeout=args.request_timeout,
            max_retries=args.max_retries,
            backoff=args.retry_backoff,
            max_context_tokens=args.max_context_tokens,
            max_concurrency=args.concurrency,
        ) as client:
            return await run_rollouts(tasks, client, args.pool, config)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)


def _parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The options, with the preset's limits where no flag set them."""
    args = parser.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def _check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> RolloutConfig:
    """The rollout config; options that do not fit together exit with status 2, before any server starts."""
    sources = sum(x is not None for x in (args.base_url, args.serve_vllm, args.serve_transformers))
    if sources != 1:
        parser.error("give exactly one of --base_url, --serve_vllm MODEL, --serve_transformers PATH")
    if args.base_url and not args.model:
        parser.error("--model is required with --base_url")
    if not args.serve_vllm and (args.tensor_parallel_size != 1 or args.data_parallel_size != 1):
        parser.error("--tensor_parallel_size / --data_parallel_size apply to --serve_vllm only")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    for name in ("stop_after_llm_errors", "max_retries", "retry_backoff"):
        if not getattr(args, name) >= 0 or getattr(args, name) == float("inf"):  # nan and inf fail too
            parser.error(f"--{name} must be a finite number >= 0, got {getattr(args, name)}")
    if args.max_context_tokens < 1:  # vLLM would be given max_model_len=0
        parser.error(f"--max_context_tokens must be >= 1, got {args.max_context_tokens}")
    if not args.request_timeout > 0:
        parser.error(f"--request_timeout must be > 0 seconds, got {args.request_timeout}")
    try:
        return _config(args)
    except ValueError as error:  # limits and options that do not fit together
        parser.error(str(error))


def _check_sandbox(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with status 2 when the sandbox cannot run here (before any server starts); warn about `--sandbox host`.
    With a Ray cluster, sandboxes are made on the worker nodes: the driver needs neither bubblewrap nor a cluster
    configuration of its own."""
    from .sandbox import SandboxError, require_bwrap, require_kubernetes

    requirement = {"local": require_bwrap, "k8s": require_kubernetes}.get(args.sandbox)
    if args.ray not in (None, "local"):
        requirement = None
    try:
        if requirement is not None:
            requirement()
    except SandboxError as error:
        parser.error(str(error))
    if args.sandbox == "host":
        print(
            "entropo-rollout: warning: --sandbox host is not isolated: the model's commands run on this machine with "
            "your rights, and see its files, network, processes and environment; use it for trusted models only",
            file=sys.stderr,
        )


def _check_ray(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with status 2 when the Ray flags do not fit (before any server starts), or Ray is missing."""
    if args.ray is None:
        ray_flags = {"cpus_per_episode": 1.0, "ray_max_retries": 2, "max_in_flight": None}
        given = [f"--{name}" for name, default in ray_flags.items() if getattr(args, name) != default]
        if given:
            parser.error(f"{', '.join(given)} apply to --ray only")
        return
    if not args.cpus_per_episode > 0 or args.ray_max_retries < 0:
        parser.error("--cpus_per_episode must be > 0 and --ray_max_retries >= 0")
    if args.max_in_flight is not None and args.max_in_flight < 1:
        parser.error(f"--max_in_flight must be >= 1, got {args.max_in_flight}")
    if args.concurrency != parser.get_default("concurrency"):
        parser.error("--concurrency bounds one machine's episodes: with --ray, Ray's CPUs and --max_in_flight do")
    if args.ray != "local" and (args.serve_vllm or args.serve_transformers):
        parser.error("--serve_vllm / --serve_transformers listen on this machine only: use them with --ray local")
    from .ray_runner import import_ray

    try:
        import_ray()
    except ImportError as error:
        parser.error(str(error))


def _run_ray(args: argparse.Namespace, config: RolloutConfig, base_url: str, model: str) -> RolloutSummary:
    """The run as Ray tasks on the cluster `--ray` names; this process writes the pool."""
    from .ray_runner import ClientSpec, run_rollouts_ray

    spec = ClientSpec(
        base_url,
        model,
        # the workers of other nodes do not have this machine's environment
        api_key=args.api_key if args.api_key is not None else os.environ.get("OPENAI_API_KEY"),
        timeout=args.request_timeout,
        max_retries=args.max_retries,
        backoff=args.retry_backoff,
        max_context_tokens=args.max_context_tokens,
    )
    return run_rollouts_ray(
        load_tasks(args.tasks)[: args.limit],
        spec,
        args.pool,
        config,
        address=args.ray,
        cpus_per_episode=args.cpus_per_episode,
        max_retries=args.ray_max_retries,
        max_in_flight=args.max_in_flight,
    )


def _start_server(args: argparse.Namespace) -> tuple[ServerHandle | None, str, str]:
    """Start the server that `--serve_vllm` or `--serve_transformers` asks for, if any: the server (`None` with
    `--base_url`), the endpoint and the model name to ask it for."""
    if args.serve_vllm:
        from .serve import VLLMServerArgs, start_vllm_server

        server = start_vllm_server(
            VLLMServerArgs(
                args.serve_vllm,
                tensor_parallel_size=args.tensor_parallel_size,
                data_parallel_size=args.data_parallel_size,
                max_model_len=args.max_context_tokens,
                served_model_name=args.model,  # the name the client asks for
            )
        )
        return server, server.base_url, args.model or args.serve_vllm
    if args.serve_transformers:
        from .serve import serve_transformers

        server = serve_transformers(args.serve_transformers)
        return server, server.base_url, args.model or args.serve_transformers
    return None, args.base_url, args.model


def _report(args: argparse.Namespace, summary: RolloutSummary) -> int:
    """Print the summary; the exit status: 1 when some episodes errored or were not started, else 0."""
    print(summary)
    print(f"pool: {args.pool}")
    if summary.errors or summary.not_started:
        missing = f"{summary.errors} episodes errored" + (
            f" and {summary.not_started} were not started" if summary.not_started else ""
        )
        print(
            f"entropo-rollout: {missing}; nothing was recorded for them (errors: {summary.errors_file}). Rerun the "
            "same command to run them again.",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse_args(parser, argv)
    config = _check_options(parser, args)
    _check_sandbox(parser, args)
    _check_ray(parser, args)
    server = None
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        server, base_url, model = _start_server(args)
        if args.ray:
            summary = _run_ray(args, config, base_url, model)
        else:
            summary = asyncio.run(_run(args, config, base_url, model))
    except (Terminated, asyncio.CancelledError):
        print("entropo-rollout: terminated (SIGTERM); rerun the same command to resume", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("entropo-rollout: interrupted; rerun the same command to resume", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if server is not None:
            server.stop()
        signal.signal(signal.SIGTERM, previous)
    return _report(args, summary)


if __name__ == "__main__":
    sys.exit(main())

"""`entropo experiment`: one point of the paper's α sweep (Figure 3, right), end to end, in one resumable command.

    entropo experiment --config recipes/experiments/qwen3-coder-30b-alpha.yaml --alpha 0.11
    entropo experiment --config my-experiment.yaml --alpha=0.105 --beta=0.1     # what a W&B sweep agent runs

Stages, each under the run's folder (`output_dir`, default `experiments/{method}-b{β}-a{α}[-t{T}]`), each skipped by a
rerun once it finished ([`entropo_trl.stages`]), so a killed experiment resumes where it stopped:

1. train EntroPO-KTO (or -DPO) at α and β from the SFT model, in its own process(es) (`accelerate launch` with
   `accelerate_config`), resuming from its last checkpoint;
2. merge the adapter into the SFT model;
3. serve the merged model (vLLM on GPUs, the transformers server on a CPU) and run `N × runs` rollouts per held-out
   task in the sandbox, labelled by the test oracle (the runner's own resume skips recorded episodes);
4. score every trajectory with the verifier, when one is given (an endpoint, or a local model folder);
5. hybrid selection and the paper's figures ([`entropo_trl.evaluation.resolve`]): resolve rate at N = 1 and at N
   (mean ± std over runs), pass@k, the best-of-N curve and the diversity of the pool.

The figures go to `eval.json` in the run folder and, with `report_to: wandb`, to the same W&B run as the training:
`eval/resolve_rate@1`, `eval/resolve_rate@N`, `eval/pass@k`, `eval/distinct_patches`, the best-of-N curve as a table
and a plot, and α, β, the model, the data, N and the selector in the run's config. The run id is kept in the run folder
(or taken from the sweep agent), so the evaluation of a resumed experiment lands in the run that trained.
`entropo report --sweep DIR` draws the α-sweep figure from the run folders under DIR.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shlex
import signal
import socket
import string
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from .stages import Stage, pin_options, run_stages

PREFIX = "experiment"
# the settings that decide an experiment's results: a rerun in the same folder must keep them (where it runs, on which
# port or GPUs, and where it logs may change)
# training flags the experiment passes itself: in `train_flags` they would silently override its own settings
OWNED_FLAGS = {
    "--model", "--model_name_or_path", "--dataset_name", "--output_dir", "--config", "--alpha", "--beta",
    "--report_to", "--run_name",
}  # fmt: skip
PINNED = (
    "model", "dataset_name", "tasks", "method", "alpha", "beta", "train_config", "train_flags", "n", "runs",
    "temperature", "max_steps", "max_context_tokens", "max_tokens", "sandbox", "verifier", "verifier_model", "selector",
)  # fmt: skip


@dataclass
class ExperimentArguments:
    """One α experiment. Every field can be set in the `--config` YAML or as a flag (`--alpha 0.11` or
    `--alpha=0.11`)."""

    model: str = field(default=None, metadata={"help": "The SFT model (merged): policy start and reference."})
    dataset_name: str = field(default=None, metadata={"help": "Training rows: KTO rows (ekto) or DPO pairs (edpo)."})
    tasks: str = field(default=None, metadata={"help": "Held-out tasks: a SWE-bench JSON/JSONL file or a folder."})
    method: str = field(default="ekto", metadata={"help": "ekto (EntroPO-KTO) or edpo (EntroPO-DPO)."})
    alpha: float = field(default=0.11, metadata={"help": "α, absolute (α = β: plain multi-turn KTO / DPO)."})
    beta: float = field(default=0.1, metadata={"help": "β, the KL coefficient."})
    train_config: str | None = field(
        default=None,
        metadata={
            "help": "Training recipe YAML: a file, or a shipped recipe such as 'qwen3-4b-instruct-2507/ekto.yaml'."
        },
    )
    train_flags: str = field(default="", metadata={"help": "More training flags, e.g. '--max_steps 10'."})
    accelerate_config: str | None = field(
        default=None,
        metadata={
            "help": "Train under `accelerate launch --config_file FILE` (e.g. zero3.yaml); default: one process."
        },
    )
    n: int = field(default=16, metadata={"help": "N: rollouts per task in each run (the selector picks among N)."})
    runs: int = field(default=1, metadata={"help": "Runs of N rollouts per task: resolve rates are mean ± std."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the rollouts."})
    max_steps: int = field(default=200, metadata={"help": "Assistant turns per episode (the paper's test time: 200)."})
    max_context_tokens: int = field(default=131_072, metadata={"help": "Context limit of the rollouts."})
    max_tokens: int = field(default=16_384, metadata={"help": "Tokens per model call."})
    concurrency: int = field(default=32, metadata={"help": "Episodes in flight."})
    sandbox: str = field(default="local", metadata={"help": "local (isolated), docker or host."})
    server: str = field(default="vllm", metadata={"help": "vllm (GPUs) or transformers (CPU, tiny models)."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM: GPUs per model copy."})
    port: int = field(default=8000, metadata={"help": "vLLM: the port to serve on."})
    verifier: str | None = field(default=None, metadata={"help": "A local verifier (model or adapter folder)."})
    verifier_url: str | None = field(default=None, metadata={"help": "An endpoint serving the verifier."})
    verifier_model: str | None = field(default=None, metadata={"help": "The verifier's name at --verifier_url."})
    selector: str = field(default="paper-verified", metadata={"help": "Hybrid selector preset."})
    output_dir: str | None = field(default=None, metadata={"help": "The run folder (default under experiments/)."})
    report_to: str = field(default="wandb", metadata={"help": "wandb or none."})
    wandb_project: str = field(default="entropo-alpha-sweep", metadata={"help": "W&B project (WANDB_PROJECT wins)."})

    def __post_init__(self):
        for name in ("model", "dataset_name", "tasks"):
            if not getattr(self, name):
                raise SystemExit(f"entropo experiment: --{name} is required (as a flag or in the --config YAML)")
        checks = {
            "method": self.method in ("ekto", "edpo"),
            "server": self.server in ("vllm", "transformers"),
            "report_to": self.report_to in ("wandb", "none"),
            "n": self.n >= 1,
            "runs": self.runs >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise SystemExit(f"entropo experiment: bad --{name} {getattr(self, name)!r}")
        if bool(self.verifier_url) != bool(self.verifier_model):
            raise SystemExit("entropo experiment: give --verifier_url and --verifier_model together")
        if self.verifier and self.verifier_url:
            raise SystemExit("entropo experiment: give one verifier, --verifier (a folder) or --verifier_url")
        owned = sorted({f.split("=")[0] for f in shlex.split(self.train_flags) if f.split("=")[0] in OWNED_FLAGS})
        if owned:
            raise SystemExit(
                f"entropo experiment: --train_flags sets {', '.join(owned)}, which the experiment sets itself (and "
                "records as the run's settings): give them as the experiment's own options"
            )
        self._check_components()
        if self.output_dir is None:
            name = f"{self.method}-b{self.beta:g}-a{self.alpha:g}"
            name += f"-t{self.temperature:g}" if self.temperature != 0.7 else ""
            self.output_dir = str(Path("experiments") / name)

    def _check_components(self) -> None:
        """Settings that would otherwise fail only in a late stage, after hours of training."""
        import importlib.util

        from .evaluation.selection import PRESETS
        from .rollout.sandbox import SANDBOX_BACKENDS
        from .train import recipe_config

        if self.selector not in PRESETS:
            raise SystemExit(f"entropo experiment: unknown --selector {self.selector!r} (presets: {sorted(PRESETS)})")
        if self.sandbox not in SANDBOX_BACKENDS:
            raise SystemExit(f"entropo experiment: unknown --sandbox {self.sandbox!r} ({', '.join(SANDBOX_BACKENDS)})")
        if self.train_config is None and recipe_config(self.model, self.method) is None:
            raise SystemExit(
                f"entropo experiment: no {self.method} recipe for --model {self.model} (a local SFT model has none): "
                "give --train_config, e.g. qwen3-coder-30b-a3b-instruct/ekto.yaml or your own YAML"
            )
        if self.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
            raise SystemExit("entropo experiment: report_to wandb needs wandb: pip install 'entropo-trl[wandb]'")
        if not (self.verifier or self.verifier_url) and "verifier" in PRESETS[self.selector].stages:
            print(
                f"[{PREFIX}] no verifier given: the {self.selector} selector's verifier stage keeps every candidate",
                file=sys.stderr,
            )


def parse_args(argv: list[str] | None = None) -> ExperimentArguments:
    """The experiment's arguments: dataclass defaults, then the `--config` YAML, then flags (TRL's parser)."""
    from trl import TrlParser

    from .train import config_flag_split

    argv = config_flag_split(list(sys.argv[1:] if argv is None else argv))
    (args,) = TrlParser((ExperimentArguments,)).parse_args_and_config(args=argv)
    return args


# --------------------------------------------------------------------------------------------------------------------
# W&B: one run for the training and the evaluation
# --------------------------------------------------------------------------------------------------------------------


def wandb_run_id(args: ExperimentArguments, folder: Path) -> str | None:
    """The experiment's W&B run id: the sweep agent's (`WANDB_RUN_ID`), or the one kept in the run folder (a rerun
    logs into the run that trained), or a new one. None with `report_to: none`."""
    if args.report_to != "wandb":
        return None
    id_file = folder / "wandb_run_id"
    agent_id = os.environ.get("WANDB_RUN_ID")  # a sweep agent's run: W&B ignores any other id inside a sweep
    if agent_id or not id_file.exists():
        new_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's shape
        id_file.write_text(agent_id or new_id)
    return id_file.read_text().strip()


def wandb_env(args: ExperimentArguments, folder: Path, run_id: str | None) -> dict[str, str]:
    """The environment that makes the training process log into the experiment's W&B run."""
    if run_id is None:
        return {}
    project = os.environ.get("WANDB_PROJECT", args.wandb_project)
    return {"WANDB_RUN_ID": run_id, "WANDB_RESUME": "allow", "WANDB_PROJECT": project, "WANDB_DIR": str(folder)}


def log_evaluation(args: ExperimentArguments, folder: Path, run_id: str, evaluation: dict) -> None:
    """The evaluation's figures into the training's W&B run (resumed by id): the scalars, the best-of-N curve as a
    table and a line plot, and the experiment's settings in the run's config."""
    import wandb

    env = wandb_env(args, folder, run_id)
    run = wandb.init(project=env["WANDB_PROJECT"], id=run_id, resume="allow", dir=str(folder))
    try:
        run.config.update(
            {
                "alpha": args.alpha,
                "beta": args.beta,
                "model": args.model,
                "data": args.dataset_name,
                "N": args.n,
                "runs": args.runs,
                "selector": args.selector,
                "method": args.method,
                "temperature": args.temperature,
                "tasks": args.tasks,
            },
            allow_val_change=True,
        )
        table = wandb.Table(columns=["N", "resolve_rate", "ci_low", "ci_high"], data=evaluation["curve"])
        plot = wandb.plot.line(table, "N", "resolve_rate", title="best-of-N: resolve rate of the selector's pick")
        run.log({**evaluation["metrics"], "eval/best_of_n": table, "eval/best_of_n_curve": plot})
    finally:
        run.finish()


# --------------------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------------------


def recipe_file(value: str | None, flag: str) -> str | None:
    """A YAML named by `flag`: a path, or else a file shipped in the package's recipes (`qwen3-4b-instruct-2507/
    ekto.yaml`, `accelerate/zero3.yaml`), so a config works from an installed package too."""
    if value is None or Path(value).exists():
        return value
    from .train import RECIPES_DIR

    shipped = RECIPES_DIR / value.removeprefix("recipes/")
    if not shipped.exists():
        raise SystemExit(f"--{flag} {value}: no such file, and no shipped recipe {shipped}")
    return str(shipped)


def training_command(args: ExperimentArguments, output_dir: Path) -> list[str]:
    """The training stage's command line: `entropo train METHOD` at α and β, under `accelerate launch` when asked."""
    launcher = [sys.executable]
    if args.accelerate_config:
        accelerate_config = recipe_file(args.accelerate_config, "accelerate_config")
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config]
    argv = ["--model", args.model, "--dataset_name", args.dataset_name, "--output_dir", str(output_dir)]
    config = recipe_file(args.train_config, "train_config")
    argv += ["--config", config] if config else []
    argv += ["--alpha", str(args.alpha), "--beta", str(args.beta), "--report_to", args.report_to]
    argv += ["--run_name", output_dir.resolve().parent.name, *shlex.split(args.train_flags)]
    return [*launcher, "-m", "entropo_trl", "train", args.method, *argv]


def train(args: ExperimentArguments, output_dir: Path, env: dict[str, str]) -> dict:
    """Stage 1: the EntroPO recipe at α and β from the SFT model, in its own process(es), logging into the
    experiment's W&B run (the recipe resumes from its own last checkpoint)."""
    import subprocess

    command = training_command(args, output_dir)
    print(f"[{PREFIX}] training: {shlex.join(command)}", flush=True)
    process = subprocess.Popen(command, env={**os.environ, **env}, start_new_session=True)
    try:
        returncode = process.wait()
    finally:  # stopped (SIGTERM, Ctrl-C): the trainers stop too, so a rerun never meets a second one in its folder
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    if returncode != 0:
        raise SystemExit(f"the training stage failed (exit status {returncode}): {shlex.join(command)}")
    return {"adapter": str(output_dir)}


def merge(adapter: Path, output_dir: Path) -> dict:
    """Stage 2: the adapter merged into the SFT model (fp32 on a CPU, bf16 on a GPU)."""
    import torch

    from .train import merge_adapter

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    merge_adapter(["--adapter", str(adapter), "--output_dir", str(output_dir), "--dtype", dtype])
    return {"model": str(output_dir)}


def serve(args: ExperimentArguments, model: Path):
    """The merged model behind an OpenAI-compatible endpoint: vLLM, or the transformers server."""
    if args.server == "transformers":
        from .rollout.serve import serve_transformers

        return serve_transformers(str(model), model_name="policy")
    from .rollout.serve import VLLMServerArgs, start_vllm_server

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", args.port)) == 0:
            raise SystemExit(
                f"port {args.port} is taken (a server left by a killed run?): the policy would be served by whatever "
                "answers there; stop it, or pass --port"
            )
    server_args = VLLMServerArgs(
        model=str(model),
        port=args.port,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=args.max_context_tokens,
        served_model_name="policy",
    )
    return start_vllm_server(server_args, log_file=model.parent / "vllm.log")


async def _rollouts(args: ExperimentArguments, tasks: list, pool: Path, base_url: str) -> str:
    from .rollout.client import ChatClient, SamplingParams
    from .rollout.runner import RolloutConfig, run_rollouts

    config = RolloutConfig(
        n=args.n * args.runs,
        concurrency=args.concurrency,
        max_steps=args.max_steps,
        max_tokens_per_call=args.max_tokens,
        sampling=SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens),
        sandbox=args.sandbox,
        source=f"{args.method}-a{args.alpha:g}",
    )
    async with ChatClient(base_url, "policy", max_context_tokens=args.max_context_tokens) as client:
        summary = await run_rollouts(tasks, client, pool, config)
    if summary.errors or summary.not_started:
        raise SystemExit(f"rollouts: {summary}; rerun the experiment to retry the missing episodes")
    return str(summary)


def rollouts(args: ExperimentArguments, model: Path, pool: Path) -> dict:
    """Stage 3: `N × runs` rollouts per held-out task from the served merged model, labelled by the test oracle."""
    from .rollout.tasks import load_tasks

    tasks = load_tasks(args.tasks)
    pool.parent.mkdir(parents=True, exist_ok=True)
    with serve(args, model) as server:
        summary = asyncio.run(_rollouts(args, tasks, pool, server.base_url))
    return {"tasks": len(tasks), "summary": summary}


def score(args: ExperimentArguments, pool: Path, scored: Path) -> dict:
    """Stage 4: verifier p(YES) for every trajectory, written as a scored copy of the pool."""
    from .data.readers import read_trajectories
    from .data.trajectory import write_trajectories
    from .evaluation.selection import score_with_endpoint, score_with_model

    trajectories = list(read_trajectories([str(pool)]))
    if args.verifier_url:
        from .rollout.client import ChatClient

        async def endpoint_scores():
            async with ChatClient(args.verifier_url, args.verifier_model) as client:
                return await score_with_endpoint(trajectories, client)

        scores = asyncio.run(endpoint_scores())
    else:
        scores = score_with_model(trajectories, *load_verifier(args.verifier), max_tokens=None)
    unscored = sum(score is None for score in scores)
    if unscored > len(scores) // 10:
        where = args.verifier_url or args.verifier
        raise SystemExit(
            f"the verifier ({where}) scored only {len(scores) - unscored} of {len(scores)} trajectories: is it up? "
            "(the stage reruns on the next run)"
        )
    partial_file = scored.with_name(scored.name + ".partial")
    partial_file.unlink(missing_ok=True)
    write_trajectories(partial_file, trajectories)
    os.replace(partial_file, scored)
    return {"scored": sum(s is not None for s in scores), "trajectories": len(trajectories)}


def load_verifier(path: str) -> tuple:
    """A local verifier: a merged model folder, or a LoRA adapter folder (loaded on its base model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (Path(path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def evaluate(args: ExperimentArguments, pool: Path, output: Path, run_id: str | None) -> dict:
    """Stage 5: hybrid selection and the paper's figures, written to `eval.json` and logged to the W&B run."""
    from .data.readers import read_trajectories
    from .evaluation.resolve import evaluate_pool
    from .evaluation.selection import HybridSelector, group_by_instance

    trajectories = group_by_instance(read_trajectories([str(pool)]))
    evaluation = evaluate_pool(trajectories, HybridSelector(args.selector), args.n, args.runs)
    evaluation.update(alpha=args.alpha, beta=args.beta, temperature=args.temperature, pool=str(pool.resolve()))
    output.write_text(json.dumps(evaluation, indent=2))
    if run_id is not None:
        log_evaluation(args, output.parent, run_id, evaluation)
    return evaluation["metrics"]


def experiment_stages(args: ExperimentArguments, folder: Path, run_id: str | None) -> list[Stage]:
    """The experiment's stages, in order (the verifier's only when one is given)."""
    adapter, merged, pool = folder / "train", folder / "merged", folder / "rollouts" / "pool.jsonl"
    scored = pool.with_name("scored.jsonl") if (args.verifier or args.verifier_url) else pool
    stages = [
        Stage("1/5 train", partial(train, args, adapter, wandb_env(args, folder, run_id)), marker="train.done",
              output=adapter, describe=lambda r: f"alpha={args.alpha:g}, beta={args.beta:g} -> {adapter}"),
        Stage("2/5 merge", partial(merge, adapter, merged), marker="merge.done", output=merged,
              describe=lambda r: f"-> {merged}"),
        Stage("3/5 rollouts", partial(rollouts, args, merged, pool), marker="rollouts.done", output=pool,
              describe=lambda r: f"{r['summary']} -> {pool}"),
    ]  # fmt: skip
    if scored != pool:
        stages.append(
            Stage("4/5 verifier", partial(score, args, pool, scored), marker="verifier.done", output=scored,
                  describe=lambda r: f"{r['scored']} of {r['trajectories']} scored -> {scored}")
        )  # fmt: skip
    describe = "resolve rate @1 {eval/resolve_rate@1:.3f}, @N {eval/resolve_rate@N:.3f}".format_map
    stages.append(
        Stage("5/5 evaluate", partial(evaluate, args, scored, folder / "eval.json", run_id), marker="eval.done",
              output=folder / "eval.json", describe=describe)
    )  # fmt: skip
    return stages


def run_experiment(args: ExperimentArguments) -> dict:
    """Run (or resume) one experiment; returns its `eval/...` figures."""
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    pin_options(folder, {k: getattr(args, k) for k in PINNED}, what="experiment", folder_flag="--output_dir")
    evaluated_before = (folder / "eval.done").exists()
    previous_id = (folder / "wandb_run_id").read_text().strip() if (folder / "wandb_run_id").exists() else None
    run_id = wandb_run_id(args, folder)
    *_, metrics = run_stages(experiment_stages(args, folder, run_id), folder, PREFIX)
    if evaluated_before and run_id is not None and run_id != previous_id:  # a sweep agent's run over a finished one
        log_evaluation(args, folder, run_id, json.loads((folder / "eval.json").read_text()))
    return metrics


def main(argv: list[str] | None = None) -> int:
    # a sweep agent or a scheduler stops a run with SIGTERM: unwind, so the training process and the server stop too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args(argv)
    metrics = run_experiment(args)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items() if "@" in k}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

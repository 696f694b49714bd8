"""`make demo`: the whole EntroPO pipeline on a CPU in minutes, on an embedded tiny default.

    python -m entropo_trl.demo --workdir demo_out           # what `make demo` runs
    python -m entropo_trl.demo --workdir demo_out --tasks 2 --steps 1   # smaller (the test suite runs this)

Stages ([`entropo_trl.stages`]; each prints where its output went; a rerun skips the stages already done, so an
interrupted demo resumes):

1. a tiny student: random weights, Qwen3 architecture, a byte-level BPE tokenizer built locally;
2. toy tasks: small real Python repositories, one planted bug each, with tests;
3. a rollout pool through the real runner, local sandboxes and the OpenAI-compatible client, against two servers on
   127.0.0.1: the tiny student (transformers) and a *scripted teacher* -- a stand-in for a strong teacher model that
   fixes the bug on even samples and gives up on odd ones -- so the pool holds passing and failing trajectories;
4. test-oracle labels -> SFT, KTO, DPO and verifier datasets;
5. SFT -> merge -> EntroPO-KTO and EntroPO-DPO, and the verifier, each a few steps with the real recipes;
6. verifier scores for every trajectory, hybrid selection per instance, and a report (resolve rates, best-of-N
   curve, diversity table, the selector's choice per instance) with PNG figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from functools import partial
from pathlib import Path

from .stages import Stage, pin_options, run_or_skip, run_stages

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PREFIX = "demo"  # progress lines read `[demo] STAGE: ...`


def solving_step(step: int, path: str, fix: dict) -> str:
    """The scripted solver's response at `step` for a toy task's reference `fix` in the file at `path`: view the
    file, apply the fix, run the tests, finish."""
    from .rollout.scaffold import Action

    if step == 0:
        return Action("file_editor", {"command": "view", "path": path}, "Let me read the module.").to_text()
    if step == 1:
        edit = {
            "command": "str_replace",
            "path": path,
            "old_str": fix["old"].rstrip("\n"),
            "new_str": fix["new"].rstrip("\n"),
        }
        return Action("file_editor", edit, "This line is wrong; fix it.").to_text()
    if step == 2:
        return Action("execute_bash", {"cmd": "python -m pytest -q -p no:cacheprovider"}, "Run the tests.").to_text()
    return Action("finish", {"command": "submit"}, "The tests pass.").to_text()


def scripted_teacher(tasks):
    """A stand-in for a strong teacher model: reads the bug's reference fix (which the toy tasks keep outside the
    repository), views the file, applies the fix, runs the tests and finishes -- on every other episode of an
    instance it gives up instead (finishes without a fix), so the pool has failures to learn from too."""
    from .rollout.scaffold import Action

    fixes = {t.problem_statement: t.metadata["reference_fix"] for t in tasks}
    seen: dict[str, int] = {}  # problem statement -> episodes started
    give_up_thought = "Where is it?"

    def respond(messages):
        issue = messages[1]["content"]
        workdir = re.search(r"repository in the (\S+) directory", issue).group(1)
        statement, fix = next((text, f) for text, f in fixes.items() if text in issue)
        step = sum(m["role"] == "assistant" for m in messages)
        if step == 0:  # a new episode: every other one of an instance gives up
            gives_up = seen.get(statement, 0) % 2 == 1
            seen[statement] = seen.get(statement, 0) + 1
        else:  # an episode under way (sandboxes all say /testbed): its first turn tells which kind it is
            first = next(m["content"] for m in messages if m["role"] == "assistant")
            gives_up = first.startswith(give_up_thought)
        path = f"{workdir}/{fix['path']}"
        if gives_up:
            if step == 0:
                return Action("search", {"search_term": fix["function"], "path": workdir}, give_up_thought).to_text()
            return Action("finish", {"command": "submit"}, "I could not find the cause.").to_text()
        return solving_step(step, path, fix)

    return respond


def student_dir(workdir: Path, student: str | None) -> Path:
    """Where the student's weights are: its own folder when `student` is one, else `workdir/student`."""
    return Path(student) if student and Path(student).exists() else workdir / "student"


def build_tiny_student(model_dir: Path) -> dict:
    """A tiny Qwen3 with random weights and a byte-level BPE tokenizer built locally, saved to `model_dir`."""
    from .testing import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer("qwen3")
    build_tiny_model(tokenizer, hidden_size=64, num_layers=2).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {}


def copy_hub_student(model_id: str, model_dir: Path) -> dict:
    """Download the Hub model `model_id` once, into `model_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(model_id).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(model_id).save_pretrained(model_dir)
    return {"from": model_id}


def student_stage(student: str | None, model_dir: Path) -> Stage:
    """Stage 1: the tiny student (default), a Hub model copied into the work folder, or a model folder as it is."""
    name = "1/6 student"
    if student and Path(student).exists():
        return Stage(name, lambda: {}, describe=lambda _: str(model_dir))
    marker = model_dir / ".done"
    if student:
        made = f"{student} -> {model_dir}"
        return Stage(name, partial(copy_hub_student, student, model_dir), marker, made, lambda _: made)
    made = f"tiny Qwen3 (random weights, local byte-level BPE tokenizer) -> {model_dir}"
    return Stage(name, partial(build_tiny_student, model_dir), marker, model_dir, lambda _: made)


def load_demo_tasks(workdir: Path, n_tasks: int, tasks_file: str | None) -> list:
    """The first `n_tasks` of a SWE-bench-format `tasks_file`, or else that many toy tasks under `workdir/tasks`."""
    if tasks_file:
        from .rollout.tasks import load_tasks

        return load_tasks(tasks_file)[:n_tasks]
    from .rollout.toy import make_toy_tasks

    return make_toy_tasks(workdir / "tasks", n=n_tasks)


def tasks_stage(workdir: Path, n_tasks: int, tasks_file: str | None) -> Stage:
    """Stage 2: the tasks (made again on every run: the toy tasks keep the folders they find)."""
    made = f"tasks from {tasks_file}" if tasks_file else f"toy repositories with a planted bug -> {workdir / 'tasks'}"
    return Stage(
        "2/6 tasks",
        partial(load_demo_tasks, workdir, n_tasks, tasks_file),
        describe=lambda tasks: f"{len(tasks)} {made}",
    )


async def teacher_rollouts(tasks, pool_path: Path, episodes: dict, teacher_url=None, teacher_model=None):
    """The teacher's episodes into the pool: a real teacher at `teacher_url`, or else the scripted one served on
    127.0.0.1 (at most 8 steps an episode). `episodes` holds the [`RolloutConfig`] fields both policies share."""
    from .rollout.client import ChatClient
    from .rollout.runner import RolloutConfig, run_rollouts
    from .rollout.serve import serve_scripted

    if teacher_url:
        async with ChatClient(teacher_url, teacher_model or "teacher") as client:
            return await run_rollouts(tasks, client, pool_path, RolloutConfig(concurrency=4, **episodes))
    with serve_scripted(scripted_teacher(tasks), model_name="scripted-teacher") as teacher:
        async with ChatClient(teacher.base_url, "scripted-teacher") as client:
            config = RolloutConfig(concurrency=4, max_steps=8, **episodes)
            return await run_rollouts(tasks, client, pool_path, config)


async def student_rollouts(tasks, pool_path: Path, model_dir: Path, episodes: dict):
    """The student's episodes into the pool, from the model in `model_dir` served with transformers on 127.0.0.1:
    two short turns each, sampled at temperature 1."""
    from .rollout.client import ChatClient, SamplingParams
    from .rollout.runner import RolloutConfig, run_rollouts
    from .rollout.serve import serve_transformers

    sampling = SamplingParams(max_tokens=24, temperature=1.0)
    config = RolloutConfig(concurrency=2, max_steps=2, sampling=sampling, **episodes)
    with serve_transformers(str(model_dir), model_name="tiny-student") as student:
        async with ChatClient(student.base_url, "tiny-student", max_context_tokens=1_000_000) as client:
            return await run_rollouts(tasks, client, pool_path, config)


async def rollout_pool(tasks, pool_path: Path, model_dir: Path, episodes: dict, teacher_url=None, teacher_model=None):
    """Teacher episodes, then student episodes, into `pool_path`; returns each policy's run summary."""
    teacher = await teacher_rollouts(tasks, pool_path, episodes, teacher_url, teacher_model)
    student = await student_rollouts(tasks, pool_path, model_dir, episodes)
    return {"teacher": str(teacher), "student": str(student)}


def rollouts_stage(tasks, pool_path: Path, model_dir: Path, episodes: dict, teacher_url, teacher_model) -> Stage:
    """Stage 3: the rollout pool, teacher and student."""
    return Stage(
        "3/6 rollouts",
        lambda: asyncio.run(rollout_pool(tasks, pool_path, model_dir, episodes, teacher_url, teacher_model)),
        marker=pool_path.parent / "rollouts.done",
        output=pool_path,
        describe=lambda runs: f"teacher: {runs['teacher']}; student: {runs['student']} -> {pool_path}",
    )


def build_datasets(trajectories: list, data_dir: Path) -> dict:
    """The SFT, KTO, DPO and verifier datasets from the labelled pool, one JSONL file each under `data_dir`;
    returns each one's build statistics."""
    from .data.builders import build_dpo_pairs, build_kto_rows, build_sft_rows, build_verifier_rows

    builders = {
        "sft": lambda: build_sft_rows(trajectories, require_success=True),
        "kto": lambda: build_kto_rows(trajectories),
        "dpo": lambda: build_dpo_pairs(trajectories, policy="all", max_pairs_per_instance=2),
        "verifier": lambda: build_verifier_rows(trajectories, max_tokens=None),
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, build in builders.items():
        rows = build()
        with open(data_dir / f"{name}.jsonl", "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        counts[name] = rows.stats.summary()
    return counts


def datasets_stage(trajectories: list, data_dir: Path) -> Stage:
    """Stage 4: test-oracle labels -> the training datasets."""
    return Stage(
        "4/6 datasets",
        partial(build_datasets, trajectories, data_dir),
        marker=data_dir / ".done",
        output=data_dir,
        describe=lambda counts: "; ".join(f"{k}: {v}" for k, v in counts.items()) + f" -> {data_dir}",
    )


def train_args(train_steps: int) -> list[str]:
    """The demo's training flags, shared by every stage: `train_steps` steps of LoRA in fp32, no checkpoints."""
    return [
        "--max_steps", str(train_steps),
        "--per_device_train_batch_size", "2",
        "--bf16", "false",
        "--use_peft",
        "--lora_target_modules", "all-linear",
        "--report_to", "none",
        "--learning_rate", "0.01",
        "--activation_checkpointing", "false",
        "--save_strategy", "no",
        "--logging_steps", "1",
        "--max_length", "16384",
        "--disable_tqdm", "false",
    ]  # fmt: skip


def train_policy(method: str, model: Path, dataset: Path, output_dir: Path, args: list[str]) -> dict:
    """Train `model` on `dataset` with the real recipe of `method` (`sft`, `ekto`, `edpo`, `verifier`) and the
    extra flags `args`, saving to `output_dir`; returns the optimisation steps taken."""
    from .train import run_stage

    trainer = run_stage(
        method, ["--model", str(model), "--dataset_name", str(dataset), "--output_dir", str(output_dir), *args]
    )
    return {"steps": trainer.state.global_step}


def merge_sft(adapter: Path, output_dir: Path) -> dict:
    """Merge the LoRA `adapter` into its base model (fp32), saved to `output_dir`."""
    from .train import merge_adapter

    merge_adapter(["--adapter", str(adapter), "--output_dir", str(output_dir), "--dtype", "float32"])
    return {}


def training_stages(model_dir: Path, data_dir: Path, train_dir: Path, train_steps: int) -> dict[str, Stage]:
    """Stage 5: SFT -> merge -> EntroPO-KTO and EntroPO-DPO from the merged SFT model, and the verifier from the
    student, each in its own folder under `train_dir`; keyed by what each stage does."""
    merged = train_dir / "sft-merged"

    def fit(method: str, model: Path, data: str, *extra: str) -> Stage:
        output = train_dir / method
        args = [*train_args(train_steps), *extra]
        return Stage(
            f"5/6 train {method}",
            partial(train_policy, method, model, data_dir / f"{data}.jsonl", output, args),
            marker=train_dir / f"{method}.done",
            output=output,
            describe=lambda result: f"{result['steps']} steps -> {output}",
        )

    merge = Stage(
        "5/6 merge",
        partial(merge_sft, train_dir / "sft", merged),
        marker=train_dir / "merge.done",
        output=merged,
        describe=lambda _: f"SFT adapter merged into the student -> {merged}",
    )
    return {
        "sft": fit("sft", model_dir, "sft"),
        "merge": merge,
        "ekto": fit("ekto", merged, "kto", "--alpha", "0.11"),
        "edpo": fit("edpo", merged, "dpo", "--alpha", "0.11"),
        "verifier": fit("verifier", model_dir, "verifier"),
    }


def select_with_verifier(trajectories: list, model_dir: Path, verifier_dir: Path) -> tuple[dict, dict]:
    """Score every trajectory with the verifier (its adapter on the student in `model_dir`), then choose one per
    instance with the hybrid selector; returns the pool by instance and the chosen trajectory per instance."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluation.selection import HybridSelector, group_by_instance, score_with_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    verifier = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), str(verifier_dir)
    ).eval()
    score_with_model(trajectories, verifier, tokenizer, max_tokens=None)
    pool = group_by_instance(trajectories)
    selector = HybridSelector("paper-verified")
    return pool, {instance: selector.select(group).trajectory for instance, group in pool.items()}


def select_and_report(trajectories: list, model_dir: Path, verifier_dir: Path, report_dir: Path) -> tuple[Path, dict]:
    """Verifier scores and hybrid selection ([`select_with_verifier`]), then the report on the pool; returns the
    report's path and the chosen trajectory per instance."""
    from .evaluation.report import build_report

    pool, chosen = select_with_verifier(trajectories, model_dir, verifier_dir)
    return build_report({"demo pool": pool}, report_dir, draws=300), chosen


def report_stage(trajectories: list, model_dir: Path, verifier_dir: Path, report_dir: Path) -> Stage:
    """Stage 6: verifier scores, selection and the report (made again on every run)."""
    return Stage(
        "6/6 select + report",
        partial(select_and_report, trajectories, model_dir, verifier_dir, report_dir),
        describe=lambda result: f"verifier scores, hybrid selection, report -> {result[0]}",
    )


def run_demo(
    workdir: str | Path,
    n_tasks: int = 4,
    samples: int = 2,
    train_steps: int = 2,
    *,
    student: str | None = None,
    teacher_url: str | None = None,
    teacher_model: str | None = None,
    tasks_file: str | None = None,
    sandbox: str = "local",
) -> Path:
    """Run (or resume) every stage under `workdir`; returns the report's path. The keyword arguments swap in real
    components: a student model (Hub id or folder), a teacher served at an OpenAI-compatible URL (e.g. vLLM), a
    SWE-bench-format task file and Docker sandboxes."""
    from .data.readers import read_trajectories

    if tasks_file and not teacher_url:
        raise SystemExit(
            "--tasks_file needs a real teacher (--teacher_url): the scripted teacher only knows the fixes "
            "of the toy tasks"
        )
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # a rerun resumes the finished stages: only with the options they were made with
    options = {
        "n_tasks": n_tasks,
        "samples": samples,
        "train_steps": train_steps,
        "student": student,
        "teacher_url": teacher_url,
        "teacher_model": teacher_model,
        "tasks_file": tasks_file,
        "sandbox": sandbox,
    }
    pin_options(workdir, options, what="demo run")
    started = time.perf_counter()

    model_dir = student_dir(workdir, student)
    run_or_skip(student_stage(student, model_dir), workdir, PREFIX)
    tasks = run_or_skip(tasks_stage(workdir, n_tasks, tasks_file), workdir, PREFIX)
    pool_path = workdir / "pool.jsonl"
    # local sandboxes live in the demo's folder: what an interrupted run leaves behind is removed with it
    episodes = {
        "n": samples,
        "sandbox": sandbox,
        "sandbox_root": str(workdir / "sandboxes") if sandbox == "local" else None,
    }
    run_or_skip(rollouts_stage(tasks, pool_path, model_dir, episodes, teacher_url, teacher_model), workdir, PREFIX)
    trajectories = list(read_trajectories(pool_path))
    data_dir, train_dir = workdir / "data", workdir / "train"
    run_or_skip(datasets_stage(trajectories, data_dir), workdir, PREFIX)
    training = training_stages(model_dir, data_dir, train_dir, train_steps)
    trained = dict(zip(training, run_stages(list(training.values()), workdir, PREFIX)))
    report, chosen = run_or_skip(
        report_stage(trajectories, model_dir, train_dir / "verifier", workdir / "report"), workdir, PREFIX
    )
    summary = {
        "pool": {
            "trajectories": len(trajectories),
            "passing": sum(t.passed for t in trajectories),
            "failing": sum(not t.passed for t in trajectories),
        },
        "training_steps": {method: result.get("steps") for method, result in trained.items() if method != "merge"},
        "selection": {
            i: {"chosen": t.episode_id, "reward": t.reward, "verifier_prob": round(t.verifier_prob, 4)}
            for i, t in chosen.items()
        },
    }
    finish(workdir, summary, chosen, report, time.perf_counter() - started)
    return report


def finish(workdir: Path, summary: dict, chosen: dict, report: Path, seconds: float) -> None:
    """Write `summary.json` and print what the demo made."""
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    resolved = sum(t.passed for t in chosen.values())
    print(
        f"\n[demo] finished in {seconds:.0f} s\n"
        f"  pool: {summary['pool']['trajectories']} trajectories ({summary['pool']['passing']} passing, "
        f"{summary['pool']['failing']} failing)\n"
        f"  training steps: {summary['training_steps']}\n"
        f"  selected: {resolved}/{len(chosen)} instances resolved\n"
        f"  report: {report}\n  summary: {workdir / 'summary.json'}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="entropo demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="demo_out")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2, help="rollouts per task and per policy")
    parser.add_argument("--steps", type=int, default=2, help="optimisation steps per training stage")
    parser.add_argument("--student", help="a real student model: Hub id or folder (default: the tiny random one)")
    parser.add_argument("--teacher_url", help="a real teacher: OpenAI-compatible URL, e.g. a vLLM server's /v1")
    parser.add_argument("--teacher_model", help="the teacher's model name at --teacher_url")
    parser.add_argument("--tasks_file", help="SWE-bench-format instances (JSON / JSONL) instead of the toy tasks")
    parser.add_argument(
        "--sandbox",
        choices=["local", "docker"],
        default="local",
        help="docker: one container per episode from each instance's image",
    )
    args = parser.parse_args(argv)
    run_demo(
        args.workdir,
        args.tasks,
        args.samples,
        args.steps,
        student=args.student,
        teacher_url=args.teacher_url,
        teacher_model=args.teacher_model,
        tasks_file=args.tasks_file,
        sandbox=args.sandbox,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

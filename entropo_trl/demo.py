"""`make demo`: the whole EntroPO pipeline on a CPU in minutes, on an embedded tiny default.

    python -m entropo_trl.demo --workdir demo_out           # what `make demo` runs
    python -m entropo_trl.demo --workdir demo_out --tasks 2 --steps 1   # smaller (the test suite runs this)

Stages (each prints where its output went; a rerun skips the stages already done, so an interrupted demo resumes):

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
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _say(stage: str, message: str) -> None:
    print(f"[demo] {stage}: {message}", flush=True)


def _done(marker: Path) -> bool:
    return marker.exists()


def _mark(marker: Path, info: dict | None = None) -> None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(info or {}, indent=2))


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
    from .testing import build_tiny_model, build_tiny_tokenizer

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
    recorded = workdir / "options.json"
    if recorded.exists() and json.loads(recorded.read_text()) != options:
        raise SystemExit(
            f"{workdir} holds a demo run made with other options ({recorded}: {recorded.read_text().strip()}); "
            "use another --workdir, or delete this one to start again"
        )
    recorded.write_text(json.dumps(options))
    started = time.perf_counter()
    summary: dict = {}

    # 1. the student
    model_dir = Path(student) if student and Path(student).exists() else workdir / "student"
    if student and not Path(student).exists():  # a Hub id: download it once into the work folder
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not _done(model_dir / ".done"):
            AutoModelForCausalLM.from_pretrained(student).save_pretrained(model_dir)
            AutoTokenizer.from_pretrained(student).save_pretrained(model_dir)
            _mark(model_dir / ".done", {"from": student})
        _say("1/6 student", f"{student} -> {model_dir}")
    elif student:
        _say("1/6 student", f"{model_dir}")
    elif _done(model_dir / ".done"):
        _say("1/6 student", f"done before, {model_dir}")
    else:
        tokenizer = build_tiny_tokenizer("qwen3")
        build_tiny_model(tokenizer, hidden_size=64, num_layers=2).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        _mark(model_dir / ".done")
        _say("1/6 student", f"tiny Qwen3 (random weights, local byte-level BPE tokenizer) -> {model_dir}")

    # 2. tasks
    from .rollout.toy import make_toy_tasks

    if tasks_file:
        from .rollout.tasks import load_tasks

        tasks = load_tasks(tasks_file)[:n_tasks]
        _say("2/6 tasks", f"{len(tasks)} tasks from {tasks_file}")
    else:
        tasks = make_toy_tasks(workdir / "tasks", n=n_tasks)
        _say("2/6 tasks", f"{len(tasks)} toy repositories with a planted bug -> {workdir / 'tasks'}")

    # 3. rollouts
    from .data.trajectory import read_trajectories
    from .rollout.client import ChatClient, SamplingParams
    from .rollout.runner import RolloutConfig, run_rollouts
    from .rollout.serve import serve_scripted, serve_transformers

    pool_path = workdir / "pool.jsonl"
    # local sandboxes live in the demo's folder: what an interrupted run leaves behind is removed with it
    sandbox_root = str(workdir / "sandboxes") if sandbox == "local" else None
    if _done(workdir / "rollouts.done"):
        _say("3/6 rollouts", f"done before, {pool_path}")
    else:

        async def rollouts():
            results = {}
            if teacher_url:
                async with ChatClient(teacher_url, teacher_model or "teacher") as client:
                    results["teacher"] = await run_rollouts(
                        tasks,
                        client,
                        pool_path,
                        RolloutConfig(n=samples, concurrency=4, sandbox=sandbox, sandbox_root=sandbox_root),
                    )
            else:
                with serve_scripted(scripted_teacher(tasks), model_name="scripted-teacher") as teacher:
                    async with ChatClient(teacher.base_url, "scripted-teacher") as client:
                        results["teacher"] = await run_rollouts(
                            tasks,
                            client,
                            pool_path,
                            RolloutConfig(
                                n=samples, concurrency=4, max_steps=8, sandbox=sandbox, sandbox_root=sandbox_root
                            ),
                        )
            with serve_transformers(str(model_dir), model_name="tiny-student") as student:
                async with ChatClient(student.base_url, "tiny-student", max_context_tokens=1_000_000) as client:
                    sampling = SamplingParams(max_tokens=24, temperature=1.0)
                    results["student"] = await run_rollouts(
                        tasks,
                        client,
                        pool_path,
                        RolloutConfig(
                            n=samples,
                            concurrency=2,
                            max_steps=2,
                            sampling=sampling,
                            sandbox=sandbox,
                            sandbox_root=sandbox_root,
                        ),
                    )
            return results

        results = asyncio.run(rollouts())
        _mark(workdir / "rollouts.done", {k: str(v) for k, v in results.items()})
        _say("3/6 rollouts", f"teacher: {results['teacher']}; student: {results['student']} -> {pool_path}")
    trajectories = list(read_trajectories(pool_path))
    summary["pool"] = {
        "trajectories": len(trajectories),
        "passing": sum(t.passed for t in trajectories),
        "failing": sum(not t.passed for t in trajectories),
    }

    # 4. datasets
    from .data.builders import build_dpo_pairs, build_kto_rows, build_sft_rows, build_verifier_rows

    data_dir = workdir / "data"
    builders = {
        "sft": lambda: build_sft_rows(trajectories, require_success=True),
        "kto": lambda: build_kto_rows(trajectories),
        "dpo": lambda: build_dpo_pairs(trajectories, policy="all", max_pairs_per_instance=2),
        "verifier": lambda: build_verifier_rows(trajectories, max_tokens=None),
    }
    if _done(data_dir / ".done"):
        _say("4/6 datasets", f"done before, {data_dir}")
    else:
        data_dir.mkdir(parents=True, exist_ok=True)
        counts = {}
        for name, build in builders.items():
            rows = build()
            with open(data_dir / f"{name}.jsonl", "w") as handle:
                for row in rows:
                    handle.write(json.dumps(row) + "\n")
            counts[name] = rows.stats.summary()
        _mark(data_dir / ".done", counts)
        _say("4/6 datasets", "; ".join(f"{k}: {v}" for k, v in counts.items()) + f" -> {data_dir}")

    # 5. training with the real recipes
    from .train import merge_adapter, run_stage

    train_dir = workdir / "train"
    common = [
        "--max_steps",
        str(train_steps),
        "--per_device_train_batch_size",
        "2",
        "--bf16",
        "false",
        "--use_peft",
        "--lora_target_modules",
        "all-linear",
        "--report_to",
        "none",
        "--learning_rate",
        "0.01",
        "--activation_checkpointing",
        "false",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        "--max_length",
        "16384",
        "--disable_tqdm",
        "false",
    ]
    steps = {}
    for stage, model, data, extra in (
        ("sft", model_dir, "sft", []),
        ("merge", None, None, []),
        ("ekto", train_dir / "sft-merged", "kto", ["--alpha", "0.11"]),
        ("edpo", train_dir / "sft-merged", "dpo", ["--alpha", "0.11"]),
        ("verifier", model_dir, "verifier", []),
    ):
        marker = train_dir / f"{stage}.done"
        if _done(marker):
            _say(f"5/6 train {stage}", f"done before, {train_dir / stage}")
            if stage != "merge":
                steps[stage] = json.loads(marker.read_text()).get("steps")
            continue
        if stage == "merge":
            merge_adapter(
                [
                    "--adapter",
                    str(train_dir / "sft"),
                    "--output_dir",
                    str(train_dir / "sft-merged"),
                    "--dtype",
                    "float32",
                ]
            )
            _mark(marker)
            _say("5/6 merge", f"SFT adapter merged into the student -> {train_dir / 'sft-merged'}")
            continue
        trainer = run_stage(
            stage,
            [
                "--model",
                str(model),
                "--dataset_name",
                str(data_dir / f"{data}.jsonl"),
                "--output_dir",
                str(train_dir / stage),
                *common,
                *extra,
            ],
        )
        steps[stage] = trainer.state.global_step
        _mark(marker, {"steps": trainer.state.global_step})
        _say(f"5/6 train {stage}", f"{trainer.state.global_step} steps -> {train_dir / stage}")
    summary["training_steps"] = steps

    # 6. verifier scores, selection, report
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluation.selection import HybridSelector, group_by_instance, score_with_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    verifier = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), str(train_dir / "verifier")
    ).eval()
    score_with_model(trajectories, verifier, tokenizer, max_tokens=None)
    pool = group_by_instance(trajectories)
    selector = HybridSelector("paper-verified")
    chosen = {instance: selector.select(group).trajectory for instance, group in pool.items()}
    summary["selection"] = {
        i: {"chosen": t.episode_id, "reward": t.reward, "verifier_prob": round(t.verifier_prob, 4)}
        for i, t in chosen.items()
    }
    from .evaluation.report import build_report

    report = build_report({"demo pool": pool}, workdir / "report", draws=300)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    _say("6/6 select + report", f"verifier scores, hybrid selection, report -> {report}")
    resolved = sum(t.passed for t in chosen.values())
    print(
        f"\n[demo] finished in {time.perf_counter() - started:.0f} s\n"
        f"  pool: {summary['pool']['trajectories']} trajectories ({summary['pool']['passing']} passing, "
        f"{summary['pool']['failing']} failing)\n"
        f"  training steps: {steps}\n"
        f"  selected: {resolved}/{len(chosen)} instances resolved\n"
        f"  report: {report}\n  summary: {workdir / 'summary.json'}"
    )
    return report


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

"""The evaluation commands: `entropo select` (hybrid best-of-N selection of a pool) and `entropo swebench` (SWE-bench
predictions and the official harness). `entropo report` lives in `report.py`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections import Counter
from pathlib import Path

from ..data.cli import same_file
from ..data.readers import read_trajectories
from ..data.trajectory import write_trajectories
from .harness import DEFAULT_DATASET, DockerUnavailableError, run_harness
from .selection import (
    PRESETS,
    REGRESSION_RULES,
    TIE_BREAKS,
    HybridSelector,
    SelectorConfig,
    group_by_instance,
    labelled_instances,
    score_with_endpoint,
)
from .swebench import write_predictions

SELECT_HELP = """Pick one trajectory per instance from a rollout pool with the hybrid selector (optionally scoring with a verifier
first) and write the choices as a pool of their own.

    entropo select --pool pool.jsonl --preset paper-verified --output selected.jsonl
    entropo select --pool pool.jsonl --config selector.yaml --verifier_url http://127.0.0.1:8001/v1 \\
        --verifier_model me/qwen3-coder-30b-verifier --output selected.jsonl
    entropo select --pool pool.jsonl --stages finished,regression,steps --steps fewest --output selected.jsonl

Prints the resolve rate of the choices when the pool carries rewards, how often each stage fell back, and for how many
instances the paper's regression-free rule had no fail counts to go by (it then keeps the most passing tests).
Instances without rewards (a SWE-smith file, a rollout without a test oracle) are reported as unlabelled, never as
resolved.
"""

SWEBENCH_HELP = """Write SWE-bench predictions from chosen trajectories and, with `--run`, grade them with the official harness.

    entropo swebench --selection SELECTED.jsonl --predictions preds.jsonl --model_name my-model
    entropo swebench --pool POOL.jsonl --selector paper-verified --predictions preds.jsonl \\
        --run --run_id my-run --max_workers 8

`--selection` holds one chosen trajectory per instance (a second one for an instance is an error); `--pool` holds N
candidates per instance and the hybrid selector (`--selector`, a preset of `entropo_trl.evaluation.selection`) picks one.
The patches' edits to test infrastructure (test files, `conftest.py`, pytest / tox configuration) are left out of the
predictions, as the rollout oracle drops them, and counted; `--keep_test_edits` keeps them.
The harness needs a Docker daemon: without one the predictions are still written, the command to run elsewhere is
printed, and the exit status is 2.
"""


def refuse_overwriting(flag: str, output: str, inputs: list[str]) -> None:
    """Stop before writing `output` when it is one of the `inputs`: a pool would be replaced by what was read from
    it."""
    for path in inputs:
        if same_file(output, path):
            raise SystemExit(f"{flag} {output} is the input file {path}: writing would replace what is being read")


def select_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entropo select", description=SELECT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pool", nargs="+", required=True, help="trajectory pool file(s)")
    parser.add_argument("--output", required=True, help="JSONL of the chosen trajectories (one per instance)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a preset selector (default paper-verified; a --config names its own)",
    )
    parser.add_argument("--config", help="a YAML of selector settings (preset, stages, verifier_threshold, steps...)")
    parser.add_argument("--stages", help="comma-separated stages in order, e.g. finished,regression,verifier,steps")
    parser.add_argument("--drop_stage", action="append", default=[], help="remove a stage (ablation); repeatable")
    parser.add_argument("--verifier_threshold", type=float)
    parser.add_argument("--steps", choices=["most", "fewest"])
    parser.add_argument("--regression_rule", choices=REGRESSION_RULES, help="free (paper) or most_passed (authors)")
    parser.add_argument("--tie_break", choices=TIE_BREAKS, help="remaining ties: index (earliest) or verifier")
    parser.add_argument("--verifier_url", help="OpenAI-compatible endpoint serving the verifier (scores first)")
    parser.add_argument("--verifier_model", help="model name at --verifier_url")
    parser.add_argument("--verifier_concurrency", type=int, default=16)
    return parser


def selector_from_args(args) -> HybridSelector:
    if args.config:
        if args.preset:
            raise SystemExit("give --preset or --config, not both (a config file names its preset with `preset:`)")
        config = SelectorConfig.from_yaml(args.config)
    else:
        config = SelectorConfig.from_dict({"preset": args.preset or "paper-verified"})
    overrides = {
        name: getattr(args, name)
        for name in ("stages", "verifier_threshold", "steps", "regression_rule", "tie_break")
        if getattr(args, name) is not None
    }
    if overrides:
        config = SelectorConfig.from_dict({**config.__dict__, **overrides})
    for stage in args.drop_stage:
        config = config.without(stage)
    return HybridSelector(config)


async def _score(trajectories, args):
    from ..rollout.client import ChatClient

    async with ChatClient(args.verifier_url, args.verifier_model) as client:
        return await score_with_endpoint(trajectories, client, concurrency=args.verifier_concurrency)


def select_main(argv=None) -> int:
    """`entropo select`: pick one trajectory per instance and write the choices (see `SELECT_HELP`)."""
    args = select_parser().parse_args(argv)
    refuse_overwriting("--output", args.output, args.pool)
    selector = selector_from_args(args)
    trajectories = list(read_trajectories(args.pool))
    if args.verifier_url:
        if not args.verifier_model:
            raise SystemExit("--verifier_model is required with --verifier_url")
        scores = asyncio.run(_score(trajectories, args))
        print(f"verifier: scored {sum(s is not None for s in scores)} of {len(scores)} trajectories")
    pool = group_by_instance(trajectories)
    selections = {instance: selector.select(group) for instance, group in pool.items()}
    # a fresh file each run (a pool appends, and a rerun must not mix two selections)
    partial = Path(str(args.output) + ".partial")
    partial.unlink(missing_ok=True)
    write_trajectories(partial, [s.trajectory for s in selections.values()])
    os.replace(partial, args.output)
    fallbacks = Counter(stage for s in selections.values() for stage, _, fell in s.trace if fell)
    labelled = labelled_instances(pool)
    resolved = sum(selections[instance].trajectory.passed for instance in labelled)
    config = selector.config
    print(f"selector: {' -> '.join(config.stages)} (steps: {config.steps}, ties: {config.tie_break})")
    print(f"{len(selections)} instances, {len(trajectories)} trajectories")
    if labelled:
        among = f" over the {len(labelled)} labelled instances" if len(labelled) < len(selections) else ""
        print(
            f"chosen resolve rate {resolved}/{len(labelled)} = {resolved / len(labelled):.1%} (from the pool's "
            f"rewards{among})"
        )
    if len(labelled) < len(selections):
        print(
            f"unlabelled: {len(selections) - len(labelled)} of {len(selections)} instances (no reward in the pool: "
            "no resolve rate, not counted as resolved)"
        )
    print(f"stages that fell back: {dict(fallbacks) or 'none'}")
    noted = sum("regression" in s.notes for s in selections.values())
    if noted:
        print(f"regression fail counts unknown, most passes kept: {noted} of {len(selections)} instances")
    print(f"selected: {args.output}")
    return 0


def swebench_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="entropo swebench", description=SWEBENCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pool", help="trajectory pool (JSONL), N candidates per instance; --selector picks one")
    source.add_argument("--selection", help="chosen trajectories (JSONL), one per instance")
    parser.add_argument(
        "--selector", choices=sorted(PRESETS), default="paper-verified", help="selector preset for --pool"
    )
    parser.add_argument("--predictions", required=True, help="output predictions file (.jsonl)")
    parser.add_argument("--model_name", default=None, help="model_name_or_path (default: the trajectories' source)")
    parser.add_argument(
        "--keep_test_edits",
        action="store_true",
        help="keep the patches' edits to test files, conftest.py and test configuration (left out by default)",
    )
    parser.add_argument("--run", action="store_true", help="run the SWE-bench harness on the predictions")
    parser.add_argument("--dataset_name", default=DEFAULT_DATASET)
    parser.add_argument("--split", default="test")
    parser.add_argument("--run_id", default=None, help="harness run id (default: the predictions file's stem)")
    parser.add_argument("--max_workers", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=1800, help="per-instance test timeout (seconds)")
    parser.add_argument("--instance_ids", nargs="+", default=None, help="grade only these instances")
    parser.add_argument("--report_dir", default=None, help="where the harness writes its summary report")
    parser.add_argument("--docker", default="docker", help="docker CLI used to check for a daemon")
    return parser.parse_args(argv)


def choose_trajectories(args: argparse.Namespace) -> list:
    if args.selection:
        return list(read_trajectories(args.selection))
    selector = HybridSelector(args.selector)
    pool = group_by_instance(read_trajectories(args.pool))
    return [selector.select(candidates).trajectory for candidates in pool.values()]


def swebench_main(argv=None) -> int:
    """`entropo swebench`: write predictions and, with `--run`, grade them (see `SWEBENCH_HELP`)."""
    args = swebench_args(argv)
    refuse_overwriting("--predictions", args.predictions, [args.pool or args.selection])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    trajectories = choose_trajectories(args)
    model_name = args.model_name
    if model_name is None:
        sources = {t.source for t in trajectories if t.source}
        model_name = sources.pop() if len(sources) == 1 else "entropo-trl"
    summary = write_predictions(args.predictions, trajectories, model_name, keep_test_edits=args.keep_test_edits)
    print(
        f"wrote {summary.written} predictions ({summary.empty} with an empty patch) for {model_name!r} to "
        f"{args.predictions}"
    )
    if args.keep_test_edits:
        print("test-infrastructure edits kept (--keep_test_edits)")
    else:
        print(
            f"left out {summary.num_dropped} test-infrastructure edits from {len(summary.dropped_test_edits)} "
            "predictions (--keep_test_edits keeps them)"
        )
    if not args.run:
        return 0
    try:
        resolved = run_harness(
            args.predictions,
            docker=args.docker,
            dataset_name=args.dataset_name,
            split=args.split,
            run_id=args.run_id or Path(args.predictions).stem,
            max_workers=args.max_workers,
            timeout=args.timeout,
            instance_ids=args.instance_ids,
            report_dir=args.report_dir,
        )
    except DockerUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = len(resolved)
    count = sum(resolved.values())
    rate = 100.0 * count / total if total else 0.0
    print(f"resolved {count} / {total} ({rate:.1f}%)")
    return 0

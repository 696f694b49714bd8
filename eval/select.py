"""Pick one trajectory per instance from a rollout pool with the hybrid selector (optionally scoring with a verifier
first) and write the choices as a pool of their own.

    python eval/select.py --pool pool.jsonl --preset paper-verified --output selected.jsonl
    python eval/select.py --pool pool.jsonl --config selector.yaml --verifier_url http://127.0.0.1:8001/v1 \\
        --verifier_model me/qwen3-coder-30b-verifier --output selected.jsonl
    python eval/select.py --pool pool.jsonl --stages finished,regression,steps --steps fewest --output selected.jsonl

Prints the resolve rate of the choices when the pool carries rewards, how often each stage fell back, and for how many
instances the paper's regression-free rule had no fail counts to go by (it then keeps the most passing tests).
Instances without rewards (a SWE-smith file, a rollout without a test oracle) are reported as unlabelled, never as
resolved.
"""

import os
import sys
from pathlib import Path

# `python eval/select.py` puts eval/ first on sys.path, where this file would shadow the standard library's `select`
# module (used by asyncio and subprocess): take that entry out before importing anything else.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import asyncio  # noqa: E402
from collections import Counter  # noqa: E402

from entropo_trl.selection import (  # noqa: E402
    PRESETS,
    REGRESSION_RULES,
    TIE_BREAKS,
    HybridSelector,
    SelectorConfig,
    group_by_instance,
    labelled_instances,
    score_with_endpoint,
)
from entropo_trl.trajectory import read_trajectories, write_trajectories  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    from entropo_trl.rollout.client import ChatClient

    async with ChatClient(args.verifier_url, args.verifier_model) as client:
        return await score_with_endpoint(trajectories, client, concurrency=args.verifier_concurrency)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())

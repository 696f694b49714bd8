"""What the paper reports for a trained policy's rollouts: the resolve rate of one rollout (N = 1) and of the hybrid
selector's pick among N (mean ± std over runs), pass@k, the best-of-N curve and the diversity of the pool.

A pool for `runs` runs holds `N × runs` rollouts per instance, numbered by their sample index (the last part of
`{instance_id}/{source}/{sample}` episode ids): run r is samples `r·N ... r·N + N − 1`. Resolve rates count labelled
instances only (see [`labelled_instances`]).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from ..data.trajectory import Trajectory
from .metrics import best_of_n_curve, pass_at_k, pool_diversity
from .selection import HybridSelector, labelled_instances

Pool = dict[str, list[Trajectory]]


def sample_index(trajectory: Trajectory, fallback: int) -> int:
    """The rollout's sample number from its episode id (`.../{sample}`), or `fallback` for ids of another shape."""
    tail = (trajectory.episode_id or "").rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else fallback


def by_sample(pool: Pool) -> Pool:
    """Each instance's rollouts in sample order."""
    return {
        instance: [group[k] for k in sorted(range(len(group)), key=lambda k: (sample_index(group[k], k), k))]
        for instance, group in pool.items()
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def resolve_rate_at_1(pool: Pool) -> tuple[float, float]:
    """Mean ± std over sample indices of the resolve rate of that one rollout per instance (every rollout of the pool
    is a run of N = 1)."""
    pool = by_sample(pool)
    width = min(len(group) for group in pool.values())
    rates = [statistics.fmean(float(group[k].passed) for group in pool.values()) for k in range(width)]
    return mean_std(rates)


def resolve_rate_at_n(pool: Pool, selector: HybridSelector, n: int, runs: int) -> tuple[float, float]:
    """Mean ± std over `runs` runs of the resolve rate of the selector's pick among each run's `n` rollouts."""
    pool = by_sample(pool)
    rates = []
    for run in range(runs):
        picks = [selector.select(group[run * n : (run + 1) * n]).trajectory for group in pool.values()]
        rates.append(statistics.fmean(float(t.passed) for t in picks))
    return mean_std(rates)


def evaluate_pool(pool: Pool, selector: HybridSelector, n: int, runs: int = 1, draws: int = 1000) -> dict:
    """Every figure of an α experiment's evaluation, as a flat dict ready for logging (`eval/...` keys) plus the
    best-of-N curve (`curve`: rows of N, mean, ci_low, ci_high) and counts."""
    labelled = labelled_instances(pool)
    if not labelled:
        raise ValueError("the pool has no labelled instance (no trajectory carries a reward): nothing to evaluate")
    short = sorted(i for i, group in labelled.items() if len(group) < n * runs)
    if short:
        raise ValueError(
            f"{len(short)} instances have fewer than N x runs = {n * runs} rollouts (e.g. {short[0]!r}): "
            "finish the rollouts first"
        )
    at_1, at_1_std = resolve_rate_at_1(labelled)
    at_n, at_n_std = resolve_rate_at_n(labelled, selector, n, runs)
    metrics = {"eval/resolve_rate@1": at_1, "eval/resolve_rate@1_std": at_1_std, "eval/resolve_rate@N": at_n}
    if runs > 1:  # one run has no spread to report
        metrics["eval/resolve_rate@N_std"] = at_n_std
    for k in range(1, n + 1):
        metrics[f"eval/pass@{k}"] = statistics.fmean(
            pass_at_k(len(group), sum(t.passed for t in group), k) for group in labelled.values()
        )
    diversity = pool_diversity(pool)
    metrics["eval/distinct_patches"] = diversity["distinct_patch_ratio"]
    for name in ("pairwise_action_distance", "ngram_diversity"):
        metrics[f"eval/{name}"] = diversity[name]
    curve = best_of_n_curve(labelled, selector.rank, range(1, n + 1), draws=draws)
    return {
        "metrics": metrics,
        "curve": [[point.n, point.mean, point.ci_low, point.ci_high] for point in curve],
        "instances": len(pool),
        "labelled_instances": len(labelled),
        "n": n,
        "runs": runs,
    }

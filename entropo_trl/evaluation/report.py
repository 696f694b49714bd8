"""A test-time-scaling report (Markdown with PNG figures) from one or more rollout pools.

    entropo report --pool "alpha=0.10:pools/a010.jsonl" --pool "alpha=0.11:pools/a011.jsonl" \\
        --preset paper-verified --output report/

Each `--pool LABEL:PATH` is one method (or one α). The report has:
- resolve rate versus N (1..max) for every pool with the hybrid selector, and the oracle (pass@N) for the first;
- the α-sweep curve (best-of-1 and best-of-N against α) when the labels carry α values (`alpha=0.11` or `0.11`);
- the selector ablation (each stage removed in turn) on the first pool;
- the diversity of each pool (distinct patches, action-sequence distance, n-gram diversity, token entropy);
- the selector's choice per instance for the first pool.

Resolve rates count labelled instances only: an instance with a trajectory that carries no reward (a SWE-smith file, a
rollout without a test oracle) is reported as unlabelled, never as resolved, and a pool with no labelled instance has
no resolve rate at all.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from ..data.trajectory import read_trajectories
from .metrics import best_of_n_curve, oracle_rank, pool_diversity
from .selection import PRESETS, HybridSelector, group_by_instance, labelled_instances


def _alpha(label: str) -> float | None:
    match = re.fullmatch(r"(?:alpha\s*=\s*)?([0-9]*\.?[0-9]+)", label.strip())
    return float(match.group(1)) if match else None


def _resolve_rate_sections(
    pools: dict[str, dict], selector: HybridSelector, output: Path, draws: int, seed: int, plt
) -> list[str]:
    """Sections 1-3 (best-of-N, α sweep, selector ablation) and their figures; `pools` holds labelled instances
    only."""
    max_n = min(min(len(g) for g in pool.values()) for pool in pools.values())
    ns = list(range(1, max_n + 1))
    curves = {label: best_of_n_curve(pool, selector.rank, ns, draws=draws, seed=seed) for label, pool in pools.items()}
    first_label, first_pool = next(iter(pools.items()))
    oracle = best_of_n_curve(first_pool, oracle_rank, ns, draws=draws, seed=seed)
    lines = []

    # 1. resolve rate versus N
    figure, axis = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        axis.plot(ns, [c.mean for c in curve], marker="o", label=f"{label} (hybrid)")
        axis.fill_between(ns, [c.ci_low for c in curve], [c.ci_high for c in curve], alpha=0.15)
    axis.plot(ns, [c.mean for c in oracle], linestyle="--", color="gray", label=f"{first_label} (oracle, pass@N)")
    axis.set_xticks(ns)  # whole N only: the rollouts per instance the curve was measured at
    axis.set_xlabel("N (rollouts per instance)")
    axis.set_ylabel("resolve rate")
    axis.set_title("Best-of-N resolve rate")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output / "best_of_n.png", dpi=120)
    plt.close(figure)
    lines.append("## Resolve rate versus N\n\n![best-of-N](best_of_n.png)\n")
    lines.append("| pool | " + " | ".join(f"N={n}" for n in ns) + " |")
    lines.append("|---|" + "---|" * len(ns))
    for label, curve in curves.items():
        lines.append(f"| {label} | " + " | ".join(f"{c.mean:.3f}" for c in curve) + " |")
    lines.append(f"| {first_label} (oracle) | " + " | ".join(f"{c.mean:.3f}" for c in oracle) + " |\n")

    # 2. alpha sweep
    alphas = {label: _alpha(label) for label in pools}
    if len(pools) > 1 and all(a is not None for a in alphas.values()):
        ordered = sorted(pools, key=lambda label: alphas[label])
        figure, axis = plt.subplots(figsize=(6, 4))
        axis.plot([alphas[k] for k in ordered], [curves[k][0].mean for k in ordered], marker="o", label="best-of-1")
        axis.plot(
            [alphas[k] for k in ordered],
            [curves[k][-1].mean for k in ordered],
            marker="s",
            label=f"best-of-{max_n} (hybrid)",
        )
        axis.set_xticks([alphas[k] for k in ordered])  # the alphas that were trained, nothing in between
        axis.set_xlabel("alpha (beta = 0.1)")
        axis.set_ylabel("resolve rate")
        axis.set_title("alpha sweep")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(output / "alpha_sweep.png", dpi=120)
        plt.close(figure)
        lines.append("## Alpha sweep\n\n![alpha sweep](alpha_sweep.png)\n")

    # 3. selector ablation on the first pool
    variants = {"full": selector} | {
        f"without {stage}": HybridSelector(selector.config.without(stage)) for stage in selector.config.stages
    }
    ablation = {
        name: best_of_n_curve(first_pool, s.rank, [max_n], draws=draws, seed=seed)[0] for name, s in variants.items()
    }
    figure, axis = plt.subplots(figsize=(6, 4))
    names = list(ablation)
    axis.bar(
        range(len(names)),
        [ablation[n].mean for n in names],
        yerr=[
            [ablation[n].mean - ablation[n].ci_low for n in names],
            [ablation[n].ci_high - ablation[n].mean for n in names],
        ],
        capsize=4,
        color="tab:blue",
    )
    axis.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel(f"best-of-{max_n} resolve rate")
    axis.set_title(f"Selector ablation ({first_label})")
    figure.tight_layout()
    figure.savefig(output / "selector_ablation.png", dpi=120)
    plt.close(figure)
    lines.append(f"## Selector ablation ({first_label}, N={max_n})\n\n![ablation](selector_ablation.png)\n")
    lines.append("| selector | resolve rate | 95% interval |\n|---|---|---|")
    lines += [
        f"| {n} | {ablation[n].mean:.3f} | {ablation[n].ci_low:.3f} - {ablation[n].ci_high:.3f} |" for n in names
    ]
    lines.append("")
    return lines


def unlabelled_lines(pools: dict[str, dict]) -> list[str]:
    """One line per pool with unlabelled instances: `"LABEL: unlabelled: N of M instances ..."`."""
    lines = []
    for label, pool in pools.items():
        unlabelled = len(pool) - len(labelled_instances(pool))
        if unlabelled:
            lines.append(
                f"{label}: unlabelled: {unlabelled} of {len(pool)} instances (no reward in the pool: left out of "
                "every resolve rate, never counted as resolved)"
            )
    return lines


def build_report(
    pools: dict[str, dict], output: str | Path, preset: str = "paper-verified", draws: int = 1000, seed: int = 0
) -> Path:
    """Write `report.md` and its figures under `output`; `pools` maps a label to `{instance_id: [Trajectory]}`.
    Resolve rates (best-of-N, α sweep, ablation) use each pool's labelled instances; pools without any are left out
    of them, and said to be unlabelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    selector = HybridSelector(preset)
    lines = [
        f"# Test-time scaling report\n\nSelector: `{preset}` ({' -> '.join(selector.config.stages)}; ties: "
        f"{selector.config.tie_break}); best-of-N estimated from {draws} draws of N of each instance's rollouts.\n"
    ]
    if unlabelled := unlabelled_lines(pools):
        lines += [f"- {line}" for line in unlabelled] + [""]
    rated = {label: labelled for label, pool in pools.items() if (labelled := labelled_instances(pool))}
    if rated:
        lines += _resolve_rate_sections(rated, selector, output, draws, seed, plt)
    else:
        lines.append("\n## Resolve rates\n\nNone: no pool carries rewards (every instance is unlabelled).\n")

    # 4. diversity
    diversity = {label: pool_diversity(pool) for label, pool in pools.items()}
    measures = ["distinct_patch_ratio", "pairwise_action_distance", "ngram_diversity"]
    figure, axis = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(pools)
    for k, label in enumerate(pools):
        axis.bar(
            [m + k * width for m in range(len(measures))],
            [diversity[label][m] or 0.0 for m in measures],
            width=width,
            label=label,
        )
    axis.set_xticks(
        [m + width * (len(pools) - 1) / 2 for m in range(len(measures))],
        ["distinct patches", "action distance", "3-gram diversity"],
        fontsize=8,
    )
    axis.set_title("Pool diversity (mean over instances)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output / "diversity.png", dpi=120)
    plt.close(figure)
    lines.append("## Diversity\n\n![diversity](diversity.png)\n")
    lines.append("| pool | distinct patches | action-sequence distance | 3-gram diversity | mean token entropy |")
    lines.append("|---|---|---|---|---|")
    for label, values in diversity.items():
        entropy = values["mean_token_entropy"]
        lines.append(
            f"| {label} | {values['distinct_patch_ratio']:.3f} | {values['pairwise_action_distance']:.3f} | "
            f"{values['ngram_diversity']:.3f} | {'n/a' if entropy is None else f'{entropy:.3f}'} |"
        )
    lines.append("")

    # 5. choices per instance
    first_label, first_pool = next(iter(pools.items()))
    labelled = labelled_instances(first_pool)
    lines.append(f"## Selector's choice per instance ({first_label})\n")
    lines.append(
        "| instance | candidates | passing | chosen | chosen reward | stages that fell back |\n"
        "|---|---|---|---|---|---|"
    )
    for instance, group in sorted(first_pool.items())[:200]:
        selection = selector.select(group)
        chosen = selection.trajectory
        fell = [
            f"{stage} (fail counts unknown: most passes)" if stage in selection.notes else stage
            for stage, _, fell_back in selection.trace
            if fell_back
        ]
        passing, reward = (
            (sum(t.passed for t in group), f"{chosen.reward:g}") if instance in labelled else ("?", "unlabelled")
        )
        lines.append(
            f"| {instance} | {len(group)} | {passing} | {chosen.episode_id or selection.index} | {reward} | "
            f"{', '.join(fell) or '-'} |"
        )
    report = output / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="entropo report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pool", action="append", required=True, help="LABEL:PATH (repeatable)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper-verified")
    parser.add_argument("--output", required=True, help="folder for report.md and the figures")
    parser.add_argument("--draws", type=int, default=1000)
    args = parser.parse_args(argv)
    pools = {}
    for spec in args.pool:
        label, _, path = spec.rpartition(":")
        if not label or not path:
            raise SystemExit(f"--pool takes LABEL:PATH, got {spec!r}")
        if label in pools:
            raise SystemExit(f"--pool label {label!r} is given twice")
        pools[label] = group_by_instance(read_trajectories(path))
        if not pools[label]:
            raise SystemExit(f"--pool {spec}: the pool holds no trajectories")
    report = build_report(pools, args.output, args.preset, args.draws)
    for line in unlabelled_lines(pools):
        print(line)
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

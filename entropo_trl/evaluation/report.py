"""A test-time-scaling report (Markdown with PNG figures) from one or more rollout pools.

    entropo report --pool "alpha=0.10:pools/a010.jsonl" --pool "alpha=0.11:pools/a011.jsonl" \\
        --preset paper-verified --output report/

Each `--pool LABEL:PATH` is one method (or one α); `--sweep FOLDER` adds the pool of every `entropo experiment` run
under FOLDER, labelled by its α. The report has:
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
from contextlib import contextmanager
from pathlib import Path

from ..data.readers import read_trajectories
from .metrics import best_of_n_curve, oracle_rank, pool_diversity
from .selection import PRESETS, HybridSelector, group_by_instance, labelled_instances


def _alpha(label: str) -> float | None:
    match = re.fullmatch(r"(?:alpha\s*=\s*)?([0-9]*\.?[0-9]+)", label.strip())
    return float(match.group(1)) if match else None


@contextmanager
def _figure(path: Path, title: str, *, xlabel: str = "", ylabel: str = "", grid: bool = False, legend: bool = False):
    """A 6x4 inch figure's axis to draw on; on leaving, the title, axis labels, grid and legend are set and the
    figure is saved to `path` (PNG, 120 dpi) and closed."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    try:
        yield axis
        if xlabel:
            axis.set_xlabel(xlabel)
        if ylabel:
            axis.set_ylabel(ylabel)
        axis.set_title(title)
        if grid:
            axis.grid(alpha=0.3)
        if legend:
            axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    finally:
        plt.close(figure)


def _best_of_n_section(curves: dict[str, list], oracle: tuple[str, list], ns: list[int], output: Path) -> list[str]:
    """Resolve rate versus N: each pool's hybrid-selector curve and the first pool's oracle (pass@N)."""
    oracle_label, oracle_curve = oracle
    axes = {"xlabel": "N (rollouts per instance)", "ylabel": "resolve rate", "grid": True, "legend": True}
    with _figure(output / "best_of_n.png", "Best-of-N resolve rate", **axes) as axis:
        for label, curve in curves.items():
            axis.plot(ns, [c.mean for c in curve], marker="o", label=f"{label} (hybrid)")
            axis.fill_between(ns, [c.ci_low for c in curve], [c.ci_high for c in curve], alpha=0.15)
        axis.plot(
            ns, [c.mean for c in oracle_curve], linestyle="--", color="gray", label=f"{oracle_label} (oracle, pass@N)"
        )
        axis.set_xticks(ns)  # whole N only: the rollouts per instance the curve was measured at
    lines = ["## Resolve rate versus N\n\n![best-of-N](best_of_n.png)\n"]
    lines.append("| pool | " + " | ".join(f"N={n}" for n in ns) + " |")
    lines.append("|---|" + "---|" * len(ns))
    for label, curve in curves.items():
        lines.append(f"| {label} | " + " | ".join(f"{c.mean:.3f}" for c in curve) + " |")
    lines.append(f"| {oracle_label} (oracle) | " + " | ".join(f"{c.mean:.3f}" for c in oracle_curve) + " |\n")
    return lines


def _alpha_sweep_section(curves: dict[str, list], output: Path) -> list[str]:
    """Best-of-1 and best-of-N against α, when there are several pools and every label carries an α; else nothing."""
    alphas = {label: _alpha(label) for label in curves}
    if len(curves) < 2 or any(a is None for a in alphas.values()):
        return []
    ordered = sorted(curves, key=lambda label: alphas[label])
    x = [alphas[k] for k in ordered]
    max_n = len(curves[ordered[0]])
    axes = {"xlabel": "alpha (beta = 0.1)", "ylabel": "resolve rate", "grid": True, "legend": True}
    with _figure(output / "alpha_sweep.png", "alpha sweep", **axes) as axis:
        axis.plot(x, [curves[k][0].mean for k in ordered], marker="o", label="best-of-1")
        axis.plot(x, [curves[k][-1].mean for k in ordered], marker="s", label=f"best-of-{max_n} (hybrid)")
        axis.set_xticks(x)  # the alphas that were trained, nothing in between
    lines = [
        "## Alpha sweep\n\n![alpha sweep](alpha_sweep.png)\n",
        f"| α | best-of-1 | best-of-{max_n} (hybrid) |",
        "|---|---|---|",
    ]
    lines += [f"| {alphas[k]:g} | {curves[k][0].mean:.3f} | {curves[k][-1].mean:.3f} |" for k in ordered]
    return [*lines, ""]


def _ablation_section(
    label: str, pool: dict, selector: HybridSelector, n: int, output: Path, draws: int, seed: int
) -> list[str]:
    """Best-of-`n` on one pool with the full selector and with each of its stages removed in turn."""
    variants = {"full": selector} | {
        f"without {stage}": HybridSelector(selector.config.without(stage)) for stage in selector.config.stages
    }
    ablation = {name: best_of_n_curve(pool, s.rank, [n], draws=draws, seed=seed)[0] for name, s in variants.items()}
    names = list(ablation)
    with _figure(
        output / "selector_ablation.png", f"Selector ablation ({label})", ylabel=f"best-of-{n} resolve rate"
    ) as axis:
        axis.bar(
            range(len(names)),
            [ablation[name].mean for name in names],
            yerr=[
                [ablation[name].mean - ablation[name].ci_low for name in names],
                [ablation[name].ci_high - ablation[name].mean for name in names],
            ],
            capsize=4,
            color="tab:blue",
        )
        axis.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    lines = [f"## Selector ablation ({label}, N={n})\n\n![ablation](selector_ablation.png)\n"]
    lines.append("| selector | resolve rate | 95% interval |\n|---|---|---|")
    for name in names:
        lines.append(
            f"| {name} | {ablation[name].mean:.3f} | {ablation[name].ci_low:.3f} - {ablation[name].ci_high:.3f} |"
        )
    lines.append("")
    return lines


def _resolve_rate_sections(
    pools: dict[str, dict], selector: HybridSelector, output: Path, draws: int, seed: int
) -> list[str]:
    """The resolve-rate sections (versus N, α sweep, selector ablation on the first pool) and their figures; `pools`
    holds labelled instances only. N runs up to the fewest rollouts any instance has."""
    max_n = min(min(len(g) for g in pool.values()) for pool in pools.values())
    ns = list(range(1, max_n + 1))
    curves = {label: best_of_n_curve(pool, selector.rank, ns, draws=draws, seed=seed) for label, pool in pools.items()}
    first_label, first_pool = next(iter(pools.items()))
    oracle = best_of_n_curve(first_pool, oracle_rank, ns, draws=draws, seed=seed)
    return [
        *_best_of_n_section(curves, (first_label, oracle), ns, output),
        *_alpha_sweep_section(curves, output),
        *_ablation_section(first_label, first_pool, selector, max_n, output, draws, seed),
    ]


def _diversity_section(pools: dict[str, dict], output: Path) -> list[str]:
    """Each pool's diversity (mean over instances): a grouped bar chart and a table with the token entropy too."""
    diversity = {label: pool_diversity(pool) for label, pool in pools.items()}
    measures = ["distinct_patch_ratio", "pairwise_action_distance", "ngram_diversity"]
    width = 0.8 / len(pools)
    with _figure(output / "diversity.png", "Pool diversity (mean over instances)", legend=True) as axis:
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
    lines = ["## Diversity\n\n![diversity](diversity.png)\n"]
    lines.append("| pool | distinct patches | action-sequence distance | 3-gram diversity | mean token entropy |")
    lines.append("|---|---|---|---|---|")
    for label, values in diversity.items():
        entropy = values["mean_token_entropy"]
        lines.append(
            f"| {label} | {values['distinct_patch_ratio']:.3f} | {values['pairwise_action_distance']:.3f} | "
            f"{values['ngram_diversity']:.3f} | {'n/a' if entropy is None else f'{entropy:.3f}'} |"
        )
    lines.append("")
    return lines


def _choices_section(label: str, pool: dict, selector: HybridSelector) -> list[str]:
    """The selector's choice for each of the pool's first 200 instances, and the stages that fell back."""
    labelled = labelled_instances(pool)
    lines = [f"## Selector's choice per instance ({label})\n"]
    lines.append(
        "| instance | candidates | passing | chosen | chosen reward | stages that fell back |\n"
        "|---|---|---|---|---|---|"
    )
    for instance, group in sorted(pool.items())[:200]:
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
        lines += _resolve_rate_sections(rated, selector, output, draws, seed)
    else:
        lines.append("\n## Resolve rates\n\nNone: no pool carries rewards (every instance is unlabelled).\n")
    lines += _diversity_section(pools, output)
    first_label, first_pool = next(iter(pools.items()))
    lines += _choices_section(first_label, first_pool, selector)
    report = output / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def sweep_pools(folder: str | Path) -> list[str]:
    """`LABEL:PATH` of each experiment run under `folder` (the folders holding an `eval.json`): labelled `alpha=A`,
    or `alpha=A T=T` when the runs differ in temperature too."""
    import json

    runs = [json.loads(path.read_text()) for path in sorted(Path(folder).glob("*/eval.json"))]
    if not runs:
        raise SystemExit(f"--sweep {folder}: no experiment run (a folder with eval.json) under it")
    temperatures = {run.get("temperature") for run in runs}
    label = "alpha={alpha:g}" if len(temperatures) == 1 else "alpha={alpha:g} T={temperature:g}"
    if len(temperatures) > 1:
        print(
            f"--sweep {folder}: the runs differ in temperature ({sorted(temperatures)}), so they are labelled by α and "
            "T and the report draws no α-sweep figure; give a folder per temperature for one",
            file=sys.stderr,
        )
    return [f"{label.format_map(run)}:{run['pool']}" for run in runs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="entropo report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pool", action="append", default=[], help="LABEL:PATH (repeatable)")
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        help="a folder of `entropo experiment` runs (each with eval.json): their pools, labelled by α (repeatable)",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper-verified")
    parser.add_argument("--output", required=True, help="folder for report.md and the figures")
    parser.add_argument("--draws", type=int, default=1000)
    args = parser.parse_args(argv)
    if not args.pool and not args.sweep:
        parser.error("give at least one --pool LABEL:PATH or --sweep FOLDER")
    pools = {}
    for spec in [*args.pool, *(spec for folder in args.sweep for spec in sweep_pools(folder))]:
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

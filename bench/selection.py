"""Benchmark: selection and metrics over a large synthetic pool.

    python bench/selection.py

A pool of 500 instances x 16 trajectories (random rewards, finished flags, regression pass and fail counts out of 10
PASS_TO_PASS tests, verifier scores and steps). Timed: (1) hybrid selection of every instance plus pass@1, pass@k for
k = 1..16 and the diversity measures (target < 2 s); (2) best-of-N curves for N = 1..16 with 1,000 draws each, for the
hybrid selector and the oracle (target < 10 s). Also printed: the resolve rate of every preset's choices.
"""

import json
import random
import time

from entropo_trl.metrics import best_of_n_curve, oracle_rank, pass_at_k, pool_diversity
from entropo_trl.selection import PRESETS, HybridSelector, select_pool
from entropo_trl.trajectory import Trajectory


def synthetic_pool(instances=500, per_instance=16, seed=0):
    rng = random.Random(seed)
    pool = {}
    for i in range(instances):
        difficulty = rng.random()
        group = []
        for k in range(per_instance):
            steps = rng.randint(5, 60)
            messages = [{"role": "system", "content": "agent"}, {"role": "user", "content": f"issue {i}"}]
            for s in range(steps):
                messages.append(
                    {
                        "role": "assistant",
                        "content": f"thought {s} <function=execute_bash>\n"
                        f"<parameter=cmd>cmd {rng.randint(0, 9)}</parameter>\n</function>",
                    }
                )
                messages.append({"role": "user", "content": "ok"})
            passed = rng.random() > difficulty
            # a resolved patch passes every PASS_TO_PASS test; an unresolved one breaks some of them, or none
            failures = 0 if passed or rng.random() < 0.5 else rng.randint(1, 4)
            group.append(
                Trajectory(
                    instance_id=f"inst-{i}",
                    messages=messages,
                    reward=float(passed),
                    finished=rng.random() < 0.85,
                    num_steps=steps,
                    patch=f"diff {i} {k % 5}",
                    regression_pass_count=10 - failures,
                    regression_fail_count=failures,
                    verifier_prob=min(1.0, max(0.0, rng.gauss(0.7 if passed else 0.3, 0.2))),
                    episode_id=f"{i}/{k}",
                )
            )
        pool[f"inst-{i}"] = group
    return pool


def main():
    pool = synthetic_pool()
    selector = HybridSelector("paper-verified")

    start = time.perf_counter()
    selections = select_pool(pool, selector)
    resolved = sum(s.trajectory.passed for s in selections.values()) / len(selections)
    counts = [(len(g), sum(t.passed for t in g)) for g in pool.values()]
    pass1 = sum(c / n for n, c in counts) / len(counts)
    pass_k = {k: sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in range(1, 17)}
    diversity = pool_diversity(pool)
    selection_s = time.perf_counter() - start

    start = time.perf_counter()
    hybrid = best_of_n_curve(pool, selector.rank, range(1, 17), draws=1000)
    oracle = best_of_n_curve(pool, oracle_rank, range(1, 17), draws=1000)
    curves_s = time.perf_counter() - start
    presets = {
        name: sum(s.trajectory.passed for s in select_pool(pool, HybridSelector(name)).values()) / len(pool)
        for name in PRESETS
    }

    print(
        json.dumps(
            {
                "instances": len(pool),
                "trajectories_per_instance": 16,
                "selection_and_metrics_s": round(selection_s, 3),
                "best_of_n_curves_two_selectors_s": round(curves_s, 3),
                "hybrid_resolve_rate": round(resolved, 4),
                "pass@1": round(pass1, 4),
                "pass@16": round(pass_k[16], 4),
                "best_of_16_hybrid": round(hybrid[-1].mean, 4),
                "best_of_16_oracle": round(oracle[-1].mean, 4),
                "resolve_rate_by_preset": {name: round(rate, 4) for name, rate in presets.items()},
                "diversity": {k: (round(v, 4) if v is not None else None) for k, v in diversity.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

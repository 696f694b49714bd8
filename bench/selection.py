"""Benchmark: selection and metrics over a large synthetic pool.

    python bench/selection.py

A pool of 500 instances x 16 trajectories (random rewards, finished flags, regression pass and fail counts out of 10
PASS_TO_PASS tests, verifier scores and steps). Timed: (1) hybrid selection of every instance plus pass@1, pass@k for
k = 1..16 and the diversity measures (target < 2 s); (2) best-of-N curves for N = 1..16 with 1,000 draws each, for the
hybrid selector and the oracle (target < 10 s). Also printed: the resolve rate of every preset's choices.
"""

import json
import time

from entropo_trl.evaluation.metrics import best_of_n_curve, oracle_rank, pass_at_k, pool_diversity
from entropo_trl.evaluation.selection import PRESETS, HybridSelector, select_pool
from entropo_trl.testing import synthetic_pool


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

"""Evaluation metrics for agent rollout pools: pass@k, best-of-N selection curves and pool diversity.

A *pool* is `dict[str, list[Trajectory]]`, an instance id mapped to its M rollouts. A selector is represented by a
*ranker*, `rank(trajectories) -> sequence of distinct ints` (higher is preferred): selecting from any subset of an
instance's rollouts takes the subset member with the highest rank. Every selector of this library (oracle, verifier,
hybrid lexicographic key) can be written this way, so one ranking of the full list serves every subset.

- [`pass_at_k`]: the unbiased pass@k estimator of Chen et al. (2021).
- [`pass_at_1_runs`]: mean and spread of pass@1 over independent runs.
- [`best_of_n`], [`best_of_n_curve`]: the expected reward of selecting one of N rollouts drawn without replacement,
  estimated by Monte Carlo (vectorised with numpy) with a percentile confidence interval.
- [`pool_diversity`] and its parts: distinct patches, action-sequence distances, distinct-n of the assistant turns
  and recorded token entropies.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from ..actions import Action, message_action
from ..data.trajectory import Trajectory

Pool = Mapping[str, Sequence[Trajectory]]
Ranker = Callable[[list[Trajectory]], Sequence[int]]

__all__ = [
    "BestOfN",
    "action_sequence",
    "best_of_n",
    "best_of_n_curve",
    "distinct_patch_ratio",
    "levenshtein",
    "mean_token_entropy",
    "ngram_diversity",
    "pairwise_action_distance",
    "pass_at_1_runs",
    "pass_at_k",
    "pool_diversity",
]

# Number of random keys generated per chunk in the best-of-N Monte Carlo (bounds memory to ~100 MB per chunk).
_CHUNK_ELEMENTS = 4_000_000


# --------------------------------------------------------------------------------------------------------------------
# pass@k
# --------------------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator `1 - C(n - c, k) / C(n, k)` (Chen et al., 2021) for `c` correct of `n` samples.

    Computed in the numerically stable product form `1 - prod(1 - k / arange(n - c + 1, n + 1))`.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"pass_at_k: {name} must be an integer, got {value!r}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if c == 0:
        return 0.0
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_1_runs(resolved_per_run: Sequence[Sequence[bool | float]]) -> tuple[float, float]:
    """The mean and the sample standard deviation (ddof=1; 0.0 for a single run) of per-run resolve rates.

    `resolved_per_run[r][i]` is whether (or how well) run `r` resolved instance `i`.
    """
    if len(resolved_per_run) == 0:
        raise ValueError("pass_at_1_runs: no runs given")
    rates = []
    for r, run in enumerate(resolved_per_run):
        if len(run) == 0:
            raise ValueError(f"pass_at_1_runs: run {r} has no instances")
        rates.append(float(np.mean(np.asarray(run, dtype=np.float64))))
    std = float(np.std(rates, ddof=1)) if len(rates) > 1 else 0.0
    return float(np.mean(rates)), std


# --------------------------------------------------------------------------------------------------------------------
# Best-of-N selection
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class BestOfN:
    """The expected reward of selecting one of `n` rollouts (drawn without replacement) per instance.

    Attributes:
        n: rollouts drawn per instance.
        mean: the mean over draws of the mean selected reward over instances.
        ci_low, ci_high: the percentile confidence interval over draws (widened to contain `mean` if needed).
        draws: the number of Monte Carlo draws.
    """

    n: int
    mean: float
    ci_low: float
    ci_high: float
    draws: int


def _rewards_by_rank(pool: Pool, rank: Ranker) -> dict[int, np.ndarray]:
    """Per rollout count M, a `(G, M)` array of each instance's rewards ordered by ascending rank (instances sorted
    by id). `rank` is called once per instance on its full list."""
    if not pool:
        raise ValueError("best_of_n: the pool is empty")
    groups: dict[int, list[np.ndarray]] = {}
    for instance_id in sorted(pool):
        trajectories = list(pool[instance_id])
        m = len(trajectories)
        if m == 0:
            raise ValueError(f"best_of_n: instance {instance_id!r} has no rollouts")
        ranks = np.asarray(list(rank(trajectories)))
        if ranks.shape != (m,):
            raise ValueError(
                f"best_of_n: the ranker returned {ranks.size} ranks for {m} rollouts of instance {instance_id!r}"
            )
        if len(np.unique(ranks)) != m:
            raise ValueError(
                f"best_of_n: the ranker returned tied ranks for instance {instance_id!r}: {ranks.tolist()}"
            )
        rewards = np.array([t.reward for t in trajectories], dtype=np.float64)
        groups.setdefault(m, []).append(rewards[np.argsort(ranks, kind="stable")])
    return {m: np.stack(rows) for m, rows in sorted(groups.items())}


def _draw_scores(
    groups: dict[int, np.ndarray], ns: Sequence[int], draws: int, seed: int
) -> np.ndarray:  # (len(ns), draws)
    """Per draw, the mean over instances of the best-of-n selected reward, for every n in `ns`.

    Each draw takes one uniformly random permutation of every instance's rollouts; best-of-n selects among its first
    n entries. (A uniformly random prefix of a random permutation is a uniformly random n-subset, so every n is
    estimated without bias; sharing the permutation across n makes the curve monotone for an oracle and cheaper.)
    Rollouts are identified by their rank position, so the selected one is the prefix's maximum (a running max)."""
    rng = np.random.default_rng(seed)
    n_index = np.asarray(ns, dtype=np.intp) - 1
    total = np.zeros((len(ns), draws), dtype=np.float64)
    num_instances = 0
    for m, rewards in groups.items():
        g = rewards.shape[0]
        num_instances += g
        chunk = max(1, _CHUNK_ELEMENTS // (g * m))
        rows = np.arange(g)[None, :, None]
        for start in range(0, draws, chunk):
            d = min(chunk, draws - start)
            positions = np.argsort(rng.random((d, g, m)), axis=-1)  # random permutations of rank positions
            best = np.maximum.accumulate(positions, axis=-1)[:, :, n_index]  # (d, g, len(ns))
            selected = rewards[rows, best]  # (d, g, len(ns))
            total[:, start : start + d] += selected.sum(axis=1).T
    return total / num_instances


def _summarise(n: int, scores: np.ndarray, confidence: float) -> BestOfN:
    # identical draws (e.g. n = M) give their common value exactly, free of summation rounding
    mean = float(scores[0]) if scores.min() == scores.max() else float(scores.mean())
    alpha = 1.0 - confidence
    low, high = (float(x) for x in np.quantile(scores, [alpha / 2, 1 - alpha / 2]))
    return BestOfN(n=int(n), mean=mean, ci_low=min(low, mean), ci_high=max(high, mean), draws=int(scores.size))


def best_of_n_curve(
    pool: Pool,
    rank: Ranker,
    ns: Iterable[int] = range(1, 17),
    draws: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> list[BestOfN]:
    """[`best_of_n`] for every n in `ns` (same draws for every n, so the results match single `best_of_n` calls with
    the same seed)."""
    ns = [int(n) for n in ns]
    if not ns:
        raise ValueError("best_of_n: no values of n given")
    if draws < 1:
        raise ValueError(f"best_of_n: draws must be >= 1, got {draws}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"best_of_n: confidence must be in (0, 1), got {confidence}")
    if min(ns) < 1:
        raise ValueError(f"best_of_n: n must be >= 1, got {min(ns)}")
    groups = _rewards_by_rank(pool, rank)
    largest = max(ns)
    if largest > min(groups):
        short = sorted(i for i, t in pool.items() if len(t) < largest)
        listed = ", ".join(repr(i) for i in short[:5]) + (f" and {len(short) - 5} more" if len(short) > 5 else "")
        raise ValueError(
            f"best_of_n: n={largest} needs at least {largest} rollouts per instance; "
            f"instance {listed} {'has' if len(short) == 1 else 'have'} fewer (smallest: {min(groups)})"
        )
    scores = _draw_scores(groups, ns, draws, seed)
    return [_summarise(n, row, confidence) for n, row in zip(ns, scores)]


def best_of_n(pool: Pool, rank: Ranker, n: int, draws: int = 1000, seed: int = 0, confidence: float = 0.95) -> BestOfN:
    """The expected reward of a selector given `n` rollouts per instance.

    For each of `draws` Monte Carlo draws and each instance, `n` of its M >= n rollouts are drawn uniformly without
    replacement and the one with the highest rank is selected; the draw's score is the mean selected reward over
    instances. Returns the mean over draws and the `confidence` percentile interval. With an oracle ranker (by reward)
    the mean estimates the mean over instances of `pass_at_k(M, c, n)`.
    """
    return best_of_n_curve(pool, rank, [n], draws=draws, seed=seed, confidence=confidence)[0]


# --------------------------------------------------------------------------------------------------------------------
# Diversity
# --------------------------------------------------------------------------------------------------------------------

_INDEX_LINE = re.compile(r"^index [0-9a-fA-F]+\.\.[0-9a-fA-F]+")


def _normalise_patch(patch: str) -> str:
    lines = [line.rstrip() for line in (patch or "").splitlines() if not _INDEX_LINE.match(line)]
    return "\n".join(lines).strip("\n")


def distinct_patch_ratio(trajectories: Sequence[Trajectory]) -> float:
    """Distinct non-empty normalised patches over the number of trajectories with a non-empty patch (0.0 if none).

    Normalisation strips trailing whitespace from every line and drops `index abc..def` lines."""
    patches = [p for p in (_normalise_patch(t.patch) for t in trajectories) if p]
    return len(set(patches)) / len(patches) if patches else 0.0


def _action_label(action: Action) -> str:
    """A turn's action for diversity: the tool, with the `command` for `file_editor` (`"file_editor:view"`)."""
    if action.name is None:
        return "none"
    command = action.parameters.get("command", "").strip() if action.name == "file_editor" else ""
    return f"{action.name}:{command}" if command else action.name


def action_sequence(trajectory: Trajectory) -> list[str]:
    """The action of each assistant turn: the tool its first call names (as [`message_action`] reads it), with the
    `command` parameter for `file_editor` (e.g. `"file_editor:view"`), or `"none"` when the turn makes no valid call.
    Structured `tool_calls` are read when the text has no call."""
    return [_action_label(message_action(m)) for m in trajectory.messages if m.get("role") == "assistant"]


try:  # optional accelerator (the `eval` extra)
    from rapidfuzz.distance.Levenshtein import distance as _rapidfuzz_levenshtein
except ImportError:  # pragma: no cover - the pure-Python fallback below
    _rapidfuzz_levenshtein = None


def levenshtein(a: Sequence[Any], b: Sequence[Any]) -> int:
    """The edit distance (insertions, deletions, substitutions) between two sequences (rapidfuzz's C++ implementation
    when installed: pairwise distances over a pool are ~100x faster)."""
    if _rapidfuzz_levenshtein is not None:
        return int(_rapidfuzz_levenshtein(a, b))
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def pairwise_action_distance(trajectories: Sequence[Trajectory]) -> float:
    """The mean over pairs of the normalised edit distance (distance / longer length) between action sequences;
    0.0 for fewer than 2 trajectories (and for a pair of empty sequences)."""
    sequences = [action_sequence(t) for t in trajectories]
    if len(sequences) < 2:
        return 0.0
    distances = [levenshtein(a, b) / max(len(a), len(b)) if (a or b) else 0.0 for a, b in combinations(sequences, 2)]
    return float(np.mean(distances))


def ngram_diversity(trajectories: Sequence[Trajectory], n: int = 3) -> float:
    """Distinct-n: distinct word n-grams over total word n-grams of all assistant turns (n-grams do not cross
    turns; words are whitespace-separated); 0.0 when there is no n-gram."""
    if n < 1:
        raise ValueError(f"ngram_diversity: n must be >= 1, got {n}")
    total = 0
    distinct: set[tuple[str, ...]] = set()
    for trajectory in trajectories:
        for message in trajectory.messages:
            if message.get("role") != "assistant":
                continue
            words = (message.get("content") or "").split()
            grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
            total += len(grams)
            distinct.update(grams)
    return len(distinct) / total if total else 0.0


def mean_token_entropy(trajectories: Sequence[Trajectory]) -> float | None:
    """The mean per-token entropy over the recorded tokens of the trajectories, or None when none is recorded.

    Reads `metadata["token_entropies"]` (one float per token) or else `metadata["mean_token_entropy"]` (a float,
    weighted by `metadata.get("completion_tokens", 1)`)."""
    weighted_sum, count = 0.0, 0.0
    for trajectory in trajectories:
        metadata = trajectory.metadata or {}
        entropies = metadata.get("token_entropies")
        if entropies is not None and len(entropies) > 0:
            weighted_sum += float(np.sum(np.asarray(entropies, dtype=np.float64)))
            count += len(entropies)
        elif metadata.get("mean_token_entropy") is not None:
            weight = float(metadata.get("completion_tokens", 1) or 0)
            weighted_sum += float(metadata["mean_token_entropy"]) * weight
            count += weight
    return weighted_sum / count if count > 0 else None


def pool_diversity(pool: Pool) -> dict[str, float | None]:
    """Each diversity measure computed per instance, then averaged over instances. `mean_token_entropy` averages
    the instances that record entropies (None when none does)."""
    measures: dict[str, list[float]] = {
        "distinct_patch_ratio": [],
        "pairwise_action_distance": [],
        "ngram_diversity": [],
        "mean_token_entropy": [],
    }
    for trajectories in pool.values():
        trajectories = list(trajectories)
        measures["distinct_patch_ratio"].append(distinct_patch_ratio(trajectories))
        measures["pairwise_action_distance"].append(pairwise_action_distance(trajectories))
        measures["ngram_diversity"].append(ngram_diversity(trajectories))
        entropy = mean_token_entropy(trajectories)
        if entropy is not None:
            measures["mean_token_entropy"].append(entropy)
    return {key: float(np.mean(values)) if values else None for key, values in measures.items()}


def oracle_rank(trajectories: Sequence[Trajectory]) -> list[int]:
    """The oracle "selector": rank by reward (ties: the earliest first). Best-of-N with it is pass@N."""
    order = sorted(range(len(trajectories)), key=lambda i: (trajectories[i].reward, -i))
    ranks = [0] * len(trajectories)
    for position, i in enumerate(order):
        ranks[i] = position
    return ranks

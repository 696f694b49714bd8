import math
from itertools import combinations

import numpy as np
import pytest

from entropo_trl.data.trajectory import Trajectory
from entropo_trl.evaluation.metrics import (
    BestOfN,
    action_sequence,
    best_of_n,
    best_of_n_curve,
    distinct_patch_ratio,
    levenshtein,
    mean_token_entropy,
    ngram_diversity,
    oracle_rank,
    pairwise_action_distance,
    pass_at_1_runs,
    pass_at_k,
    pool_diversity,
)

# ---------------------------------------------------------------------------------------------------------- helpers


def traj(reward=0.0, assistant=(), patch="", instance_id="i", **metadata):
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "issue"}]
    for content in assistant:
        messages += [{"role": "assistant", "content": content}, {"role": "user", "content": "obs"}]
    return Trajectory(instance_id=instance_id, messages=messages, reward=reward, patch=patch, metadata=metadata)


def test_oracle_rank_prefers_reward_then_the_earliest():
    pool = [traj(reward=r) for r in (0.0, 1.0, 1.0, 0.0)]
    ranks = oracle_rank(pool)
    assert max(range(4), key=ranks.__getitem__) == 1  # the first passing one is chosen
    assert ranks[1] > ranks[2] > ranks[0] > ranks[3]


def by_verifier(trajectories):
    return oracle_rank([Trajectory(instance_id="x", messages=[], reward=t.verifier_prob) for t in trajectories])


def make_pool(num_instances=30, sizes=(8,), seed=0, float_rewards=False):
    rng = np.random.default_rng(seed)
    pool = {}
    for i in range(num_instances):
        m = sizes[i % len(sizes)]
        p = rng.random()
        pool[f"inst-{i}"] = [
            Trajectory(
                instance_id=f"inst-{i}",
                messages=[],
                reward=float(rng.random()) if float_rewards else float(rng.random() < p),
                verifier_prob=float(rng.random()),
            )
            for _ in range(m)
        ]
    return pool


def exact_best_of_n(pool, rank, n):
    """The exact expectation, by enumerating every n-subset."""
    total = 0.0
    for trajectories in pool.values():
        ranks = list(rank(trajectories))
        subsets = list(combinations(range(len(trajectories)), n))
        total += sum(trajectories[max(s, key=lambda i: ranks[i])].reward for s in subsets) / len(subsets)
    return total / len(pool)


# ---------------------------------------------------------------------------------------------------------- pass@k


def test_pass_at_k_matches_closed_form():
    for n in range(1, 13):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases():
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(200, 1, 200) == 1.0


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (0, 0, 1), (5.0, 2, 1)])
def test_pass_at_k_rejects_invalid(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


def test_pass_at_1_runs():
    mean, std = pass_at_1_runs([[True, False, True, True], [1.0, 0.0, 0.0, 1.0], [0, 0, 0, 1]])
    rates = [0.75, 0.5, 0.25]
    assert mean == pytest.approx(0.5)
    assert std == pytest.approx(float(np.std(rates, ddof=1)))
    assert std == pytest.approx(0.25)
    assert pass_at_1_runs([[True, False]]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        pass_at_1_runs([])
    with pytest.raises(ValueError):
        pass_at_1_runs([[]])


# ---------------------------------------------------------------------------------------------------------- best-of-N


def test_best_of_n_oracle_matches_pass_at_k():
    pool = make_pool(num_instances=40, sizes=(8, 6, 10))
    curve = best_of_n_curve(pool, oracle_rank, ns=range(1, 7), draws=4000, seed=3)
    for result in curve:
        expected = np.mean([pass_at_k(len(ts), sum(t.passed for t in ts), result.n) for ts in pool.values()])
        assert result.mean == pytest.approx(expected, abs=0.01), result


def test_best_of_one_is_mean_reward():
    pool = make_pool(num_instances=40, sizes=(8, 5), float_rewards=True)
    expected = np.mean([np.mean([t.reward for t in ts]) for ts in pool.values()])
    for rank in (oracle_rank, by_verifier):
        assert best_of_n(pool, rank, 1, draws=4000).mean == pytest.approx(expected, abs=0.01)


def test_best_of_m_with_oracle_is_any_pass_exactly():
    pool = make_pool(num_instances=25, sizes=(8,))
    result = best_of_n(pool, oracle_rank, 8, draws=50)
    expected = np.mean([any(t.passed for t in ts) for ts in pool.values()])
    assert result.mean == expected
    assert result.ci_low == result.ci_high == expected
    assert result.draws == 50 and result.n == 8


def test_best_of_n_matches_exact_enumeration_for_a_verifier():
    pool = make_pool(num_instances=12, sizes=(6, 5), float_rewards=True, seed=4)
    for n in (2, 3, 5):
        estimate = best_of_n(pool, by_verifier, n, draws=5000, seed=1)
        assert estimate.mean == pytest.approx(exact_best_of_n(pool, by_verifier, n), abs=0.01)


def test_best_of_n_is_deterministic_and_ci_brackets_mean():
    pool = make_pool(num_instances=30, sizes=(8, 4))
    a = best_of_n(pool, by_verifier, 3, draws=300, seed=7)
    b = best_of_n(pool, by_verifier, 3, draws=300, seed=7)
    assert a == b
    assert isinstance(a, BestOfN)
    assert a.ci_low <= a.mean <= a.ci_high
    assert a.ci_low < a.ci_high
    wider = best_of_n(pool, by_verifier, 3, draws=300, seed=7, confidence=0.99)
    assert wider.ci_low <= a.ci_low and wider.ci_high >= a.ci_high
    # the curve uses the same draws as the single calls
    assert best_of_n_curve(pool, by_verifier, ns=[1, 3, 4], draws=300, seed=7)[1] == a


def test_best_of_n_curve_oracle_is_monotone():
    pool = make_pool(num_instances=30, sizes=(8,))
    means = [r.mean for r in best_of_n_curve(pool, oracle_rank, ns=range(1, 9), draws=200)]
    assert means == sorted(means)
    assert all(r.ci_low <= r.mean <= r.ci_high for r in best_of_n_curve(pool, oracle_rank, ns=range(1, 9)))


def test_best_of_n_calls_ranker_once_per_instance():
    pool = make_pool(num_instances=5, sizes=(4,))
    calls = []

    def rank(trajectories):
        calls.append(len(trajectories))
        return oracle_rank(trajectories)

    best_of_n_curve(pool, rank, ns=range(1, 5), draws=20)
    assert calls == [4] * 5


def test_best_of_n_rejects_bad_input():
    pool = make_pool(num_instances=4, sizes=(4,))
    pool["short-one"] = pool["inst-0"][:2]
    with pytest.raises(ValueError, match="short-one"):
        best_of_n(pool, oracle_rank, 3)
    assert best_of_n(pool, oracle_rank, 2, draws=10).n == 2
    with pytest.raises(ValueError, match="tied"):
        best_of_n(pool, lambda ts: [0] * len(ts), 1)
    with pytest.raises(ValueError, match="ranks"):
        best_of_n(pool, lambda ts: [0], 1)
    with pytest.raises(ValueError):
        best_of_n({}, oracle_rank, 1)
    with pytest.raises(ValueError):
        best_of_n(pool, oracle_rank, 0)


# ---------------------------------------------------------------------------------------------------------- diversity

PATCH = "diff --git a/x.py b/x.py\nindex 1a2b3c..4d5e6f 100644\n--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-a\n+b\n"


def test_distinct_patch_ratio():
    same_modulo_whitespace = PATCH.replace("+b\n", "+b   \n").replace("1a2b3c..4d5e6f", "999999..aaaaaa")
    other = PATCH.replace("+b", "+c")
    trajectories = [traj(patch=PATCH), traj(patch=same_modulo_whitespace), traj(patch=other), traj(patch=""), traj()]
    assert distinct_patch_ratio(trajectories) == pytest.approx(2 / 3)
    assert distinct_patch_ratio([traj(), traj(patch="  \n")]) == 0.0
    assert distinct_patch_ratio([]) == 0.0


def test_action_sequence():
    t = traj(
        assistant=[
            "Let me look.\n<function=file_editor>\n<parameter=command>view</parameter>\n"
            "<parameter=path>/testbed/x.py</parameter>\n</function>",
            "<function=execute_bash>\n<parameter=cmd>pytest</parameter>\n</function>",
            "Thinking without a call.",
            "<function=file_editor>\n<parameter=path>x.py</parameter>\n<parameter=command>str_replace</parameter>"
            "\n</function>",
            "<function=finish>\n</function>",
        ]
    )
    assert action_sequence(t) == ["file_editor:view", "execute_bash", "none", "file_editor:str_replace", "finish"]
    structured = Trajectory(
        instance_id="i",
        messages=[
            {"role": "user", "content": "issue"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"function": {"name": "file_editor", "arguments": '{"command": "create"}'}}],
            },
        ],
        reward=0.0,
    )
    assert action_sequence(structured) == ["file_editor:create"]


def call(name, command=None):
    parameter = f"<parameter=command>{command}</parameter>\n" if command else ""
    return f"<function={name}>\n{parameter}</function>"


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein([], ["a", "b"]) == 2
    assert levenshtein(["a", "b"], ["a", "b"]) == 0
    assert levenshtein(["a", "b", "c"], ["b", "c"]) == 1


def test_pairwise_action_distance():
    a = traj(assistant=[call("file_editor", "view"), call("execute_bash"), call("finish")])  # [view, bash, finish]
    b = traj(assistant=[call("file_editor", "view"), call("finish")])  # [view, finish]: distance 1 / 3 to a
    c = traj(assistant=[call("search"), call("execute_bash"), call("file_editor", "create"), "no call"])
    # a-c: [view, bash, finish] vs [search, bash, create, none] = 3 / 4; b-c: 4 / 4
    assert pairwise_action_distance([a, b]) == pytest.approx(1 / 3)
    assert pairwise_action_distance([a, b, c]) == pytest.approx((1 / 3 + 3 / 4 + 1) / 3)
    assert pairwise_action_distance([a]) == 0.0
    assert pairwise_action_distance([a, a]) == 0.0
    assert pairwise_action_distance([traj(), traj()]) == 0.0


def test_ngram_diversity():
    a = traj(assistant=["a b c d", "a b c"])  # trigrams: abc, bcd | abc
    b = traj(assistant=["x y"])  # none
    assert ngram_diversity([a, b], n=3) == pytest.approx(2 / 3)
    assert ngram_diversity([a], n=1) == pytest.approx(4 / 7)
    assert ngram_diversity([b], n=3) == 0.0
    # user / system turns are ignored
    assert ngram_diversity([traj(assistant=["p q r"])], n=3) == 1.0


def test_mean_token_entropy():
    assert mean_token_entropy([traj(), traj()]) is None
    assert mean_token_entropy([traj(token_entropies=[1.0, 2.0, 3.0]), traj(token_entropies=[4.0])]) == 2.5
    weighted = [traj(mean_token_entropy=1.0, completion_tokens=3), traj(mean_token_entropy=3.0, completion_tokens=1)]
    assert mean_token_entropy(weighted) == pytest.approx(1.5)
    mixed = [traj(token_entropies=[2.0, 4.0]), traj(mean_token_entropy=0.0), traj()]  # (6 + 0) / (2 + 1)
    assert mean_token_entropy(mixed) == pytest.approx(2.0)


def test_pool_diversity():
    pool = {
        "one": [
            traj(patch=PATCH, assistant=["a b c", call("finish")], token_entropies=[1.0, 3.0]),
            traj(patch=PATCH, assistant=["a b c"]),
        ],
        "two": [
            traj(patch=PATCH, assistant=["x y z w"]),
            traj(patch=PATCH.replace("+b", "+c"), assistant=[call("finish")]),
        ],
    }
    result = pool_diversity(pool)
    assert set(result) == {"distinct_patch_ratio", "pairwise_action_distance", "ngram_diversity", "mean_token_entropy"}
    assert result["distinct_patch_ratio"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    # one: [none, finish] vs [none] = 1 / 2, two: [none] vs [finish] = 1
    assert result["pairwise_action_distance"] == pytest.approx((1 / 2 + 1) / 2)
    # one: abc, <function=finish> </function> has no trigram, abc -> 1 / 2; two: xyz, yzw -> 2 / 2
    assert result["ngram_diversity"] == pytest.approx((1 / 2 + 1) / 2)
    assert result["mean_token_entropy"] == pytest.approx(2.0)  # only "one" records entropies
    assert pool_diversity({"x": [traj()]})["mean_token_entropy"] is None


def test_pure_python_levenshtein_matches_the_accelerated_one(monkeypatch):
    import random

    from entropo_trl.evaluation import metrics

    pytest.importorskip("rapidfuzz")  # otherwise both sides would be the pure-Python version
    assert metrics._rapidfuzz_levenshtein is not None
    rng = random.Random(0)
    pairs = [
        (
            [rng.choice("abcd") for _ in range(rng.randint(0, 12))],
            [rng.choice("abcd") for _ in range(rng.randint(0, 12))],
        )
        for _ in range(200)
    ]
    fast = [metrics.levenshtein(a, b) for a, b in pairs]
    monkeypatch.setattr(metrics, "_rapidfuzz_levenshtein", None)
    assert [metrics.levenshtein(a, b) for a, b in pairs] == fast
    assert metrics.levenshtein("kitten", "sitting") == 3

import asyncio
import json
import math
import random
import re
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from test_trajectory import _fixture, traj

from entropo_trl.data.readers import read_trajectories
from entropo_trl.data.trajectory import Trajectory, write_trajectories
from entropo_trl.evaluation.selection import (
    PRESETS,
    HybridSelector,
    SelectorConfig,
    group_by_instance,
    judgement_probability,
    score_with_endpoint,
    score_with_model,
)


def candidates():
    """Five candidates of one instance; the comments give each stage's view."""
    return [
        traj(
            "I", 0.0, turns=3, finished=False, regression_pass_count=9, reproduction_score=3.0, verifier_prob=0.9
        ),  # 0
        traj("I", 1.0, turns=4, regression_pass_count=7, reproduction_score=1.0, verifier_prob=0.5),  # 1
        traj("I", 0.0, turns=6, regression_pass_count=7, reproduction_score=2.0, verifier_prob=0.005),  # 2
        traj("I", 1.0, turns=2, regression_pass_count=7, reproduction_score=2.0, verifier_prob=0.01),  # 3
        traj("I", 0.0, turns=5, regression_pass_count=5, reproduction_score=2.0, verifier_prob=0.8),  # 4
    ]


# By hand. finished: {1, 2, 3, 4}; regression (no fail counts, so the most passes, 7): {1, 2, 3}; reproduction
# (max 2.0): {2, 3}; verifier: the paper drops p < 0.01 ({1, 3} after regression), the authors' code drops p <= 0.01
# (both of {2, 3}: the stage falls back); steps: most or fewest turns (the authors count messages).


def test_presets_pick_the_hand_computed_candidate():
    pool = candidates()
    picks = {name: HybridSelector(name).select(pool).index for name in PRESETS}
    # authors-verified: after reproduction {2, 3}; p <= 0.01 drops both, so the stage falls back to {2, 3}; the most
    # messages is candidate 2 (6 turns). authors-lite has no regression or reproduction stage: p > 0.01 keeps {1, 4}
    # of the finished ones, the fewest messages is candidate 1 (4 turns)
    assert picks == {"paper-verified": 1, "paper-lite": 3, "authors-verified": 2, "authors-lite": 1}
    trace = HybridSelector("authors-verified").select(pool).trace
    assert trace == [
        ("finished", 4, False),
        ("regression", 3, False),
        ("reproduction", 2, False),
        ("verifier", 2, True),
        ("steps", 1, False),
    ]


@pytest.mark.parametrize(
    "stage,expected",
    [
        ("finished", 0),  # candidate 0 has the most regression passes once unfinished ones are allowed
        ("regression", 4),  # finished {1,2,3,4} -> verifier {1,3,4} -> most steps: 4 (5 turns)
        ("verifier", 2),  # finished -> regression {1,2,3} -> most steps: 2
        ("steps", 1),  # finished -> regression -> verifier {1,3} -> earliest: 1
    ],
)
def test_each_ablation_of_the_paper_selector(stage, expected):
    selector = HybridSelector(PRESETS["paper-verified"].without(stage))
    assert stage not in selector.config.stages
    assert selector.select(candidates()).index == expected


def _selectors():
    """Every preset, and each with the other tie-break and the other regression rule."""
    for name, config in PRESETS.items():
        yield name, HybridSelector(config)
        other = "index" if config.tie_break == "verifier" else "verifier"
        yield f"{name}, tie_break={other}", HybridSelector(replace(config, tie_break=other))
        if "regression" in config.stages:
            rule = "free" if config.regression_rule == "most_passed" else "most_passed"
            yield f"{name}, regression_rule={rule}", HybridSelector(replace(config, regression_rule=rule))


def test_rank_agrees_with_select_on_every_subset():
    import itertools

    pool = candidates()
    for name, selector in _selectors():
        ranks = selector.rank(pool)
        assert sorted(ranks) == list(range(len(pool)))
        for size in range(1, len(pool) + 1):
            for subset in itertools.combinations(range(len(pool)), size):
                chosen = selector.select([pool[i] for i in subset]).trajectory
                best = max(subset, key=lambda i: ranks[i])
                assert chosen is pool[best], (name, subset)


def _random_candidate(rng, instance="R"):
    """A candidate with many ties: small ranges, repeated p(YES) values, and unknown values (None) mixed in."""
    return traj(
        instance,
        float(rng.random() < 0.4),
        turns=rng.randint(1, 4),
        finished=rng.random() < 0.7,
        regression_pass_count=rng.choice([None, 0, 1, 2, 2]),
        regression_fail_count=rng.choice([None, 0, 0, 1, 2]),
        reproduction_score=rng.choice([None, 0.0, 1.0, 1.0]),
        verifier_prob=rng.choice([None, 0.0, 0.005, 0.01, 0.01, 0.5, 0.5, 0.9]),
    )


def test_rank_agrees_with_select_on_random_subsets():
    rng = random.Random(11)
    checked = 0
    for _ in range(300):
        pool = [_random_candidate(rng) for _ in range(rng.randint(1, 9))]
        for name, selector in _selectors():
            ranks = selector.rank(pool)
            for _ in range(3):
                subset = sorted(rng.sample(range(len(pool)), rng.randint(1, len(pool))))
                chosen = selector.select([pool[i] for i in subset]).trajectory
                assert chosen is pool[max(subset, key=lambda i: ranks[i])], (name, subset)
                checked += 1
    assert checked == 300 * 3 * len(list(_selectors()))


# --------------------------------------------------------------------------------------------------------------------
# The authors' released selection (R2E-Gym fork, create_bestofn_aggregate.py, run_hybrid_verifier), transcribed
# --------------------------------------------------------------------------------------------------------------------


def authors_sweverify(sub_trajs):
    hybrid_candidates = [traj for traj in sub_trajs if traj.finished_score == 1]
    if not hybrid_candidates:
        hybrid_candidates = sub_trajs
    n = len(hybrid_candidates)
    hybrid_candidates = sorted(hybrid_candidates, key=lambda x: x.verifier_prob, reverse=True)[:n]
    max_regression_hybrid = max(traj.regression_pass_count for traj in hybrid_candidates)
    hybrid_candidates = [traj for traj in hybrid_candidates if traj.regression_pass_count == max_regression_hybrid]
    max_reproduction_hybrid = max(traj.reproduction_test_score for traj in hybrid_candidates)
    hybrid_candidates = [traj for traj in hybrid_candidates if traj.reproduction_test_score == max_reproduction_hybrid]
    last_candidates = [traj for traj in hybrid_candidates if traj.verifier_prob > 0.01]
    if not last_candidates:
        last_candidates = hybrid_candidates
    return max(last_candidates, key=lambda x: len(x.history))


def authors_swelite(sub_trajs):
    hybrid_candidates = [traj for traj in sub_trajs if traj.finished_score == 1]
    if not hybrid_candidates:
        hybrid_candidates = sub_trajs
    n = len(hybrid_candidates)
    hybrid_candidates = sorted(hybrid_candidates, key=lambda x: x.verifier_prob, reverse=True)[:n]
    last_candidates = [traj for traj in hybrid_candidates if traj.verifier_prob > 0.01]
    if not last_candidates:
        last_candidates = hybrid_candidates
    return min(last_candidates, key=lambda x: len(x.history))


def _authors_pool(rng):
    """R2E-Gym-like records (the fields the authors' code reads) and the same candidates as trajectories."""
    records, trajectories = [], []
    for _ in range(rng.randint(1, 8)):
        length = rng.randint(2, 4)
        history = [{"role": "system", "content": "agent"}, {"role": "user", "content": "issue"}]
        history += [{"role": "assistant", "content": f"step {k}"} for k in range(length - 2)]
        scores = rng.choice([[], [0], [0], [1], [0, 1]])
        record = SimpleNamespace(
            finished_score=rng.choice([None, 0, 1, 1]),
            verifier_prob=rng.choice([0.0, 0.005, 0.01, 0.01, 0.02, 0.3, 0.5, 0.5, 0.9, 1.0]),
            regression_pass_count=rng.choice([0, 1, 1]),
            reproduction_test_scores=scores,
            history=history,
        )
        record.reproduction_test_score = sum(record.reproduction_test_scores)  # the authors' property
        records.append(record)
        trajectories.append(
            Trajectory(
                instance_id="A",
                messages=history,
                reward=0.0,
                finished=record.finished_score == 1,
                num_steps=length - 2,
                regression_pass_count=record.regression_pass_count,
                regression_fail_count=rng.choice([None, 0, 1]),  # not read by the authors' code
                reproduction_score=float(record.reproduction_test_score),
                verifier_prob=record.verifier_prob,
            )
        )
    return records, trajectories


@pytest.mark.parametrize(
    "preset,authors", [("authors-verified", authors_sweverify), ("authors-lite", authors_swelite)]
)
def test_authors_presets_equal_the_authors_selection(preset, authors):
    """3,000 random pools with deliberate ties: the preset picks the authors' candidate on every one, by `select` and
    by `rank`; the p(YES) tie-break decides a good share of them (the earliest candidate would differ there)."""
    rng = random.Random(f"{preset}-2024")
    selector = HybridSelector(preset)
    by_index = HybridSelector(replace(PRESETS[preset], tie_break="index"))
    agreed = tie_break_decided = 0
    for _ in range(3000):
        records, trajectories = _authors_pool(rng)
        chosen = authors(records)
        expected = next(i for i, record in enumerate(records) if record is chosen)
        assert selector.select(trajectories).index == expected
        ranks = selector.rank(trajectories)
        assert max(range(len(ranks)), key=ranks.__getitem__) == expected
        agreed += 1
        tie_break_decided += by_index.select(trajectories).index != expected
    assert agreed == 3000
    assert tie_break_decided >= 50, tie_break_decided  # 60 (Verified) and 228 (Lite) with these seeds


def test_verifier_tie_break_and_unscored_candidates():
    """With `tie_break: verifier` ties go to the highest p(YES), then the earliest; an unscored candidate is never
    dropped by the threshold and loses ties to every scored one (p = 0 included)."""
    pool = [
        traj("T", 1.0, turns=3, verifier_prob=None),
        traj("T", 1.0, turns=3, verifier_prob=0.4),
        traj("T", 1.0, turns=3, verifier_prob=0.7),
        traj("T", 1.0, turns=3, verifier_prob=0.7),
    ]
    config = SelectorConfig(["finished", "verifier", "steps"], tie_break="verifier")
    assert HybridSelector(config).select(pool).index == 2
    assert HybridSelector(replace(config, tie_break="index")).select(pool).index == 0
    unscored_or_zero = [traj("T", 1.0, verifier_prob=None), traj("T", 1.0, verifier_prob=0.0)]
    selection = HybridSelector(replace(config, stages=["finished", "steps"])).select(unscored_or_zero)
    assert selection.index == 1
    # the threshold drops p = 0.0 and keeps the unscored one
    assert HybridSelector(config).select(unscored_or_zero).index == 0
    with pytest.raises(ValueError, match="tie_break must be one of index, verifier"):
        SelectorConfig(tie_break="random")
    with pytest.raises(ValueError, match="regression_rule must be one of free, most_passed"):
        SelectorConfig.from_dict({"regression_rule": "max"})


# --------------------------------------------------------------------------------------------------------------------
# The paper's regression stage: regression-free candidates
# --------------------------------------------------------------------------------------------------------------------


def regression_pool():
    """Four candidates: the most passes (0) has a PASS_TO_PASS failure; 1 and 2 are regression-free."""
    return [
        traj("G", 0.0, turns=5, regression_pass_count=10, regression_fail_count=1, verifier_prob=0.9),  # 0
        traj("G", 1.0, turns=3, regression_pass_count=8, regression_fail_count=0, verifier_prob=0.5),  # 1
        traj("G", 1.0, turns=4, regression_pass_count=8, regression_fail_count=0, verifier_prob=0.6),  # 2
        traj("G", 0.0, turns=9, finished=False, regression_pass_count=11, regression_fail_count=0),  # 3
    ]


@pytest.mark.parametrize("preset,expected", [("paper-verified", 2), ("paper-lite", 1)])
def test_paper_presets_keep_the_regression_free_candidates(preset, expected, caplog):
    selection = HybridSelector(preset).select(regression_pool())
    assert selection.index == expected  # the most passes would have kept candidate 0 alone
    assert selection.trace[:2] == [("finished", 3, False), ("regression", 2, False)]
    assert selection.notes == {} and "regression_fail_count" not in caplog.text
    # the authors' rule keeps the most passes
    assert HybridSelector(replace(PRESETS[preset], regression_rule="most_passed")).select(regression_pool()).index == 0


def test_regression_stage_reverts_when_no_candidate_is_regression_free():
    pool = regression_pool()[:3]
    for t in pool:
        t.regression_fail_count = 2
    selection = HybridSelector("paper-verified").select(pool)
    assert selection.trace[1] == ("regression", 3, True)  # all three kept: the set from before the stage
    assert selection.index == 0 and selection.notes == {}  # most turns among all three


def test_unknown_fail_counts_fall_back_to_the_most_passes_and_say_so(caplog):
    pool = regression_pool()[:3]
    for t in pool:
        t.regression_fail_count = None
    selector = HybridSelector("paper-lite")
    with caplog.at_level("WARNING", logger="entropo_trl.evaluation.selection"):
        first = selector.select(pool)
        second = selector.select(pool)
    assert first.index == second.index == 0  # the most passes
    assert first.trace[1] == ("regression", 1, True)
    assert first.notes == {
        "regression": "PASS_TO_PASS failures unknown for 3 of 3 candidates and none known regression-free: kept the "
        "most passing regression tests"
    }
    assert caplog.text.count("no regression_fail_count") == 1  # warned once per selector, noted per selection


def test_mixed_fail_counts_rank_free_then_unknown_then_failing():
    """A known regression-free candidate beats an unknown one with more passes; an unknown one beats a known failure
    with more passes (it may be regression-free)."""
    free = traj("M", 1.0, regression_pass_count=3, regression_fail_count=0)
    unknown = traj("M", 1.0, regression_pass_count=5, regression_fail_count=None)
    failing = traj("M", 1.0, regression_pass_count=9, regression_fail_count=1)
    selector = HybridSelector(SelectorConfig(["regression"]))
    assert selector.select([failing, unknown, free]).trajectory is free
    selection = selector.select([failing, unknown])
    assert selection.trajectory is unknown and selection.trace == [("regression", 1, True)] and selection.notes
    assert selector.rank([failing, unknown, free]) == [0, 1, 2]


def test_selections_from_the_cli_report_unknown_fail_counts(tmp_path, capsys):
    from entropo_trl.evaluation.cli import select_main

    pool = tmp_path / "pool.jsonl"
    write_trajectories(pool, [*regression_pool(), *candidates()])  # fail counts known for G, unknown for I
    output = tmp_path / "selected.jsonl"
    assert select_main(["--pool", str(pool), "--preset", "paper-verified", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "regression fail counts unknown, most passes kept: 1 of 2 instances" in printed
    assert (
        select_main(["--pool", str(pool), "--preset", "authors-lite", "--tie_break", "index", "--output", str(output)])
        == 0
    )
    assert "ties: index" in capsys.readouterr().out


def test_fallback_when_every_candidate_is_unfinished():
    pool = [traj("U", 0.0, turns=t, finished=False) for t in (2, 5, 3)]
    selection = HybridSelector("paper-verified").select(pool)
    assert selection.trace[0] == ("finished", 3, True) and selection.index == 1  # most steps


def test_real_r2e_fixture_falls_back_at_every_filter():
    trajectories = list(read_trajectories(_fixture("r2egym_trajectories_qwen3coder.jsonl")))
    assert all(not t.finished for t in trajectories)
    pool = {"all": trajectories}  # three unfinished episodes, no tests, no verifier
    selection = HybridSelector("authors-verified").select(pool["all"])
    assert selection.trace[0] == ("finished", 3, True)
    assert [count for _, count, _ in selection.trace[:4]] == [3, 3, 3, 3]
    assert selection.index == 0  # equal history lengths: the earliest
    for instance, group in group_by_instance(trajectories).items():
        assert HybridSelector("paper-verified").select(group).trajectory.instance_id == instance


def test_config_from_yaml_and_errors(tmp_path):
    path = tmp_path / "selector.yaml"
    path.write_text("preset: paper-lite\nstages: finished,verifier,steps\nverifier_threshold: 0.2\n")
    config = SelectorConfig.from_yaml(path)
    assert config.stages == ["finished", "verifier", "steps"] and config.steps == "fewest"
    assert config.verifier_threshold == 0.2
    path.write_text("stagez: [finished]\n")
    with pytest.raises(ValueError, match="unknown keys.*stagez"):
        SelectorConfig.from_yaml(path)
    with pytest.raises(ValueError, match="unknown selector stage"):
        SelectorConfig(["finished", "oracle"])
    with pytest.raises(ValueError, match="unknown preset"):
        HybridSelector("best")


def test_judgement_probability():
    entries = [
        {"token": "<judgement>", "logprob": -0.1, "top_logprobs": []},
        {
            "token": "YES",
            "logprob": -0.2,
            "top_logprobs": [{"token": "YES", "logprob": -0.2}, {"token": "NO", "logprob": -1.9}],
        },
    ]
    p = judgement_probability(entries)
    assert p == pytest.approx(1 / (1 + pytest.importorskip("math").exp(-1.9 + 0.2)))
    assert judgement_probability([{"token": "NO", "logprob": -0.01, "top_logprobs": []}]) == 0.0
    with pytest.raises(ValueError, match="no YES / NO"):
        judgement_probability([{"token": "maybe", "logprob": -0.1, "top_logprobs": []}])


class _VerifierStub(BaseHTTPRequestHandler):
    """Answers `<judgement>YES` with log-probs that encode the instance id found in the prompt, after a random
    delay, so answers complete out of order."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        number = int(re.search(r"Fix bug number (\d+)", body["messages"][1]["content"]).group(1))
        time.sleep(random.Random(number).uniform(0.0, 0.2))
        p = (number + 1) / 100
        import math

        top = [{"token": "YES", "logprob": math.log(p)}, {"token": "NO", "logprob": math.log(1 - p)}]
        payload = {
            "choices": [
                {
                    "message": {"content": "<judgement>YES</judgement>"},
                    "finish_reason": "stop",
                    "logprobs": {
                        "content": [
                            {"token": "<judgement>", "logprob": 0.0, "top_logprobs": []},
                            {"token": "YES", "logprob": math.log(p), "top_logprobs": top},
                        ]
                    },
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3},
        }
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_concurrent_endpoint_scores_stay_with_their_trajectories():
    from entropo_trl.rollout.client import ChatClient

    server = ThreadingHTTPServer(("127.0.0.1", 0), _VerifierStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    trajectories = [traj(f"i{k}", 1.0, issue=f"Fix bug number {k}.") for k in range(40)]

    async def run():
        async with ChatClient(f"http://127.0.0.1:{server.server_address[1]}/v1", "verifier") as client:
            return await score_with_endpoint(trajectories, client, concurrency=40)

    try:
        scores = asyncio.run(run())
    finally:
        server.shutdown()
    assert scores == pytest.approx([(k + 1) / 100 for k in range(40)])
    assert [t.verifier_prob for t in trajectories] == scores


def test_local_model_scores_are_probabilities(tokenizer, tiny_model_dir):
    from helpers import load_model

    model = load_model(tiny_model_dir)
    trajectories = [traj("a", 1.0), traj("b", 0.0, turns=3)]
    scores = score_with_model(trajectories, model, tokenizer)
    assert all(0.0 < s < 1.0 for s in scores) and trajectories[0].verifier_prob == scores[0]


@pytest.mark.parametrize("family", ["qwen3", "glm4moe"])
def test_local_scores_read_where_the_verifier_was_trained(family):
    """The scored text is the training rendering of the judge conversation cut right after `<judgement>`: for GLM-4.5
    that includes the `<think></think>` its template puts before an assistant's answer."""
    import types

    import torch

    from entropo_trl.data.builders import verifier_prompt
    from entropo_trl.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(family)
    seen = []

    class Model:
        device = torch.device("cpu")

        def __call__(self, ids):
            seen.append(ids[0].tolist())
            logits = torch.zeros(1, ids.shape[1], len(tokenizer))
            logits[0, -1, tokenizer("YES", add_special_tokens=False)["input_ids"][0]] = math.log(3.0)
            return types.SimpleNamespace(logits=logits)

    trajectory = traj("a", 1.0)
    [score] = score_with_model([trajectory], Model(), tokenizer)
    assert score == pytest.approx(0.75)  # p(YES) : p(NO) = 3 : 1, read at the last position
    messages, _ = verifier_prompt(trajectory, tokenizer, 60_000)
    trained = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": "<judgement>YES</judgement>"}], tokenize=False
    )
    scored = tokenizer.decode(seen[0])
    assert scored.endswith("<judgement>") and trained.startswith(scored)


def test_judgement_probability_adds_up_spellings():
    import math

    entries = [
        {
            "token": "YES",
            "logprob": -0.05,
            "top_logprobs": [
                {"token": "YES", "logprob": -0.05},
                {"token": "NO", "logprob": -3.0},
                {"token": " YES", "logprob": -6.0},
            ],
        }
    ]
    yes = math.log(math.exp(-0.05) + math.exp(-6.0))
    assert judgement_probability(entries) == pytest.approx(1 / (1 + math.exp(-3.0 - yes)))


def test_a_failing_verifier_request_scores_none_and_the_others_keep_theirs():
    from entropo_trl.rollout.client import ContextLimitExceeded, LLMError

    class Client:
        async def complete(self, messages, sampling, extra_body=None):
            text = messages[1]["content"]
            if "number 1." in text:
                raise ContextLimitExceeded("too long")
            if "number 2." in text:
                raise LLMError("HTTP 500")
            from entropo_trl.rollout.client import Completion

            return Completion(
                "<judgement>YES</judgement>",
                "stop",
                1,
                1,
                0.0,
                [{"token": "YES", "logprob": -0.1, "top_logprobs": [{"token": "NO", "logprob": -2.4}]}],
            )

    trajectories = [traj(f"i{k}", 1.0, issue=f"Fix bug number {k}.") for k in range(4)]
    scores = asyncio.run(score_with_endpoint(trajectories, Client()))
    assert scores[1] is None and scores[2] is None and scores[0] == scores[3] == pytest.approx(0.9089, abs=1e-3)


def test_yaml_numbers_written_as_strings_and_preset_copies(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("verifier_threshold: 1e-2\n")  # PyYAML reads this as a string
    assert SelectorConfig.from_yaml(path).verifier_threshold == 0.01
    selector = HybridSelector("paper-lite")
    selector.config.stages.remove("verifier")
    assert "verifier" in PRESETS["paper-lite"].stages


def test_selector_settings_that_would_be_ignored_are_refused():
    with pytest.raises(ValueError, match="at least one stage"):
        SelectorConfig.from_dict({"stages": ""})
    with pytest.raises(ValueError, match="cannot drop stage 'verifer'"):
        PRESETS["paper-verified"].without("verifer")
    with pytest.raises(ValueError, match="verifier_inclusive must be true or false"):
        SelectorConfig.from_dict({"verifier_inclusive": "false"})


def test_select_and_swebench_refuse_to_write_over_their_input(tmp_path):
    """A user who passes the pool as the output would lose N candidates per instance to one."""
    from entropo_trl.evaluation.cli import select_main, swebench_main

    pool = tmp_path / "pool.jsonl"
    write_trajectories(pool, [*regression_pool(), *candidates()])
    before = pool.read_bytes()
    with pytest.raises(SystemExit, match="is the input file"):
        select_main(["--pool", str(pool), "--output", str(tmp_path / "." / "pool.jsonl")])
    with pytest.raises(SystemExit, match="is the input file"):
        swebench_main(["--pool", str(pool), "--predictions", str(pool)])
    assert pool.read_bytes() == before

import asyncio
import json
import math
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_trajectory import _fixture, traj

from entropo_trl.selection import (
    PRESETS,
    HybridSelector,
    SelectorConfig,
    group_by_instance,
    judgement_probability,
    score_with_endpoint,
    score_with_model,
)
from entropo_trl.trajectory import read_trajectories


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


# By hand. finished: {1, 2, 3, 4}; regression (max 7): {1, 2, 3}; reproduction (max 2.0): {2, 3};
# verifier: the paper drops p < 0.01 ({1, 3} after regression), the authors' code drops p <= 0.01 (both of {2, 3}:
# the stage falls back); steps: most or fewest turns (the authors count messages).


def test_presets_pick_the_hand_computed_candidate():
    pool = candidates()
    picks = {name: HybridSelector(name).select(pool).index for name in PRESETS}
    # authors-verified: after reproduction {2, 3}; p <= 0.01 drops both, so the stage falls back to {2, 3}; the most
    # messages is candidate 2 (6 turns)
    assert picks == {"paper-verified": 1, "paper-lite": 3, "authors-verified": 2, "authors-lite": 3}
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


def test_rank_agrees_with_select_on_every_subset():
    import itertools

    pool = candidates()
    for name in PRESETS:
        selector = HybridSelector(name)
        ranks = selector.rank(pool)
        assert sorted(ranks) == list(range(len(pool)))
        for size in range(1, len(pool) + 1):
            for subset in itertools.combinations(range(len(pool)), size):
                chosen = selector.select([pool[i] for i in subset]).trajectory
                best = max(subset, key=lambda i: ranks[i])
                assert chosen is pool[best], (name, subset)


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
    from conftest import load_model

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

    from entropo_trl.data import verifier_prompt
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

import json
from collections import Counter

import pytest
from test_trajectory import traj

from entropo_trl.data.builders import (
    CONDENSED,
    VERIFIER_SYSTEM_PROMPT,
    build_dpo_pairs,
    build_kto_rows,
    build_sft_rows,
    build_verifier_rows,
    kto_class_weights,
    verifier_prompt,
)
from entropo_trl.data.sharegpt import (
    export_sharegpt,
    from_sharegpt,
    import_sharegpt,
    sharegpt_dataset_info,
    to_sharegpt,
)
from entropo_trl.data.trajectory import Trajectory
from entropo_trl.data.truncation import count_tokens


def pool():
    """A synthetic pool with known rewards; the expected counts below are worked out by hand."""
    t = []
    # A: two sources, each one pass + one fail
    t += [
        traj("A", 1.0, source="s1"),
        traj("A", 0.0, source="s1"),
        traj("A", 1.0, source="s2", turns=3),
        traj("A", 0.0, source="s2", turns=4),
    ]
    t += [traj("B", 1.0), traj("B", 1.0)]  # both passed
    t += [traj("C", 0.0), traj("C", 0.0)]  # both failed
    t += [traj("D", 1.0), traj("D", 0.0), traj("D", 0.0, turns=3)]  # three runs of one source
    t += [traj("E", 1.0), traj("E", 0.0, finished=False)]  # the failing run hit a limit
    t += [traj("F", 1.0), traj("F", 0.0, system="Another system prompt.")]  # prompts differ
    no_action = Trajectory(
        instance_id="G", messages=traj().messages[:2], reward=0.0, source="model-a", exit_reason="llm_query_error"
    )
    t += [no_action, traj("G", 1.0)]
    return t


def test_dpo_authors_policy_counts():
    rows = build_dpo_pairs(pool(), policy="authors")
    pairs = list(rows)
    assert [(p["instance_id"]) for p in pairs] == ["A", "A"]
    assert rows.stats.rows == 2 and rows.stats.trajectories == 17
    assert rows.stats.skipped == Counter(
        {
            "authors policy: 3 runs, not 2": 3,
            "authors policy: 1 runs, not 2": 2,
            "authors policy: both passed": 2,
            "authors policy: both failed": 2,
            "pair prompts differ": 1,
            "not finished": 1,
            "no assistant turn": 1,
        }
    )
    for pair in pairs:
        assert pair["prompt"] == traj().messages[:2]
        assert pair["chosen"][-1]["content"].endswith("</function>") and pair["chosen"][0]["role"] == "assistant"
    # the s2 pair is the 3-turn pass against the 4-turn fail
    assert sorted(sum(m["role"] == "assistant" for m in p["rejected"]) for p in pairs) == [2, 4]


def test_dpo_all_policy_counts_cap_and_determinism():
    rows = build_dpo_pairs(pool(), policy="all", max_pairs_per_instance=2, seed=0)
    pairs = list(rows)
    assert Counter(p["instance_id"] for p in pairs) == {"A": 2, "D": 2}
    assert rows.stats.skipped == Counter(
        {"all passed": 4, "all failed": 2, "pair prompts differ": 1, "not finished": 1, "no assistant turn": 1}
    )
    assert rows.stats.extra["pairs_capped"] == 1
    uncapped = list(build_dpo_pairs(pool(), policy="all", max_pairs_per_instance=None))
    assert Counter(p["instance_id"] for p in uncapped) == {"A": 4, "D": 2}  # A: 2 passing x 2 failing
    for pair in uncapped:
        assert pair["prompt"] == traj().messages[:2]  # every pair shares the prompt exactly

    def key(pairs):
        return [json.dumps(p, sort_keys=True) for p in pairs]

    assert key(build_dpo_pairs(pool(), "all", 2, seed=0)) == key(pairs)  # same seed, same pairs
    seeds = {tuple(key(build_dpo_pairs(pool(), "all", 2, seed=s))) for s in range(8)}
    assert len(seeds) > 1  # the seed matters: A has 4 candidate pairs for 2 slots
    for s in range(8):  # and the pool's order does not: the same instances' pairs from a reversed pool
        forward = build_dpo_pairs(pool(), "all", 2, seed=s)
        backward = build_dpo_pairs(list(reversed(pool())), "all", 2, seed=s)
        assert sorted(key(forward)) == sorted(key(backward))


def test_structured_tool_calls_are_a_counted_skip():
    calls = traj("T", reward=1.0)
    calls.messages[2] = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "x"}}]}
    rows = build_sft_rows([calls, traj("U", reward=1.0)])
    assert [r["instance_id"] for r in rows] == ["U"]
    assert sum(n for reason, n in rows.stats.skipped.items() if "tool_calls" in reason) == 1


def test_dpo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="policy must be one of"):
        build_dpo_pairs(pool(), policy="best")
    with pytest.raises(ValueError, match="max_pairs_per_instance"):
        build_dpo_pairs(pool(), max_pairs_per_instance=0)


def test_kto_rows_labels_and_class_weights():
    rows = build_kto_rows(pool())
    built = list(rows)
    assert len(built) == 15  # 17 - the unfinished run - the run with no action
    assert rows.stats.skipped == Counter({"not finished": 1, "no assistant turn": 1})
    desirable = sum(r["label"] for r in built)
    assert (desirable, len(built) - desirable) == (8, 7)
    assert rows.stats.extra["desirable"] == 8 and rows.stats.extra["undesirable"] == 7
    assert rows.stats.extra["class_weights"] == {"desirable_weight": 1.0, "undesirable_weight": 8 / 7}
    for row in built:
        assert row["prompt"][-1]["role"] == "user" and row["completion"][0]["role"] == "assistant"
    assert kto_class_weights(1, 4) == {"desirable_weight": 4.0, "undesirable_weight": 1.0}
    with pytest.raises(ValueError, match="both classes"):
        kto_class_weights(0, 3)
    assert len(list(build_kto_rows(pool(), finished_only=False))) == 16


def test_sft_rows_and_stream_used_once():
    rows = build_sft_rows(pool(), require_success=True)
    built = list(rows)
    assert len(built) == 8 and all(set(r) == {"messages", "instance_id"} for r in built)
    assert rows.stats.skipped == Counter({"not passing": 7, "not finished": 1, "no assistant turn": 1})
    with pytest.raises(RuntimeError, match="already consumed"):
        list(rows)
    assert len(list(build_sft_rows(pool()))) == 15


def test_verifier_rows_have_the_authors_prompt_and_judgement():
    built = list(build_verifier_rows(pool(), max_tokens=None))
    assert len(built) == 15
    for row in built:
        system, user, answer = row["messages"]
        assert system == {"role": "system", "content": VERIFIER_SYSTEM_PROMPT}
        assert "=== INTERACTION LOG ===" in user["content"] and "[PATCH]" in user["content"]
        assert answer["content"] == ("<judgement>YES</judgement>" if row["label"] else "<judgement>NO</judgement>")


def test_verifier_condenses_largest_observations_first(tokenizer):
    t = traj("V", 1.0, turns=4)
    t.messages[3]["content"] = "small output\n" * 30
    t.messages[5]["content"] = "large output line\n" * 400
    t.messages[7]["content"] = "medium output\n" * 120
    full, condensed = verifier_prompt(t, tokenizer, max_tokens=None)
    assert condensed == 0
    full_tokens = len(tokenizer(full[1]["content"])["input_ids"])
    budget = full_tokens - 500  # removing the large block is enough
    messages, condensed = verifier_prompt(t, tokenizer, max_tokens=budget)
    text = messages[1]["content"]
    assert condensed == 1 and text.count(CONDENSED) == 1
    assert "large output line" not in text and "medium output" in text and "Fix the bug." in text
    assert len(tokenizer(text)["input_ids"]) <= budget
    rows = build_verifier_rows([t, traj("W", 0.0)], tokenizer, max_tokens=60)
    assert list(rows) == [] and rows.stats.skipped == {"does not fit max_tokens": 2}


def test_builders_fit_a_token_budget(tokenizer):
    long = traj("L", 1.0, turns=3)
    long.messages[3]["content"] = "\n".join(f"log line {i}" for i in range(600))
    rows = build_kto_rows([long, traj("S", 0.0)], tokenizer=tokenizer, max_tokens=400)
    built = list(rows)
    assert len(built) == 2 and rows.stats.truncated == 1 and rows.stats.tokens_cut > 0
    assert count_tokens(tokenizer, built[0]["prompt"] + built[0]["completion"]) <= 400
    assert built[0]["completion"][-1] == long.messages[-1]
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_kto_rows([long], max_tokens=400)


# ---------------------------------------------------------------------------------------------------------------------
# LLaMA-Factory ShareGPT
# ---------------------------------------------------------------------------------------------------------------------


def test_sharegpt_round_trips_each_layout():
    with_tool = traj("T", 1.0)
    with_tool.messages[3] = {"role": "tool", "content": "tool output"}
    sft = list(build_sft_rows([traj("A"), with_tool]))
    dpo = list(build_dpo_pairs(pool(), "all", None))
    kto = list(build_kto_rows(pool()))
    for rows in (sft, dpo, kto):
        exported = list(export_sharegpt(rows))
        assert list(import_sharegpt(json.loads(json.dumps(exported)))) == rows
    assert to_sharegpt(dpo[0])["conversations"][1] == {"from": "human", "value": "Fix the bug."}
    assert to_sharegpt(dpo[0])["chosen"][0]["from"] == "gpt"
    assert to_sharegpt(sft[1])["conversations"][3] == {"from": "observation", "value": "tool output"}
    assert set(to_sharegpt(kto[0])) == {"conversations", "kto_tag", "instance_id"}


def test_sharegpt_import_of_authors_rows_and_errors():
    authors = {
        "conversations": [{"from": "human", "value": "issue"}],
        "system": "sys",
        "chosen": {"from": "gpt", "value": "yes"},
        "rejected": {"from": "gpt", "value": "no"},
    }
    assert from_sharegpt(authors) == {
        "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "issue"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    with pytest.raises(ValueError, match=r"row 3.conversations\[0\].from: unknown ShareGPT role 'bot'"):
        from_sharegpt({"conversations": [{"from": "bot", "value": "x"}]}, index=3)
    with pytest.raises(ValueError, match="kto_tag: expected true/false"):
        from_sharegpt({"conversations": [{"from": "human", "value": "x"}], "kto_tag": "true"})
    with pytest.raises(ValueError, match="no 'conversations'"):
        from_sharegpt({"messages": []})
    assert sharegpt_dataset_info("d", "d.json", "dpo") == {
        "d": {
            "file_name": "d.json",
            "formatting": "sharegpt",
            "ranking": True,
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
        }
    }


def test_verifier_prompt_keeps_condensing_until_it_fits():
    """Over the budgets where condensing is needed: every prompt fits, some fit only by condensing, and an error
    comes only when even the fully condensed prompt is over the budget."""
    from entropo_trl.data.truncation import TruncationError

    t = traj("V", 1.0, turns=3)
    t.messages[3]["content"] = "x" * 102
    t.messages[5]["content"] = "y" * 52

    def tokens(messages):
        return (len(messages[1]["content"]) + 3) // 4 + (len(VERIFIER_SYSTEM_PROMPT) + 3) // 4 + 16

    full, _ = verifier_prompt(t, None, max_tokens=None)
    all_condensed = traj("V", 1.0, turns=3)
    all_condensed.messages[3]["content"] = all_condensed.messages[5]["content"] = CONDENSED
    floor, _ = verifier_prompt(all_condensed, None, max_tokens=None)
    fitted_by_condensing = 0
    for budget in range(tokens(floor) - 5, tokens(full) + 5):
        try:
            messages, condensed = verifier_prompt(t, None, max_tokens=budget)
        except TruncationError as error:
            assert "every observation condensed" in str(error) and tokens(floor) > budget
            continue
        assert tokens(messages) <= budget
        fitted_by_condensing += condensed > 0
        assert (condensed == 0) == (tokens(full) <= budget)
    assert fitted_by_condensing > 0


def test_unlabelled_trajectories_are_skipped_counted():
    unlabelled = traj("U", 0.0, metadata={"labelled": False})
    rows = build_kto_rows([unlabelled, traj("L", 1.0)])
    assert [r["instance_id"] for r in rows] == ["L"]
    assert rows.stats.skipped == {"unlabelled (no test oracle ran)": 1}


def test_a_conversation_the_chat_template_refuses_is_a_counted_skip():
    from entropo_trl.testing import build_tiny_tokenizer

    gemma = build_tiny_tokenizer("gemma3")  # its template raises unless user / assistant roles alternate
    odd = traj("O", reward=1.0)
    odd.messages.insert(2, {"role": "user", "content": "a second user message in a row"})
    rows = build_sft_rows([odd, traj("E", reward=1.0)], tokenizer=gemma, max_tokens=100_000)
    assert [r["instance_id"] for r in rows] == ["E"]
    assert sum(n for reason, n in rows.stats.skipped.items() if reason.startswith("chat template error")) == 1

import pytest
from test_trajectory import _fixture, traj

from entropo_trl.data.truncation import TruncationError, count_tokens, shorten_text, truncate_trajectory


def _long_observation_trajectory():
    t = traj("T", 1.0, turns=5)
    for index, lines in ((3, 400), (5, 40), (7, 900)):
        t.messages[index]["content"] = "\n".join(f"{index}: output line {i} of the test log" for i in range(lines))
    return t.messages


def test_within_budget_is_unchanged(tokenizer):
    messages = traj().messages
    out, report = truncate_trajectory(messages, tokenizer, 10_000)
    assert out == messages and out is not messages
    assert not report.truncated and report.cut_tokens == 0


def test_longest_observations_are_shortened_first(tokenizer):
    messages = _long_observation_trajectory()
    total = count_tokens(tokenizer, messages)
    budget = total // 3
    out, report = truncate_trajectory(messages, tokenizer, budget)
    assert count_tokens(tokenizer, out) <= budget
    assert report.tokens_before == total and report.tokens_after == count_tokens(tokenizer, out)
    assert report.cut_tokens > 0 and report.dropped_turns == 0
    assert 7 in report.shortened_observations  # the longest
    assert 5 not in report.shortened_observations  # the short one is left whole
    assert out[5] == messages[5]
    # system prompt, issue and every assistant turn untouched; head and tail lines kept around a marker
    assert out[:2] == messages[:2]
    assert [m for m in out if m["role"] == "assistant"] == [m for m in messages if m["role"] == "assistant"]
    assert out[7]["content"].startswith("7: output line 0 ") and out[7]["content"].endswith("line 899 of the test log")
    assert "cut to fit the context" in out[7]["content"]
    assert "cut" in str(report)


def test_middle_turns_are_dropped_when_observations_are_not_enough(tokenizer):
    messages = traj("T", 1.0, turns=30).messages
    total = count_tokens(tokenizer, messages)
    budget = total // 2
    out, report = truncate_trajectory(messages, tokenizer, budget)
    assert count_tokens(tokenizer, out) <= budget
    assert report.dropped_turns > 0
    assert out[:2] == messages[:2] and out[-1] == messages[-1]  # issue and the final (finish) turn kept
    assert out[2] == messages[2]  # the first action is kept
    assert out[-3] == messages[-3]  # the middle goes first: the turn just before the final one is kept
    assert any("turns (about" in m["content"] and "omitted" in m["content"] for m in out if m["role"] == "user")
    roles = [m["role"] for m in out[2:]]
    assert all(a != b for a, b in zip(roles, roles[1:]))  # still alternating


def test_impossible_budget_raises(tokenizer):
    messages = traj().messages
    with pytest.raises(TruncationError, match="final assistant turn alone"):
        truncate_trajectory(messages, tokenizer, 10)
    with pytest.raises(ValueError, match="positive"):
        truncate_trajectory(messages, tokenizer, 0)


def test_shorten_text_cuts_inside_a_single_huge_line():
    text = "x" * 10_000
    short, lines = shorten_text(text, 100, 2500)
    assert lines == 1 and len(short) < 1000 and short.startswith("xxx") and short.endswith("xxx")


def test_real_trajectory_fits_and_keeps_its_end(tokenizer):
    import json

    path = _fixture("swesmith_trajectories.jsonl")
    messages = json.loads(path.read_text().splitlines()[1])["messages"]
    total = count_tokens(tokenizer, messages)
    for budget in (total // 2, 8192):
        out, report = truncate_trajectory(messages, tokenizer, budget)
        assert count_tokens(tokenizer, out) <= budget < total
        assert out[:2] == messages[:2] and out[-1] == messages[-1]
        assert "<function=submit>" in out[-1]["content"]
        assert report.cut_tokens == total - count_tokens(tokenizer, out)


def test_the_issue_is_never_changed_and_roles_keep_alternating(tokenizer):
    """At every budget: the system prompt and issue are untouched, the first action is kept (dropping it would put
    the omission marker right after the issue: two user messages in a row, which Gemma's template refuses), and the
    roles alternate; or the trajectory does not fit and says so."""
    messages = traj("T", 1.0, turns=4).messages
    fitted = 0
    for budget in range(60, count_tokens(tokenizer, messages)):
        try:
            out, report = truncate_trajectory(messages, tokenizer, budget)
        except TruncationError:
            continue
        fitted += 1
        assert out[:3] == messages[:3], budget  # system prompt, issue and the first action untouched
        assert out[-1] == messages[-1] and count_tokens(tokenizer, out) <= budget
        roles = [m["role"] for m in out[1:]]
        assert all(a != b for a, b in zip(roles, roles[1:])), (budget, roles)
    assert fitted > 0

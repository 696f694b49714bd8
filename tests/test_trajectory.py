import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from entropo_trl.data.readers import ReadStats, from_r2egym, read_trajectories
from entropo_trl.data.trajectory import Trajectory, TrajectoryFormatError, last_turn_finished, write_trajectories

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def _fixture(name):
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"real fixture {path} is absent (it lives in ../shared/fixtures beside the project)")
    return path


def traj(
    instance="inst-1",
    reward=1.0,
    turns=2,
    system="You are an agent.",
    issue="Fix the bug.",
    finished=True,
    source="model-a",
    **extra,
):
    messages = [{"role": "system", "content": system}, {"role": "user", "content": issue}]
    for t in range(turns):
        last = t == turns - 1
        call = (
            "<function=finish>\n<parameter=command>submit</parameter>\n</function>"
            if last and finished
            else (f"<function=execute_bash>\n<parameter=cmd>ls {t}</parameter>\n</function>")
        )
        messages.append({"role": "assistant", "content": f"step {t}\n{call}"})
        if not last:
            messages.append({"role": "user", "content": f"Exit code: 0\nfile_{t}.py\nSteps Remaining: {99 - t}"})
    return Trajectory(
        instance_id=instance,
        messages=messages,
        reward=reward,
        finished=finished,
        num_steps=turns,
        source=source,
        **extra,
    )


# ---------------------------------------------------------------------------------------------------------------------
# real fixtures
# ---------------------------------------------------------------------------------------------------------------------


def test_swesmith_fixture_parses_as_finished_trajectories():
    path = _fixture("swesmith_trajectories.jsonl")
    records = list(read_trajectories(path, default_reward=1.0))  # SWE-smith's released files hold resolved runs
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == len(raw) == 3
    assert not any(r.labelled for r in read_trajectories(path))  # they carry no reward: unlabelled unless told
    for record, original in zip(records, raw):
        assert record.instance_id == original["instance_id"]
        assert record.messages == original["messages"]
        assert record.finished and record.labelled and record.reward == 1.0 and record.exit_reason == "submitted"
        assert record.num_steps == sum(m["role"] == "assistant" for m in original["messages"])
        assert 22 <= record.num_steps <= 44
        assert record.prompt == original["messages"][:2]
    assert sorted(r.num_steps for r in records) == [22, 37, 44]


def test_r2egym_fixture_parses_with_real_prompts():
    path = _fixture("r2egym_trajectories_qwen3coder.jsonl")
    records = list(read_trajectories(path))
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 3
    for record, original in zip(records, raw):
        assert record.exit_reason == "llm_query_error"
        assert record.finished is False and record.reward == 0.0 and record.num_steps == 0
        assert record.instance_id == original["ds"]["instance_id"]
        assert record.source == original["exp_name"]
        assert record.patch == original["output_patch"]
        system, issue = record.messages
        assert system["role"] == "system" and system["content"] == original["agent_args"]["system_prompt"]
        assert system["content"].startswith("You are a programming agent")
        assert issue["role"] == "user" and original["problem_statement"].strip()[:200] in issue["content"]
        # the authors' fork appended the reference patch to the issue as a hint: removed from the prompt
        assert "<gt_patch>" in original["history"][1]["content"] and "gt_patch" not in issue["content"]
        assert issue["content"].rstrip().endswith("Steps Remaining: 80")
        assert record.metadata["reference_patch_hint_removed"]
        assert record.metadata["docker_image"] == original["docker_image"]
        assert "test_output" not in record.metadata  # raw logs only with keep_logs=True
    assert "test_output" in next(read_trajectories(path, keep_logs=True)).metadata


# ---------------------------------------------------------------------------------------------------------------------
# write / read round trip and safe appends
# ---------------------------------------------------------------------------------------------------------------------


def test_write_then_read_round_trips(tmp_path):
    pool = tmp_path / "pool.jsonl"
    records = [
        traj(
            "a",
            1.0,
            regression_pass_count=3,
            regression_fail_count=0,
            reproduction_score=2.0,
            verifier_prob=0.7,
            episode_id="a/0",
            metadata={"k": [1, 2]},
        ),
        traj("b", 0.0, finished=False, exit_reason="max_step_limit"),
    ]
    assert write_trajectories(pool, records[:1]) == 1
    assert write_trajectories(pool, records[1:]) == 1  # appends
    assert list(read_trajectories(pool)) == records
    assert list(read_trajectories(pool, format="entropo")) == records
    first, second = (json.loads(line) for line in pool.read_text().splitlines())
    assert first["regression_fail_count"] == 0 and second["regression_fail_count"] is None


def test_records_without_a_fail_count_read_as_unknown(tmp_path):
    """Pools written before the oracle counted PASS_TO_PASS failures have no `regression_fail_count` key."""
    record = json.loads(_entropo(regression_pass_count=4, regression_fail_count=_DELETE))
    assert "regression_fail_count" not in record
    pool = tmp_path / "old.jsonl"
    pool.write_text(json.dumps(record) + "\n")
    [old] = read_trajectories(pool)
    assert old.regression_pass_count == 4 and old.regression_fail_count is None


def test_plain_dicts_are_validated_before_writing(tmp_path):
    with pytest.raises(TrajectoryFormatError, match="reward"):
        write_trajectories(tmp_path / "pool.jsonl", [{"instance_id": "x", "messages": traj().messages}])
    assert not (tmp_path / "pool.jsonl").exists() or (tmp_path / "pool.jsonl").read_text() == ""


def test_partial_tail_is_cut_before_appending(tmp_path, caplog):
    pool = tmp_path / "pool.jsonl"
    write_trajectories(pool, [traj("a")])
    with open(pool, "ab") as handle:
        handle.write(b'{"schema": "entropo-trajectory/1", "instance_id": "half')
    stats = ReadStats()
    assert [t.instance_id for t in read_trajectories(pool, stats=stats)] == ["a"]  # skipped even in "raise" mode
    assert stats.skipped == {"truncated last line": 1} and "line 2" in stats.examples["truncated last line"]
    assert "unfinished append" in caplog.text
    write_trajectories(pool, [traj("b")])
    assert "partial last record" in caplog.text
    assert [t.instance_id for t in read_trajectories(pool)] == ["a", "b"]


def test_a_complete_last_record_without_its_newline_is_kept(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps(traj("a").to_dict()))  # written by another tool, no final newline
    assert [t.instance_id for t in read_trajectories(pool)] == ["a"]
    write_trajectories(pool, [traj("b")])
    assert [t.instance_id for t in read_trajectories(pool)] == ["a", "b"]


CONCURRENT_WRITER = """
import sys
from entropo_trl.data.trajectory import Trajectory, write_trajectories
big = "x" * 3_000_000
for i in range(6):
    write_trajectories(sys.argv[1], [Trajectory(instance_id=f"big{i}", reward=1.0, messages=[
        {"role": "system", "content": "s"}, {"role": "user", "content": big},
        {"role": "assistant", "content": "<function=finish>\\n</function>"}])])
"""


def test_concurrent_writers_lose_nothing(tmp_path):
    """A writer's tail repair must not cut another process's record that is still being written."""
    pool = tmp_path / "pool.jsonl"
    process = subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, str(pool)])
    small = 0
    while process.poll() is None or small < 20:
        write_trajectories(pool, [traj(f"small{small}")])
        small += 1
    assert process.wait() == 0
    stats = ReadStats()
    ids = [t.instance_id for t in read_trajectories(pool, stats=stats)]
    assert stats.num_skipped == 0
    assert sorted(i for i in ids if i.startswith("big")) == [f"big{i}" for i in range(6)]
    assert sum(i.startswith("small") for i in ids) == small


WRITER = """
import sys
from entropo_trl.data.trajectory import Trajectory, write_trajectories
big = "x" * 2_000_000
def records():
    i = 0
    while True:
        yield Trajectory(instance_id=f"i{i}", reward=1.0, messages=[
            {"role": "system", "content": "s"}, {"role": "user", "content": big},
            {"role": "assistant", "content": "<function=finish>\\n</function>"}])
        i += 1
write_trajectories(sys.argv[1], records())
"""


def test_killed_writer_never_yields_half_a_record(tmp_path):
    pool = tmp_path / "pool.jsonl"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(pool)])
    deadline = time.time() + 60
    while (not pool.exists() or pool.stat().st_size < 20_000_000) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    stats = ReadStats()
    records = list(read_trajectories(pool, stats=stats))
    assert len(records) >= 10 and all(len(r.messages[1]["content"]) == 2_000_000 for r in records)
    # SIGKILL can stop a 2 MB write part-way: at most the last line is unfinished, and it is reported, not read
    assert set(stats.skipped) <= {"truncated last line"} and stats.num_skipped <= 1
    write_trajectories(pool, [traj("after")])  # the next append cuts the unfinished line first
    stats = ReadStats()
    assert [r.instance_id for r in read_trajectories(pool, stats=stats)][-1] == "after"
    assert stats.num_skipped == 0 and pool.read_bytes().endswith(b"\n")


# ---------------------------------------------------------------------------------------------------------------------
# malformed input: each case a clear error naming file, line and field, or a counted skip
# ---------------------------------------------------------------------------------------------------------------------

GOOD = traj("good").to_dict()


def test_r2egym_regression_counts_come_from_the_regression_log():
    """The real fixture's records carry no regression log (fail count unknown); given one (their real pytest log,
    13 passed and 2 failed), the passes and the FAILED / ERROR statuses are counted."""
    path = _fixture("r2egym_trajectories_qwen3coder.jsonl")
    originals = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(original["regression_test_output"] is None for original in originals)
    assert all(r.regression_pass_count is None and r.regression_fail_count is None for r in read_trajectories(path))
    original = originals[0]
    log = original["test_output"]
    assert "= 2 failed, 13 passed in" in log
    record = from_r2egym({**original, "regression_test_output": log})
    assert (record.regression_pass_count, record.regression_fail_count) == (13, 2)
    error = log + "\nERROR astropy/modeling/tests/test_core.py - ImportError: cannot import name 'x'\n"
    record = from_r2egym({**original, "regression_test_output": error})
    assert record.regression_fail_count == 3
    # a log in which no pytest status can be read: passes 0 (as the authors' code counts), failures unknown
    record = from_r2egym({**original, "regression_test_output": "Ran 12 tests in 0.4s\n\nOK\n"})
    assert (record.regression_pass_count, record.regression_fail_count) == (0, None)
    clean = "\n".join(line for line in log.splitlines() if not line.startswith("FAILED"))
    record = from_r2egym({**original, "regression_test_output": clean})
    assert (record.regression_pass_count, record.regression_fail_count) == (13, 0)


def _entropo(**changes):
    record = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if value is _DELETE:
            del record[key]
        else:
            record[key] = value
    return json.dumps(record)


_DELETE = object()
MESSAGES = GOOD["messages"]
R2E = {
    "trajectory_steps": [],
    "history": MESSAGES,
    "docker_image": "img.x86_64.repo__name-1",
    "exp_name": "run",
    "exit_reason": "agent",
    "output_patch": "",
    "reward": 1.0,
    "ds": {"instance_id": "repo__name-1"},
}

MALFORMED = {
    # name: (line content, field named in the error or None, reason counted)
    "bad JSON": ('{"instance_id": "x", "messages": [', None, "invalid JSON"),
    "not an object": ("[1, 2, 3]", None, "not an object"),
    "unknown format": ('{"foo": 1}', None, "unknown format"),
    "missing role": (
        _entropo(messages=[MESSAGES[0], {"content": "issue"}, MESSAGES[2]]),
        "messages[1].role",
        "missing role",
    ),
    "unknown role": (
        _entropo(messages=[MESSAGES[0], {"role": "robot", "content": "hi"}]),
        "messages[1].role",
        "unknown role",
    ),
    "empty messages": (_entropo(messages=[]), "messages", "empty messages"),
    "messages not a list": (_entropo(messages="hello"), "messages", "messages not a list"),
    "non-string content": (
        _entropo(messages=[MESSAGES[0], {"role": "user", "content": ["a", "b"]}]),
        "messages[1].content",
        "non-string content",
    ),
    "no user message": (_entropo(messages=[MESSAGES[0], MESSAGES[2]]), "messages", "no user turn"),
    "NaN reward": (_entropo(reward=math.nan), "reward", "invalid reward"),
    "reward above one": (_entropo(reward=7.5), "reward", "reward out of range"),
    "negative reward": (_entropo(reward=-1), "reward", "reward out of range"),
    "R2E reward out of range": (json.dumps({**R2E, "reward": 7.5}), "reward", "reward out of range"),
    "SWE-smith reward out of range": (
        json.dumps({"instance_id": "x", "messages": MESSAGES, "reward": -1}),
        "reward",
        "reward out of range",
    ),
    "string reward": (_entropo(reward="1"), "reward", "invalid reward"),
    "string num_steps": (_entropo(num_steps="three"), "num_steps", "invalid num_steps"),
    "string regression_pass_count": (
        _entropo(regression_pass_count="7"),
        "regression_pass_count",
        "invalid regression_pass_count",
    ),
    "negative regression_fail_count": (
        _entropo(regression_fail_count=-1),
        "regression_fail_count",
        "invalid regression_fail_count",
    ),
    "boolean regression_fail_count": (
        _entropo(regression_fail_count=False),
        "regression_fail_count",
        "invalid regression_fail_count",
    ),
    "list metadata": (_entropo(metadata=[]), "metadata", "invalid metadata"),
    "other schema version": (_entropo(schema="entropo-trajectory/999"), "schema", "unknown schema"),
    "missing reward": (_entropo(reward=_DELETE), "reward", "missing reward"),
    "null reward": (_entropo(reward=None), "reward", "missing reward"),
    "empty instance_id": (_entropo(instance_id=""), "instance_id", "invalid instance_id"),
    "finished not a bool": (_entropo(finished="yes"), "finished", "invalid finished"),
    "unknown field": (_entropo(rewrd=1.0), "rewrd", "unknown field"),
    "R2E without history": (json.dumps({**R2E, "history": None}), "history", "missing history"),
    "R2E without instance id": (
        json.dumps({**R2E, "ds": {}, "docker_image": ""}),
        "ds.instance_id",
        "missing instance_id",
    ),
    "R2E bad reproduction scores": (
        json.dumps({**R2E, "reproduction_test_scores": ["1"]}),
        "reproduction_test_scores",
        "invalid reproduction_test_scores",
    ),
    "SWE-smith resolved not a bool": (
        json.dumps({"instance_id": "x", "messages": MESSAGES, "resolved": "yes"}),
        "resolved",
        "invalid resolved",
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_line_raises_with_file_line_and_field(name, tmp_path):
    content, field, reason = MALFORMED[name]
    pool = tmp_path / "pool.jsonl"
    # the bad record on line 3, after a blank line and a good record of the same layout (auto-detected from line 1)
    first = (
        json.dumps(R2E)
        if name.startswith("R2E")
        else json.dumps({"instance_id": "ok", "messages": MESSAGES})
        if name.startswith("SWE-smith")
        else json.dumps(GOOD)
    )
    line, good = (1, 0) if name == "unknown format" else (3, 1)  # an undetectable first record: nothing to follow
    pool.write_text(content + "\n" if line == 1 else first + "\n\n" + content + "\n")
    with pytest.raises(TrajectoryFormatError) as info:
        list(read_trajectories(pool))
    message = str(info.value)
    assert str(pool) in message and f"line {line}" in message, message
    if field is not None:
        assert f"field '{field}'" in message, message
    assert info.value.reason == reason
    stats = ReadStats()
    assert len(list(read_trajectories(pool, on_error="skip", stats=stats))) == good
    assert stats.skipped == {reason: 1} and stats.read == good
    assert reason in stats.summary()


def test_invalid_utf8_and_truncated_last_line(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_bytes(
        json.dumps(GOOD).encode()
        + b"\n"
        + b'{"instance_id": "\xff\xfe"}\n'
        + json.dumps(GOOD).encode()
        + b"\n"
        + json.dumps(GOOD).encode()[:40]
    )
    with pytest.raises(TrajectoryFormatError, match=r"line 2: invalid UTF-8"):
        list(read_trajectories(pool))
    stats = ReadStats()
    assert len(list(read_trajectories(pool, on_error="skip", stats=stats))) == 2
    assert stats.skipped == {"invalid UTF-8": 1, "truncated last line": 1}


def test_complete_last_line_without_newline_is_read(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD))
    assert len(list(read_trajectories(pool))) == 2


def test_malformed_corpus_has_at_least_fifteen_cases():
    assert len(MALFORMED) + 2 >= 15  # + invalid UTF-8 and truncated last line above


def test_format_can_be_forced_and_is_checked(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"instance_id": "x", "messages": MESSAGES}) + "\n")
    assert next(read_trajectories(pool, format="swesmith", source="teacher")).source == "teacher"
    with pytest.raises(TrajectoryFormatError, match="field 'reward': missing 'reward'"):
        list(read_trajectories(pool, format="entropo"))
    with pytest.raises(ValueError, match="format must be one of"):
        list(read_trajectories(pool, format="csv"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(read_trajectories(tmp_path / "missing.jsonl"))


def test_reading_streams(tmp_path):
    pool = tmp_path / "pool.jsonl"
    write_trajectories(pool, [traj(f"i{k}") for k in range(3)])
    with open(pool, "a") as handle:
        handle.write("not json\n")
    stream = read_trajectories(pool)
    assert next(stream).instance_id == "i0"  # records arrive before the bad line is reached
    assert next(stream).instance_id == "i1"


def test_reference_patch_hints_are_removed_from_prompts(tmp_path):
    issue = (
        "<github_issue>\nparse() fails\n</github_issue>\n\nAdditional information:\nThis is a patch for this question:\n"
        "<gt_patch>diff --git a/p.py b/p.py\n-    return 1\n+    return 2\n</gt_patch>\nYou can infer this answer, only if "
        "you stuck in your response and don't have any other information to go on. Otherwise, you should not use "
        "this information.\nSteps Remaining: 80"
    )
    hinted = traj("h")
    hinted.messages[1]["content"] = issue
    pool = tmp_path / "pool.jsonl"
    write_trajectories(pool, [hinted, traj("plain")])
    stats = ReadStats()
    cleaned, plain = read_trajectories(pool, stats=stats)
    prompt = cleaned.messages[1]["content"]
    assert "gt_patch" not in prompt and "return 2" not in prompt and "You can infer" not in prompt
    assert prompt.startswith("<github_issue>\nparse() fails\n</github_issue>") and prompt.endswith(
        "Steps Remaining: 80"
    )
    assert cleaned.metadata["reference_patch_hint_removed"] and "reference_patch_hint_removed" not in plain.metadata
    assert stats.hints_removed == 1 and "removed from 1 prompts" in stats.summary()
    [kept, _] = read_trajectories(pool, keep_hints=True)
    assert kept.messages[1]["content"] == issue


def test_r2e_finished_marker_is_dropped(tmp_path):
    pool = tmp_path / "r2e.jsonl"
    finished = {**R2E, "history": MESSAGES + [{"role": "user", "content": "<<< Finished >>>"}]}
    pool.write_text(json.dumps(finished) + "\n" + json.dumps(R2E) + "\n")
    with_marker, without = read_trajectories(pool)
    assert with_marker.messages == without.messages == MESSAGES and with_marker.finished


def test_only_the_first_call_of_the_last_turn_can_finish(tmp_path):
    """The runner executes a turn's first call only: a `finish` after another call never ended the episode."""
    finish_second = (
        "List, then stop.\n<function=execute_bash>\n<parameter=cmd>ls</parameter>\n</function>\n"
        "<function=finish>\n<parameter=command>submit</parameter>\n</function>"
    )
    finish_first = (
        "<function=submit>\n</function>\n<function=execute_bash>\n<parameter=cmd>ls</parameter>\n</function>"
    )
    path = tmp_path / "swesmith.jsonl"
    path.write_text(
        "".join(
            json.dumps({"instance_id": "a", "messages": MESSAGES[:2] + [{"role": "assistant", "content": c}]}) + "\n"
            for c in (finish_second, finish_first)
        )
    )
    not_finished, finished = read_trajectories(path)
    assert (not_finished.finished, not_finished.exit_reason) == (False, None)
    assert (finished.finished, finished.exit_reason) == (True, "submitted")
    assert not last_turn_finished(not_finished.messages) and last_turn_finished(finished.messages)
    structured = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"function": {"name": n}} for n in ("search", "finish")],
    }
    assert not last_turn_finished(MESSAGES[:2] + [structured])
    assert last_turn_finished(MESSAGES[:2] + [{**structured, "tool_calls": structured["tool_calls"][::-1]}])
    # an R2E-Gym record gets the same rule (and the entropo layout when `finished` is not recorded)
    r2e = {**R2E, "history": MESSAGES[:2] + [{"role": "assistant", "content": finish_second}]}
    assert not from_r2egym(r2e).finished and from_r2egym({**R2E, "history": finished.messages}).finished


def test_swesmith_lines_keep_what_they_say_and_defaults_are_counted(tmp_path):
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "issue"},
        {"role": "assistant", "content": "done\n<function=submit>\n</function>"},
    ]
    path = tmp_path / "swesmith.jsonl"
    lines = [
        {"instance_id": "a__b-1", "messages": messages, "source": "qwen3-coder", "reward": 0.0, "episode_id": "a/q/0"},
        {"instance_id": "a__b-2", "messages": messages},
        {"instance_id": "a__b-3", "messages": messages, "resolved": False},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    stats = ReadStats()
    first, second, third = read_trajectories(path, stats=stats)
    assert (first.source, first.reward, first.episode_id) == ("qwen3-coder", 0.0, "a/q/0")
    assert "source" not in first.metadata and "episode_id" not in first.metadata
    assert (second.source, second.reward, second.episode_id) == ("swe-smith", 0.0, None)
    assert not second.labelled and second.metadata == {"labelled": False}  # no reward: unlabelled, not resolved
    assert (third.source, third.reward, third.labelled) == ("swe-smith", 0.0, True)
    assert first.labelled
    assert stats.defaults == {"reward (none: unlabelled)": 1, "source (set to 'swe-smith')": 2}
    assert "defaults for missing fields: source (set to 'swe-smith') in 2 records, reward (none: unlabelled) in 1" in (
        stats.summary()
    )
    stats = ReadStats()
    _, second, _ = read_trajectories(path, stats=stats, default_reward=1.0)  # an explicit default labels them
    assert (second.reward, second.labelled, second.metadata) == (1.0, True, {})
    assert stats.defaults["reward (set to 1)"] == 1
    for bad in (7.5, -1, True, "1"):
        with pytest.raises(ValueError, match="default_reward must be a number in"):
            list(read_trajectories(path, default_reward=bad))


def test_unlabelled_records_round_trip_unlabelled(tmp_path):
    swesmith = tmp_path / "swesmith.jsonl"
    swesmith.write_text(json.dumps({"instance_id": "x", "messages": MESSAGES}) + "\n")
    write_trajectories(tmp_path / "pool.jsonl", read_trajectories(swesmith))
    [again] = read_trajectories(tmp_path / "pool.jsonl")
    assert not again.labelled and not again.passed


def test_writing_a_reward_outside_zero_one_is_refused(tmp_path):
    pool = tmp_path / "pool.jsonl"
    for reward in (7.5, -1.0):
        with pytest.raises(TrajectoryFormatError, match="field 'reward': reward must be in"):
            write_trajectories(pool, [traj(reward=reward)])
        with pytest.raises(TrajectoryFormatError, match="field 'reward'"):
            write_trajectories(pool, [traj(reward=reward).to_dict()])
    assert pool.read_text() == ""

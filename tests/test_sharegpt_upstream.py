"""What upstream LLaMA-Factory can read of `entropo data sharegpt-export`: its documented ShareGPT layouts, written into
the test (upstream is not a test dependency), the one-line warnings, and `--single_turn` for one-message pairs."""

import json

import pytest

from entropo_trl.data.cli import main
from entropo_trl.data.sharegpt import UPSTREAM_WARNINGS

# Upstream's ShareGPT converter (`SharegptDatasetConverter`, LLaMA-Factory 0.9.x): an optional leading system turn,
# then turns alternating human/observation and gpt/function_call. A preference row needs an odd number of turns
# (ending on the user) and `chosen` / `rejected` as single message objects from the model; a list there is read as a
# normal example whose response is one message, and preference encoding drops it.
USER_TAGS, MODEL_TAGS = ("human", "observation"), ("gpt", "function_call")
UPSTREAM_DPO_INFO = {
    "file_name": "pairs.json",
    "formatting": "sharegpt",
    "ranking": True,
    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"},
}


def upstream_reads_pair(row: dict) -> bool:
    """Whether upstream LLaMA-Factory keeps this row of a `ranking: true` ShareGPT file."""
    turns = row["conversations"]
    if turns and turns[0]["from"] == "system":
        turns = turns[1:]
    for i, turn in enumerate(turns):
        if turn["from"] not in (USER_TAGS if i % 2 == 0 else MODEL_TAGS):
            return False
    if len(turns) % 2 == 0:
        return False
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not (isinstance(chosen, dict) and isinstance(rejected, dict)):
        return False  # upstream: "Dropped invalid example", then "Cannot find valid samples"
    return (
        chosen["from"] in MODEL_TAGS
        and rejected["from"] in MODEL_TAGS
        and set(chosen)
        == set(rejected)
        == {
            "from",
            "value",
        }
    )


def message(role, content):
    return {"role": role, "content": content}


PROMPT = [message("system", "You are a coding agent."), message("user", "Fix the bug in add().")]
ONE_TURN_PAIR = {
    "instance_id": "demo-1",
    "prompt": PROMPT,
    "chosen": [message("assistant", "<function=finish>\n</function>")],
    "rejected": [message("assistant", "I cannot help.")],
}
MULTI_TURN_PAIR = {
    "instance_id": "demo-2",
    "prompt": PROMPT,
    "chosen": [message("assistant", "look"), message("user", "output"), message("assistant", "done")],
    "rejected": [message("assistant", "give up")],
}
KTO_ROW = {
    "prompt": PROMPT,
    "completion": [message("assistant", "a"), message("user", "o"), message("assistant", "b")],
}


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_single_turn_pairs_take_upstreams_layout_and_load_there(tmp_path, capsys):
    rows = write_rows(tmp_path / "pairs.jsonl", [ONE_TURN_PAIR, dict(ONE_TURN_PAIR, instance_id="demo-3")])
    output = tmp_path / "lf" / "pairs.json"
    argv = ["sharegpt-export", "--input", rows, "--output", str(output), "--name", "entropo_dpo"]
    assert main([*argv, "--single_turn"]) == 0
    exported = json.loads(output.read_text())
    assert exported[0]["chosen"] == {"from": "gpt", "value": "<function=finish>\n</function>"}
    assert exported[0]["rejected"] == {"from": "gpt", "value": "I cannot help."}
    assert all(upstream_reads_pair(row) for row in exported)
    info = json.loads((tmp_path / "lf" / "dataset_info.json").read_text())
    assert info["entropo_dpo"] == UPSTREAM_DPO_INFO
    assert "warning" not in capsys.readouterr().err  # this file loads upstream as it is

    # the default (list) layout of the same pairs is what upstream drops, and the export says so in one line
    assert main(argv) == 0
    assert not any(upstream_reads_pair(row) for row in json.loads(output.read_text()))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {UPSTREAM_WARNINGS['dpo']}"]
    assert "cannot load these DPO pairs" in warnings[0] and "--single_turn" in warnings[0]


def test_single_turn_refuses_a_multi_turn_pair_naming_the_row(tmp_path):
    rows = write_rows(tmp_path / "pairs.jsonl", [ONE_TURN_PAIR, MULTI_TURN_PAIR])
    output = tmp_path / "pairs.json"
    with pytest.raises(SystemExit) as refused:
        main(["sharegpt-export", "--input", rows, "--output", str(output), "--single_turn"])
    text = str(refused.value.code)
    assert "pairs.jsonl" in text and "row 1.chosen" in text and "holds 3 messages" in text
    assert not output.exists()


def test_single_turn_is_refused_for_rows_without_pairs(tmp_path):
    rows = write_rows(tmp_path / "kto.jsonl", [dict(KTO_ROW, label=True)])
    with pytest.raises(SystemExit, match="hold no pair \\(kto\\); drop --single_turn"):
        main(["sharegpt-export", "--input", rows, "--output", str(tmp_path / "kto.json"), "--single_turn"])
    assert not (tmp_path / "kto.json").exists()


def test_kto_export_warns_that_upstream_trains_the_last_turn_only(tmp_path, capsys):
    rows = write_rows(tmp_path / "kto.jsonl", [dict(KTO_ROW, label=True), dict(KTO_ROW, label=False)])
    assert main(["sharegpt-export", "--input", rows, "--output", str(tmp_path / "kto.json")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and UPSTREAM_WARNINGS["kto"] in err and "final assistant turn" in err


def test_sft_export_has_no_warning(tmp_path, capsys):
    rows = write_rows(tmp_path / "sft.jsonl", [{"messages": PROMPT + [message("assistant", "done")]}])
    assert main(["sharegpt-export", "--input", rows, "--output", str(tmp_path / "sft.json")]) == 0
    assert "warning" not in capsys.readouterr().err

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import datasets
import pytest
from test_data_builders import pool

from entropo_trl.data.cli import main, percentiles
from entropo_trl.data.trajectory import write_trajectories

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pool_file(tmp_path):
    path = tmp_path / "pool.jsonl"
    write_trajectories(path, pool())
    with open(path, "a") as handle:
        handle.write("{not json\n")
    return path


def test_kto_to_a_datasets_folder_with_summary(pool_file, tmp_path, capsys, monkeypatch):
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))  # where the rows are staged before save_to_disk
    with pytest.raises(Exception, match="line 18"):
        main(["kto", "--input", str(pool_file), "--output", str(tmp_path / "kto")])
    assert main(["kto", "--input", str(pool_file), "--output", str(tmp_path / "kto"), "--on_error", "skip"]) == 0
    out = capsys.readouterr().out
    dataset = datasets.load_from_disk(str(tmp_path / "kto"))
    assert len(dataset) == 15 and sum(dataset["label"]) == 8
    assert dataset[0]["prompt"][0]["role"] == "system"
    assert "17 trajectories read, 1 lines skipped: 1 invalid JSON" in out
    assert "1 not finished" in out and "1 no assistant turn" in out
    assert "class_weights" in out and "rows written: 15" in out and "characters per row" in out
    assert not list(staging.iterdir())  # the staging folders are gone, after a failure too


def test_dpo_to_jsonl_with_token_lengths(pool_file, tmp_path, tokenizer, capsys):
    tokenizer.save_pretrained(tmp_path / "tok")
    out_file = tmp_path / "pairs.jsonl"
    main(
        [
            "dpo",
            "--input",
            str(pool_file),
            "--output",
            str(out_file),
            "--on_error",
            "skip",
            "--policy",
            "authors",
            "--tokenizer",
            str(tmp_path / "tok"),
            "--max_tokens",
            "2000",
        ]
    )
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["instance_id"] for r in rows] == ["A", "A"]
    out = capsys.readouterr().out
    assert "tokens per row: {'p50'" in out and "authors policy: both passed" in out
    assert not out_file.with_name("pairs.jsonl.partial").exists()


def test_push_to_hub_is_called_with_the_repo(pool_file, tmp_path, monkeypatch, capsys):
    pushed = []
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", lambda self, repo, **kw: pushed.append((repo, len(self))))
    main(["sft", "--input", str(pool_file), "--on_error", "skip", "--push_to_hub", "me/entropo-sft"])
    assert pushed == [("me/entropo-sft", 15)]
    assert "pushed to the Hub: me/entropo-sft" in capsys.readouterr().out


def test_sharegpt_export_import_round_trip_through_the_cli(pool_file, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    main(["dpo", "--input", str(pool_file), "--output", str(pairs), "--on_error", "skip"])
    exported = tmp_path / "lf" / "pairs.json"
    main(["sharegpt-export", "--input", str(pairs), "--output", str(exported), "--name", "entropo_dpo"])
    info = json.loads((tmp_path / "lf" / "dataset_info.json").read_text())
    assert info["entropo_dpo"]["ranking"] is True and info["entropo_dpo"]["file_name"] == "pairs.json"
    back = tmp_path / "back.jsonl"
    main(["sharegpt-import", "--input", str(exported), "--output", str(back)])
    assert back.read_text() == pairs.read_text()


def test_sharegpt_export_to_jsonl_and_the_hub_and_verifier_rows(pool_file, tmp_path, monkeypatch):
    pushed = []
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", lambda self, repo, **kw: pushed.append((repo, len(self))))
    verifier = tmp_path / "v.jsonl"
    main(["verifier", "--input", str(pool_file), "--output", str(verifier), "--on_error", "skip"])
    as_jsonl = tmp_path / "lf" / "v.jsonl"  # ShareGPT rows streamed as JSON lines (no builder lengths to measure)
    main(["sharegpt-export", "--input", str(verifier), "--output", str(as_jsonl)])
    assert len(as_jsonl.read_text().splitlines()) == 15
    as_json = tmp_path / "lf" / "v.json"
    main(["sharegpt-export", "--input", str(verifier), "--output", str(as_json), "--name", "judge", "--push_to_hub",
          "me/judge"])  # fmt: skip
    assert pushed == [("me/judge", 15)] and len(json.loads(as_json.read_text())) == 15
    info = json.loads((tmp_path / "lf" / "dataset_info.json").read_text())
    assert "kto_tag" not in json.dumps(info["judge"])  # verifier rows are conversations, not KTO rows


def test_verifier_rows_and_missing_output(pool_file, tmp_path):
    main(["verifier", "--input", str(pool_file), "--output", str(tmp_path / "v.jsonl"), "--on_error", "skip"])
    rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert len(rows) == 15 and rows[0]["messages"][-1]["content"].startswith("<judgement>")
    with pytest.raises(SystemExit, match="--output"):
        main(["kto", "--input", str(pool_file), "--on_error", "skip"])


def test_data_prep_script_runs(pool_file, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "data_prep" / "build_kto.py"),
            "--input",
            str(pool_file),
            "--on_error",
            "skip",
            "--output",
            str(tmp_path / "k.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "rows written: 15" in result.stdout


def test_percentiles():
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "p100": 100}
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "p100": 7}
    assert percentiles([]) == {}


@pytest.mark.parametrize(
    "command, extra, rows",
    [
        ("sft", [], 15),
        ("sft", ["--include_unfinished"], 16),
        ("sft", ["--require_success"], 8),
        ("kto", ["--include_unfinished"], 16),
        ("dpo", ["--policy", "all", "--max_pairs_per_instance", "1"], 2),
    ],
)
def test_cli_options_change_the_rows(pool_file, tmp_path, command, extra, rows):
    out = tmp_path / "rows.jsonl"
    main([command, "--input", str(pool_file), "--output", str(out), "--on_error", "skip", *extra])
    assert len(out.read_text().splitlines()) == rows


def test_cli_keep_hints_and_source(pool_file, tmp_path):
    hinted = tmp_path / "hinted.jsonl"
    lines = pool_file.read_text().splitlines()
    record = json.loads(lines[0])
    record["messages"][1]["content"] += "\n<gt_patch>diff --git a/x b/x</gt_patch>"
    hinted.write_text(json.dumps(record) + "\n")
    for extra, kept in (([], False), (["--keep_hints"], True)):
        out = tmp_path / f"sft{len(extra)}.jsonl"
        main(["sft", "--input", str(hinted), "--output", str(out), "--include_unfinished", *extra])
        [row] = [json.loads(line) for line in out.read_text().splitlines()]
        assert ("<gt_patch>" in json.dumps(row)) is kept


@pytest.mark.parametrize(
    "argv, message",
    [
        (["dpo", "--policy", "authors", "--seed", "3"], "apply to --policy all only"),
        (["kto", "--max_tokens", "0"], "--max_tokens must be >= 1"),
        (["sharegpt-export", "--name", "x", "--push_to_hub", "me/x"], "give --output"),
    ],
)
def test_cli_refuses_options_that_would_be_ignored(pool_file, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main([argv[0], "--input", str(pool_file), *argv[1:]])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_broken_json_array_names_its_file(tmp_path):
    broken = tmp_path / "rows.json"
    broken.write_text('[{"messages": []},\n {"messages": ')
    with pytest.raises(SystemExit, match=r"rows\.json, line 2: invalid JSON"):
        main(["sharegpt-export", "--input", str(broken), "--output", str(tmp_path / "out.json")])


def test_sharegpt_export_keeps_labels_of_verifier_rows_and_refuses_tool_calls():
    from entropo_trl.data.sharegpt import export_sharegpt

    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": True}
    [exported] = export_sharegpt([row])
    assert exported["label"] is True and "kto_tag" not in exported
    calls = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"id": "1"}]}]}
    with pytest.raises(ValueError, match="tool_calls"):
        list(export_sharegpt([calls]))


def test_an_unknown_tokenizer_offline_is_one_clear_line(tmp_path):
    import os

    pool = tmp_path / "pool.jsonl"
    pool.write_text("")
    command = [sys.executable, "-m", "entropo_trl.data.cli", "sft", "--input", str(pool), "--output"]
    command += [str(tmp_path / "sft.jsonl"), "--tokenizer", "nobody/no-such-tokenizer"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[-1]] and "cannot load the tokenizer (--tokenizer) 'nobody/no-such-tokenizer'" in lines[0]
    assert "Traceback" not in result.stderr

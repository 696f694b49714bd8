import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import multi_turn_kto_rows, multi_turn_pairs
from safetensors.torch import load_file
from trl import ModelConfig, SFTConfig

from entropo_trl import EntroDPOConfig, EntroKTOConfig
from entropo_trl.train import RECIPES_DIR, RecipeArguments, merge_adapter, model_slug, parse_recipe, run_stage

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "Qwen/Qwen3-4B-Instruct-2507": 16,
    "google/gemma-3-27b-it": 16,
    "Qwen/Qwen3-Coder-30B-A3B-Instruct": 16,
    "zai-org/GLM-4.5-Air": 4,
}
CONFIGS = {"sft": SFTConfig, "edpo": EntroDPOConfig, "ekto": EntroKTOConfig, "verifier": SFTConfig}


# folders of the package recipes that hold no stage recipe: launch configs, W&B sweeps, α experiments
NOT_STAGE_RECIPES = ("accelerate", "sweeps", "experiments")


def test_every_model_yaml_parses_with_the_papers_settings():
    yamls = sorted(p for p in RECIPES_DIR.glob("*/*.yaml") if p.parent.name not in NOT_STAGE_RECIPES)
    assert len(yamls) == len(MODELS) * len(CONFIGS)
    for model, effective_batch in MODELS.items():
        for stage, config_class in CONFIGS.items():
            path = RECIPES_DIR / model_slug(model) / f"{stage}.yaml"
            gpus = int(re.search(r"^# gpus: (\d+)", path.read_text(), re.M).group(1))
            # the real parser; --use_cpu only so that bf16 validates on this GPU-less machine
            _, args, model_args = parse_recipe(
                stage, (RecipeArguments, config_class, ModelConfig), ["--model", model, "--use_cpu", "true"]
            )
            where = f"{path}"
            assert model_args.model_name_or_path == model, where
            assert model_args.use_peft and model_args.lora_r == 8 and model_args.lora_alpha == 16, where
            assert model_args.lora_target_modules in ("all-linear", ["all-linear"]), where
            # the paper: bf16 LoRA for every model, 4-bit NF4 QLoRA only for GLM-4.5-Air
            assert model_args.load_in_4bit == (model == "zai-org/GLM-4.5-Air"), where
            assert model_args.bnb_4bit_quant_type == "nf4" and model_args.dtype == "bfloat16", where
            # a launch config that fits: ZeRO-3 where the bf16 weights do not fit one GPU
            launch = re.search(r"^# launch: .*--config_file (\S+)", path.read_text(), re.M).group(1)
            assert (ROOT / launch).exists(), where
            if model != "Qwen/Qwen3-4B-Instruct-2507":
                assert launch.endswith(("zero3.yaml", "fsdp2.yaml")), where
            assert args.learning_rate == 1e-5 and args.warmup_steps == 0.1, where
            assert args.bf16 and args.activation_checkpointing, where
            assert args.per_device_train_batch_size * args.gradient_accumulation_steps * gpus == effective_batch, where
            if stage == "verifier":
                assert args.num_train_epochs == 2 and args.max_length >= 32768, where
            else:
                assert args.num_train_epochs == 1 and args.max_length == 18000, where
            if stage in ("edpo", "ekto"):
                assert args.beta == 0.1 and args.alpha == 0.11, where
            assert "report_to" in path.read_text() and args.report_to == ["wandb"], where


def test_unknown_yaml_keys_are_errors(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rate: 1.0e-5\nlearnign_rate: 2.0e-5\n")
    with pytest.raises(ValueError, match="learnign_rate"):
        parse_recipe(
            "ekto", (RecipeArguments, EntroKTOConfig, ModelConfig), ["--config", str(config), "--use_cpu", "true"]
        )


def test_flags_override_the_yaml():
    _, args, _ = parse_recipe(
        "ekto",
        (RecipeArguments, EntroKTOConfig, ModelConfig),
        ["--model", "Qwen/Qwen3-Coder-30B-A3B-Instruct", "--use_cpu", "true", "--alpha", "0.13"],
    )
    assert args.alpha == 0.13 and args.beta == 0.1


def test_a_hub_model_without_a_recipe_is_refused():
    """A near-miss id would otherwise train with bare defaults (no LoRA, no α): full fine-tuning, plain KTO."""
    with pytest.raises(SystemExit, match="no ekto recipe for --model Qwen/Qwen3-Coder-30B-A3B .*qwen3-coder-30b"):
        parse_recipe("ekto", (RecipeArguments, EntroKTOConfig, ModelConfig), ["--model", "Qwen/Qwen3-Coder-30B-A3B"])


def test_launch_configs_and_sweep_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for path in sorted((RECIPES_DIR / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))
        kinds[path.stem] = str(config.distributed_type)
    assert set(kinds) == {"single_gpu", "ddp", "zero3", "zero3_offload", "fsdp2"}
    assert "DEEPSPEED" in kinds["zero3"] and "FSDP" in kinds["fsdp2"] and "MULTI_GPU" in kinds["ddp"]
    # the sweeps run `entropo experiment` (their command lines are checked in tests/test_experiment.py)
    sweep = yaml.safe_load((RECIPES_DIR / "sweeps" / "alpha.yaml").read_text())
    assert sweep["parameters"]["alpha"]["values"] == [0.1, 0.105, 0.11, 0.12, 0.13, 0.15]
    assert sweep["program"] == "recipes/experiment.py"


# ---------------------------------------------------------------------------------------------------------------------
# end to end on a tiny local model
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory, tokenizer):
    from entropo_trl.testing import build_tiny_model

    root = tmp_path_factory.mktemp("recipes")
    build_tiny_model(tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    pairs = multi_turn_pairs(4)
    files = {
        "edpo": [json.dumps(r) for r in pairs],
        "ekto": [json.dumps(r) for r in multi_turn_kto_rows(4)],
        "sft": [json.dumps({"messages": r["prompt"] + r["chosen"]}) for r in pairs],
        "verifier": [
            json.dumps({"messages": r["prompt"] + [{"role": "assistant", "content": "<judgement>YES</judgement>"}]})
            for r in pairs
        ],
    }
    for stage, lines in files.items():
        (root / f"{stage}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _common(data, stage, out):
    return [
        "--model",
        str(data / "model"),
        "--dataset_name",
        str(data / f"{stage}.jsonl"),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--bf16",
        "false",
        "--use_peft",
        "--lora_target_modules",
        "all-linear",
        "--report_to",
        "none",
        "--learning_rate",
        "0.05",
        "--activation_checkpointing",
        "false",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
    ]


@pytest.mark.parametrize("stage", ["sft", "edpo", "ekto", "verifier"])
def test_each_recipe_trains_two_steps_and_writes_a_changed_adapter(stage, recipe_data, tmp_path):
    out = tmp_path / stage
    extra = ["--alpha", "0.11"] if stage in ("edpo", "ekto") else []
    trainer = run_stage(stage, _common(recipe_data, stage, out) + extra)
    assert trainer.state.global_step == 2
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and max(w.abs().max().item() for w in lora_b) > 0  # LoRA B starts at zero: it moved
    card = (out / "README.md").read_text()
    assert "base_model:" in card and stage in card and "entropo-trl" in card
    if stage in ("edpo", "ekto"):
        assert "| alpha (α) | 0.11 |" in card and "| beta (β) | 0.1 |" in card
        assert any("entropo/alpha" in entry for entry in trainer.state.log_history)


def test_sft_trains_on_assistant_tokens_only(recipe_data, tmp_path):
    trainer = run_stage("sft", _common(recipe_data, "sft", tmp_path / "sft"))
    row = trainer.train_dataset[0]
    tokenizer = trainer.processing_class
    trained = tokenizer.decode([label for label in row["labels"] if label != -100])  # TRL folds our masks into labels
    assert "Exit code" not in trained and "Issue" not in trained and "<|im_end|>" in trained
    assert sum(label != -100 for label in row["labels"]) < len(row["input_ids"]) / 2


def test_merge_equals_base_plus_adapter(recipe_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_stage("sft", _common(recipe_data, "sft", tmp_path / "sft"))
    merge_adapter(["--adapter", str(tmp_path / "sft"), "--output_dir", str(tmp_path / "merged"), "--dtype", "float32"])
    inputs = torch.tensor([[5, 17, 42, 7, 99]])
    base = AutoModelForCausalLM.from_pretrained(recipe_data / "model", dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(inputs).logits
        expected = PeftModel.from_pretrained(base, tmp_path / "sft").eval()(inputs).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(inputs).logits
    assert (expected - base_logits).abs().max() > 1e-4  # the adapter does something
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)


def test_wandb_offline_run_records_entropo_metrics(recipe_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "entropo-test")
    args = _common(recipe_data, "ekto", tmp_path / "ekto") + ["--alpha", "0.11"]
    args[args.index("--report_to") + 1] = "wandb"
    import wandb

    trainer = run_stage("ekto", args)
    wandb.finish()
    assert "ekto" in trainer.args.run_name and "a0.11" in trainer.args.run_name
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # W&B's service writes the run file on its own: on a busy machine the history may land a moment after `finish`
    wanted, keys, deadline = {"train/entropo/z0", "train/entropo/alpha", "train/loss"}, set(), time.monotonic() + 60
    while not wanted <= keys and time.monotonic() < deadline:
        time.sleep(0.5)
        for path in runs[0].glob("*.wandb"):
            keys = {key for row in _wandb_history(path) for key in row}
    assert wanted <= keys, sorted(keys)


def _wandb_history(path):
    """History rows of a W&B run file: a LevelDB-style log (32 KiB blocks of 7-byte-header chunks) of protobuf
    `Record`s, after a 7-byte file header."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if len(data) < 7:  # not written yet
        return []
    assert data[:4] == b":W&B", "not a W&B run file"
    rows, pending, offset = [], b"", 7
    while offset + 7 <= len(data):
        block_left = 32768 - offset % 32768
        if block_left < 7:  # block trailer padding
            offset += block_left
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        if offset + 7 + length > len(data):  # a chunk still being written
            break
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def test_push_to_hub_goes_up_to_the_network_call(recipe_data, tmp_path, monkeypatch):
    import huggingface_hub

    calls, cards = [], []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path))))
        cards.append(Path(folder_path, "README.md").read_text())

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    args = _common(recipe_data, "ekto", tmp_path / "ekto") + [
        "--push_to_hub",
        "--hub_model_id",
        "me/ekto-tiny",
        "--alpha",
        "0.11",
    ]
    run_stage("ekto", args)
    assert ("create_repo", "me/ekto-tiny") in calls
    uploads = [c for c in calls if c[0] == "upload_folder"]
    assert uploads and "adapter_model.safetensors" in uploads[-1][2] and "README.md" in uploads[-1][2]
    assert "| alpha (α) | 0.11 |" in cards[-1] and "| stage | ekto |" in cards[-1]  # our card, not TRL's draft


def test_qlora_without_a_gpu_fails_with_a_clear_message(recipe_data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        run_stage("ekto", _common(recipe_data, "ekto", tmp_path / "q") + ["--load_in_4bit", "true"])


def test_the_real_qlora_recipe_on_a_cpu_machine_says_it_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        run_stage(
            "ekto",
            [
                "--model",
                "zai-org/GLM-4.5-Air",
                "--dataset_name",
                "data.jsonl",
                "--output_dir",
                str(tmp_path),
            ],
        )
    # with bf16 switched off it gets to the 4-bit loading, and stops there (before any download)
    with pytest.raises(SystemExit, match="4-bit / 8-bit \\(QLoRA, bitsandbytes\\), which needs a CUDA GPU"):
        run_stage(
            "ekto",
            [
                "--model",
                "zai-org/GLM-4.5-Air",
                "--dataset_name",
                "data.jsonl",
                "--output_dir",
                str(tmp_path),
                "--bf16",
                "false",
            ],
        )


def test_merge_pushes_the_merged_weights(recipe_data, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "create_repo",
        lambda self, repo_id, **kw: (
            calls.append(("create_repo", repo_id)) or huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")
        ),
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "create_commit",
        lambda self, repo_id, operations, **kw: calls.append(
            ("create_commit", repo_id, sorted(op.path_in_repo for op in operations))
        ),
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "upload_folder",
        lambda self, *, repo_id, folder_path, **kw: calls.append(
            ("upload_folder", repo_id, sorted(os.listdir(folder_path)))
        ),
    )
    run_stage("sft", _common(recipe_data, "sft", tmp_path / "sft"))
    merge_adapter(
        [
            "--adapter",
            str(tmp_path / "sft"),
            "--output_dir",
            str(tmp_path / "merged"),
            "--dtype",
            "float32",
            "--push_to_hub",
            "--hub_model_id",
            "me/merged",
        ]
    )
    pushed = [c for c in calls if c[0] in ("create_commit", "upload_folder")]
    assert pushed and pushed[0][1] == "me/merged" and any("model.safetensors" in f for f in pushed[0][2])
    assert "tokenizer_config.json" in pushed[0][2]  # the next stage loads the tokenizer from the same repo
    with pytest.raises(SystemExit, match="--hub_model_id"):
        merge_adapter(["--adapter", str(tmp_path / "sft"), "--output_dir", str(tmp_path / "m2"), "--push_to_hub"])


def test_accelerate_launch_single_gpu_config_trains_on_cpu(recipe_data, tmp_path):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(RECIPES_DIR / "accelerate" / "single_gpu.yaml"),
        "--mixed_precision",
        "no",
        str(ROOT / "recipes" / "ekto.py"),
        *_common(recipe_data, "ekto", tmp_path / "launch"),
        "--max_steps",
        "1",
        "--alpha",
        "0.11",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "ACCELERATE_USE_CPU": "true"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "launch" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# every shipped YAML, as shipped: only what a CPU forces is overridden (bf16, 4-bit loading, dtype), and the model,
# data and output paths; never the batch size, the LoRA settings or the loss options
# ---------------------------------------------------------------------------------------------------------------------

SHIPPED = sorted(p for p in RECIPES_DIR.glob("*/*.yaml") if p.parent.name not in NOT_STAGE_RECIPES)
CPU_FORCED = ["--bf16", "false", "--load_in_4bit", "false", "--dtype", "float32", "--report_to", "none"]


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_yaml_trains_one_step_as_shipped(config, recipe_data, tmp_path):
    stage = config.stem
    argv = ["--config", str(config), "--model_name_or_path", str(recipe_data / "model")]
    argv += ["--dataset_name", str(recipe_data / f"{stage}.jsonl"), "--output_dir", str(tmp_path / "out")]
    trainer = run_stage(stage, argv + CPU_FORCED + ["--max_steps", "1"])
    assert trainer.state.global_step == 1
    shipped = yaml.safe_load(config.read_text())
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "max_length"):
        assert getattr(trainer.args, key) == shipped[key], key
    for key in ("alpha", "beta", "z0_clamp", "kto_variant", "truncation_mode"):
        if key in shipped:
            assert getattr(trainer.args, key) == shipped[key], key
    lora = trainer.model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (shipped["lora_r"], shipped["lora_alpha"], 0.05)
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    if stage == "ekto":
        logged = [entry for entry in trainer.state.log_history if "entropo/z0" in entry]
        assert logged and all(entry["entropo/kl_same_prompt"] == 0.0 for entry in logged)


def test_the_headline_kto_command_runs_as_written_in_the_issue(recipe_data, tmp_path):
    """`python recipes/ekto.py --config recipes/qwen3-coder-30b-a3b-instruct/ekto.yaml ...` in a fresh process, with
    the YAML's own output_dir (relative to the working directory)."""
    command = [sys.executable, str(ROOT / "recipes" / "ekto.py")]
    command += ["--config", str(RECIPES_DIR / "qwen3-coder-30b-a3b-instruct" / "ekto.yaml")]
    command += ["--model_name_or_path", str(recipe_data / "model"), "--dataset_name", str(recipe_data / "ekto.jsonl")]
    command += CPU_FORCED + ["--max_steps", "1"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads(next((tmp_path / "outputs").rglob("trainer_state.json")).read_text())
    assert state["global_step"] == 1 and state["train_batch_size"] == 1


def _resumable(recipe_data, out, *extra):
    return run_stage(
        "ekto",
        ["--model", str(recipe_data / "model"), "--dataset_name", str(recipe_data / "ekto.jsonl")]
        + ["--output_dir", str(out), "--bf16", "false", "--report_to", "none", "--use_peft", "--alpha", "0.11"]
        + ["--lora_target_modules", "all-linear", "--activation_checkpointing", "false", "--logging_steps", "1"]
        + ["--per_device_train_batch_size", "1", "--save_strategy", "steps", "--save_steps", "1", *extra],
    )


def test_a_rerun_resumes_from_the_last_checkpoint(recipe_data, tmp_path, capsys):
    out = tmp_path / "ekto"
    _resumable(recipe_data, out, "--max_steps", "1")
    first = out / "checkpoint-1"
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    trainer = _resumable(recipe_data, out, "--max_steps", "2")
    assert f"Resuming the ekto run from {first}" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamps, "checkpoint-1 was rewritten"
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2]  # continued, not redone
    assert trainer.state.global_step == 2

    # an explicit checkpoint is honoured; --overwrite_output_dir starts over
    trainer = _resumable(recipe_data, out, "--max_steps", "2", "--resume_from_checkpoint", str(first))
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2]
    assert f"Resuming the ekto run from {first}" in capsys.readouterr().out
    trainer = _resumable(recipe_data, tmp_path / "fresh", "--max_steps", "1")
    trainer = _resumable(recipe_data, tmp_path / "fresh", "--max_steps", "1", "--overwrite_output_dir", "true")
    assert "Resuming" not in capsys.readouterr().out and trainer.state.global_step == 1
    with pytest.raises(SystemExit, match="no such checkpoint"):
        _resumable(recipe_data, out, "--resume_from_checkpoint", str(tmp_path / "missing"))


@pytest.mark.parametrize("stage", ["sft", "verifier"])
def test_sft_and_verifier_refuse_kto_style_rows(stage, recipe_data, tmp_path):
    with pytest.raises(SystemExit, match=r"ekto.jsonl: the .* recipe trains on every row.*2 of 4 labelled false"):
        run_stage(stage, _common(recipe_data, "ekto", tmp_path / stage))


def test_an_unknown_model_offline_is_one_clear_line(recipe_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_stage(
            "sft", _common(recipe_data, "sft", tmp_path / "x") + ["--model_name_or_path", "nobody/no-such-model"]
        )
    message = str(exit_info.value)
    assert message.startswith(
        "cannot load the model (--model_name_or_path) 'nobody/no-such-model': it is not a folder"
    )
    assert "local Hugging Face cache" in message and "\n" not in message
    assert exit_info.value.__cause__ is None and exit_info.value.__suppress_context__


def test_a_recipe_run_raises_no_deprecation_warning_of_ours(recipe_data, tmp_path):
    """transformers 5 deprecates names such as `gradient_checkpointing`: the shipped YAMLs, the configs and the
    recipe code use the current ones. Warnings about names the YAML sets, or raised from our own code, fail."""
    import warnings

    config = RECIPES_DIR / "qwen3-coder-30b-a3b-instruct" / "ekto.yaml"
    keys = set(yaml.safe_load(config.read_text()))
    argv = ["--config", str(config), "--model_name_or_path", str(recipe_data / "model")]
    argv += ["--dataset_name", str(recipe_data / "ekto.jsonl"), "--output_dir", str(tmp_path / "out")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_stage("ekto", argv + CPU_FORCED + ["--max_steps", "1"])
    deprecations = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    ours = [
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in deprecations
        if any(f"`{key}`" in str(w.message) for key in keys) or "entropo_trl" in w.filename or "recipes" in w.filename
    ]
    assert not ours, "\n".join(ours)

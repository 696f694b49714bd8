"""The training recipes (SFT, EntroPO-DPO, EntroPO-KTO, verifier, merge): `entropo train STAGE` and the scripts in
`recipes/`.

Arguments come from, lowest to highest priority: the dataclasses' defaults, the model's recipe YAML
(`entropo_trl/recipes/<model-slug>/<stage>.yaml`, shipped with the package and picked by `--model ID`, or any file
given with `--config`), then command-line flags. Unknown YAML keys are errors (TRL's `TrlParser`).
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .model_card import write_model_card

# the recipe YAMLs are package data (`recipes/` in a checkout links to them), so `--model` works from a wheel too
RECIPES_DIR = Path(str(resources.files("entropo_trl") / "recipes"))
STAGES = ("sft", "edpo", "ekto", "verifier")


@dataclass
class RecipeArguments:
    """What a recipe trains on, beyond the trainer's and the model's own arguments."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Dataset: a Hub id, a folder written by `save_to_disk` / `entropo-data`, or a .json/.jsonl file."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Split to evaluate on (none: no eval)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over even when `output_dir` holds checkpoints of an earlier run (by default the run resumes "
            "from the last one)."
        },
    )


def model_slug(model_id: str) -> str:
    """`Qwen/Qwen3-Coder-30B-A3B-Instruct` -> `qwen3-coder-30b-a3b-instruct` (the recipe folder name)."""
    return re.sub(r"[^a-z0-9.]+", "-", model_id.rstrip("/").split("/")[-1].lower()).strip("-")


def recipe_config(model_id: str, stage: str) -> Path | None:
    """The recipe YAML of a model and stage, or None when the model has none (e.g. a local path)."""
    path = RECIPES_DIR / model_slug(model_id) / f"{stage}.yaml"
    return path if path.exists() else None


def split_model_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take `--model ID` / `--model=ID` out of argv."""
    out, model, i = [], None, 0
    while i < len(argv):
        if argv[i] == "--model" and i + 1 < len(argv):
            model, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--model="):
            model, i = argv[i].split("=", 1)[1], i + 1
            continue
        out.append(argv[i])
        i += 1
    return model, out


def config_flag_split(argv: list[str]) -> list[str]:
    """`--config=FILE` as `--config FILE`: TRL's parser reads only the second form (a W&B sweep agent writes the
    first)."""
    return [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]


def parse_recipe(stage: str, config_classes: tuple, argv: list[str] | None = None) -> tuple:
    """Parse a recipe's arguments: `--model ID` picks `recipes/<slug>/<stage>.yaml` (unless `--config` is given)
    and sets `model_name_or_path`; flags override the YAML."""
    from trl import TrlParser

    argv = config_flag_split(list(sys.argv[1:] if argv is None else argv))
    model, argv = split_model_flag(argv)
    if model is not None:
        if "--config" not in argv:
            config = recipe_config(model, stage)
            if config is not None:
                argv = ["--config", str(config), *argv]
            elif not Path(model).exists():  # a Hub id without a recipe would train with bare defaults
                known = sorted(p.name for p in RECIPES_DIR.iterdir() if (p / f"{stage}.yaml").exists())
                raise SystemExit(
                    f"no {stage} recipe for --model {model} (looked for {RECIPES_DIR / model_slug(model)}/"
                    f"{stage}.yaml); recipes exist for: {', '.join(known)}. Pass --config FILE (and "
                    "--model_name_or_path) to train another model with your own settings."
                )
        if "--model_name_or_path" not in argv:
            argv += ["--model_name_or_path", model]
    parser = TrlParser(config_classes)
    try:
        return parser.parse_args_and_config(args=argv)
    except ValueError as error:
        if "bf16" in str(error) or "fp16" in str(error):
            raise SystemExit(
                f"{error}\nThe recipe trains in bf16 (and the model recipes load 4-bit QLoRA weights), which needs a "
                "CUDA GPU, and none is visible. Run it on a GPU machine; to try it on a CPU, pass `--bf16 false "
                "--load_in_4bit false` and a small model."
            ) from None
        raise


def load_recipe_dataset(args: RecipeArguments):
    """The train (and optional eval) split from a Hub id, a `save_to_disk` folder or a JSON / JSONL file."""
    import datasets

    if not args.dataset_name:
        raise SystemExit("--dataset_name is required (a Hub id, a dataset folder or a .jsonl file)")
    name = args.dataset_name
    if os.path.isdir(name) and (Path(name) / "dataset_info.json").exists():
        data = datasets.load_from_disk(name)
        data = data if isinstance(data, datasets.DatasetDict) else datasets.DatasetDict({"train": data})
    elif name.endswith((".json", ".jsonl")):
        data = datasets.load_dataset("json", data_files={"train": name})
    else:
        data = datasets.load_dataset(name, args.dataset_config)
    if args.dataset_train_split not in data:
        raise SystemExit(f"{name} has no split {args.dataset_train_split!r} (splits: {list(data)})")
    train = data[args.dataset_train_split]
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    evaluation = data[args.dataset_test_split] if args.dataset_test_split else None
    return train, evaluation


def load_model_and_tokenizer(model_args, training_args):
    """The policy and its tokenizer. 4-bit (QLoRA) loading needs a CUDA GPU: without one this says so and stops."""
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_quantization_config

    from .loading import load_pretrained

    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None and not torch.cuda.is_available():
        raise SystemExit(
            "This recipe loads the model in 4-bit / 8-bit (QLoRA, bitsandbytes), which needs a CUDA GPU, and none is "
            "visible. Run it on a GPU machine, or pass `--load_in_4bit false --load_in_8bit false` to train a "
            "full-precision LoRA instead."
        )
    dtype = model_args.dtype if model_args.dtype in ("auto", None) else getattr(torch, model_args.dtype)
    model = load_pretrained(
        AutoModelForCausalLM,
        model_args.model_name_or_path,
        "model (--model_name_or_path)",
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        dtype=dtype,
        device_map={"": PartialState().local_process_index} if quantization_config is not None else None,
        quantization_config=quantization_config,
    )
    tokenizer = load_pretrained(
        AutoTokenizer,
        model_args.model_name_or_path,
        "tokenizer (--model_name_or_path)",
        revision=model_args.model_revision,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def run_name(stage: str, model: str, alpha: Any = None, beta: Any = None) -> str:
    """A W&B run name carrying the stage, the model, α and β."""
    parts = [stage, model_slug(model)]
    if beta is not None:
        parts.append(f"b{beta:g}")
    if alpha is not None:
        parts.append(f"a{alpha:g}")
    return "-".join(parts)


def _assistant_only_sft(dataset, tokenizer, max_length: int | None):
    """Tokenize conversational rows with assistant-only masks (docs/design.md, 'Which tokens count'), so that TRL's SFT trains on assistant
    turns only with any prefix-preserving chat template (TRL's own `assistant_only_loss` needs `{% generation %}`
    templates)."""
    from .multiturn import assistant_token_mask

    def tokenize(row):
        ids, mask = assistant_token_mask(tokenizer, row["messages"])
        return {"input_ids": ids, "assistant_masks": mask}

    dataset = dataset.map(tokenize, remove_columns=dataset.column_names, desc="Tokenizing with assistant-only masks")
    if max_length is None:
        return dataset
    # Cutting a row would drop its start (the system prompt and the issue) or its end (the answer): skip it, counted,
    # and fit the data with `entropo-data ... --max_tokens` (trajectory-aware truncation) instead.
    kept = dataset.filter(lambda row: len(row["input_ids"]) <= max_length, desc="Dropping over-long rows")
    if len(kept) < len(dataset):
        import logging

        logging.getLogger(__name__).warning(
            f"skipped {len(dataset) - len(kept)} of {len(dataset)} rows longer than max_length={max_length} tokens; "
            "shorten them with `entropo-data ... --max_tokens` (keeps the issue and the final turns)"
        )
    if len(kept) == 0:
        raise SystemExit(f"every row is longer than max_length={max_length} tokens")
    return kept


def refuse_kto_rows(dataset, stage: str, name: str) -> None:
    """SFT and the verifier train on every row they are given: KTO-style rows (`completion` and `label` columns, failed
    trajectories among them) would teach the model its failures. Refused, naming the file and the count, rather than
    filtered. (Verifier rows carry a `label` too, beside their `messages`: they are not refused.)"""
    if dataset is None or not {"label", "completion"} <= set(dataset.column_names):
        return
    failed = sum(1 for label in dataset["label"] if not label)
    build = "`entropo-data sft` (successful trajectories)" if stage == "sft" else "`entropo-data verifier`"
    raise SystemExit(
        f"{name}: the {stage} recipe trains on every row, and these are KTO-style rows ('completion' and 'label' "
        f"columns, {failed} of {len(dataset)} labelled false). Build {stage} rows from the pool with {build}, or "
        "train these with `entropo train ekto`."
    )


def last_checkpoint(output_dir: str, resume_from_checkpoint: str | None, overwrite: bool) -> str | None:
    """The checkpoint to resume from: `--resume_from_checkpoint PATH` when given, else the last `checkpoint-N` in
    `output_dir` unless `--overwrite_output_dir` asks to start over; None for a fresh start."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume_from_checkpoint:
        if not Path(resume_from_checkpoint).is_dir():
            raise SystemExit(f"--resume_from_checkpoint {resume_from_checkpoint}: no such checkpoint folder")
        return resume_from_checkpoint
    if overwrite or not Path(output_dir).is_dir():
        return None
    return get_last_checkpoint(output_dir)


def stage_classes(stage: str) -> tuple[type, type]:
    """The TRL config and trainer classes of a stage."""
    from trl import SFTConfig, SFTTrainer

    from .dpo_config import EntroDPOConfig
    from .dpo_trainer import EntroDPOTrainer
    from .kto_config import EntroKTOConfig
    from .kto_trainer import EntroKTOTrainer

    return {
        "sft": (SFTConfig, SFTTrainer),
        "verifier": (SFTConfig, SFTTrainer),
        "edpo": (EntroDPOConfig, EntroDPOTrainer),
        "ekto": (EntroKTOConfig, EntroKTOTrainer),
    }[stage]


def coefficients(training_args) -> tuple[Any, Any]:
    """(α, β) of a run: α defaults to β (plain DPO / KTO); both None for SFT and the verifier."""
    alpha = getattr(training_args, "alpha", None)
    beta = getattr(training_args, "beta", None)
    return (beta if alpha is None else alpha), beta


@contextmanager
def wandb_tags(stage: str, model: str, alpha: Any, beta: Any):
    """Tag the W&B run with the stage, the model, α and β (W&B reads `WANDB_TAGS`): the user's own tags are kept,
    ours added, and the variable is restored afterwards."""
    tags = [f"stage:{stage}", f"model:{model_slug(model)}"]
    tags += [f"alpha:{alpha:g}"] if alpha is not None else []
    tags += [f"beta:{beta:g}"] if beta is not None else []
    user_tags = os.environ.get("WANDB_TAGS")
    os.environ["WANDB_TAGS"] = ",".join(([user_tags] if user_tags else []) + tags)
    try:
        yield
    finally:
        if user_tags is None:
            os.environ.pop("WANDB_TAGS", None)
        else:
            os.environ["WANDB_TAGS"] = user_tags


def stage_datasets(stage: str, script_args: RecipeArguments, training_args, tokenizer) -> tuple:
    """The train and eval splits, checked for the stage; SFT and verifier conversations get assistant-only masks."""
    train, evaluation = load_recipe_dataset(script_args)
    if stage not in ("sft", "verifier"):
        return train, evaluation
    refuse_kto_rows(train, stage, script_args.dataset_name)
    refuse_kto_rows(evaluation, stage, f"{script_args.dataset_name} ({script_args.dataset_test_split})")
    if "messages" in train.column_names:
        training_args.assistant_only_loss = False  # the masks do it, for any prefix-preserving template
        train = _assistant_only_sft(train, tokenizer, training_args.max_length)
        if evaluation is not None:
            evaluation = _assistant_only_sft(evaluation, tokenizer, training_args.max_length)
    return train, evaluation


def save_with_card(trainer, stage: str, script_args, model_args, alpha: Any, beta: Any) -> None:
    """Save the adapter (or model) with its model card, and push both when `--push_to_hub` asks."""
    output_dir = trainer.args.output_dir
    trainer.save_model(output_dir)
    lora = (
        f"r={model_args.lora_r}, alpha={model_args.lora_alpha}, modules={model_args.lora_target_modules}"
        if model_args.use_peft
        else ""
    )
    preference = stage in ("edpo", "ekto")

    def card(*_args, **_kwargs) -> None:
        write_model_card(
            output_dir,
            base_model=model_args.model_name_or_path,
            stage=stage,
            dataset=script_args.dataset_name,
            alpha=alpha if preference else None,
            beta=beta if preference else None,
            lora=lora,
        )

    # `Trainer.push_to_hub` writes its model card again just before uploading: have it write this one
    trainer.create_model_card = card
    card()
    if trainer.args.push_to_hub:
        trainer.push_to_hub(commit_message=f"entropo-trl {stage}")


def run_stage(stage: str, argv: list[str] | None = None):
    """Parse, load, train (resuming from the last checkpoint) and save one stage (`sft`, `edpo`, `ekto`,
    `verifier`); returns the trainer."""
    from trl import ModelConfig, get_peft_config

    config_class, trainer_class = stage_classes(stage)
    script_args, training_args, model_args = parse_recipe(stage, (RecipeArguments, config_class, ModelConfig), argv)
    if model_args.model_name_or_path is None:
        raise SystemExit("give the model with --model ID (or --model_name_or_path PATH)")
    alpha, beta = coefficients(training_args)
    if training_args.run_name is None or training_args.run_name == training_args.output_dir:
        training_args.run_name = run_name(stage, model_args.model_name_or_path, alpha, beta)

    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    train, evaluation = stage_datasets(stage, script_args, training_args, tokenizer)
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )

    checkpoint = last_checkpoint(
        training_args.output_dir, training_args.resume_from_checkpoint, script_args.overwrite_output_dir
    )
    if checkpoint is not None:
        print(f"Resuming the {stage} run from {checkpoint} (pass --overwrite_output_dir true to start over)")
    with wandb_tags(stage, model_args.model_name_or_path, alpha, beta):
        trainer.train(resume_from_checkpoint=checkpoint)

    save_with_card(trainer, stage, script_args, model_args, alpha, beta)
    return trainer


@dataclass
class MergeArguments:
    adapter: str = field(default=None, metadata={"help": "Folder (or Hub id) of the LoRA adapter to merge."})
    output_dir: str = field(default=None, metadata={"help": "Where to write the merged model."})
    base_model: str | None = field(default=None, metadata={"help": "Base model (default: the adapter's own)."})
    dtype: str = field(default="bfloat16", metadata={"help": "Weights dtype of the merged model."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the merged weights to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository for --push_to_hub."})


def merge_adapter(argv: list[str] | None = None) -> str:
    """Merge a LoRA adapter into its base model, so the next stage starts from it (policy start and reference)."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import TrlParser

    from .loading import load_pretrained

    (args,) = TrlParser((MergeArguments,)).parse_args_and_config(args=argv)
    if not args.adapter or not args.output_dir:
        raise SystemExit("--adapter and --output_dir are required")
    if args.push_to_hub and not args.hub_model_id:
        raise SystemExit("--push_to_hub needs --hub_model_id")
    base = args.base_model or PeftConfig.from_pretrained(args.adapter).base_model_name_or_path
    model = load_pretrained(AutoModelForCausalLM, base, "base model (--base_model)", dtype=getattr(torch, args.dtype))
    merged = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    merged.save_pretrained(args.output_dir)
    AutoTokenizer.from_pretrained(
        args.adapter if (Path(args.adapter) / "tokenizer_config.json").exists() else base
    ).save_pretrained(args.output_dir)
    if args.push_to_hub:  # the whole folder: weights, config and tokenizer (the next stage loads all three)
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.hub_model_id, exist_ok=True)
        api.upload_folder(
            repo_id=args.hub_model_id, folder_path=args.output_dir, commit_message="entropo-trl: merged LoRA adapter"
        )
    return args.output_dir


TRAIN_USAGE = f"""usage: entropo train STAGE --model MODEL_ID --dataset_name DATA [--flag value ...]

STAGE is one of {", ".join(STAGES)}. `--model` picks the model's recipe YAML (models with recipes: see
`entropo_trl/recipes/`); `--config FILE` gives another. Every field of the stage's TRL config can be set as a flag:
`entropo train STAGE --help` lists them. Launch on GPUs with `accelerate launch -m entropo_trl.cli train STAGE ...` or
the stage scripts in `recipes/` (`accelerate launch recipes/ekto.py ...`)."""


def main(argv: list[str] | None = None) -> int:
    """`entropo train STAGE ...`: run one stage (resuming from its last checkpoint)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(TRAIN_USAGE)
        return 0
    if argv[0] not in STAGES:
        print(f"entropo train: unknown stage {argv[0]!r}\n\n{TRAIN_USAGE}", file=sys.stderr)
        return 2
    run_stage(argv[0], argv[1:])
    return 0


def merge_main(argv: list[str] | None = None) -> int:
    """`entropo merge --adapter DIR --output_dir DIR`: merge a LoRA adapter into its base model."""
    print(f"merged model: {merge_adapter(argv)}")
    return 0

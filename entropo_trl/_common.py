"""Plumbing shared by the EntroPO trainers: collators that carry assistant masks, row validation, the paper card."""

import contextlib
import json
import textwrap
from collections.abc import Iterator
from typing import Any

import torch
from trl.trainer.utils import pad

from .multiturn import tokenize_prompt_completion

ENTROPO_PAPER = {
    "title": "Building Coding Agents via Entropy-Enhanced Multi-Turn Preference Optimization",
    "id": None,
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @article{yu2025entropo,
            title  = {{Building Coding Agents via Entropy-Enhanced Multi-Turn Preference Optimization}},
            author = {Jiahao Yu and Zelei Cheng and Xian Wu and Xinyu Xing},
            year   = 2025,
        }"""),
}


def resolve_tokenizer(model, processing_class, args, trainer_name: str):
    """The tokenizer the trainer will use (loaded as TRL does when not given), with a pad token set."""
    from transformers import AutoTokenizer, PreTrainedTokenizerBase
    from trl.trainer.utils import get_config_model_id

    if processing_class is None:
        model_id = model if isinstance(model, str) else get_config_model_id(model.config)
        revision = (getattr(args, "model_init_kwargs", None) or {}).get("revision")
        processing_class = AutoTokenizer.from_pretrained(
            model_id, revision=revision, trust_remote_code=args.trust_remote_code
        )
    if not isinstance(processing_class, PreTrainedTokenizerBase):
        raise TypeError(
            f"`processing_class` must be a tokenizer ({trainer_name} is text-only), got {type(processing_class).__name__}"
        )
    # as TRL does: `args.pad_token` if given, else the tokenizer's own, else its end-of-sequence token
    pad_token = getattr(args, "pad_token", None) or processing_class.pad_token or processing_class.eos_token
    if pad_token not in processing_class.get_vocab():
        raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary of the tokenizer given to {trainer_name}")
    processing_class.pad_token = pad_token
    return processing_class


def is_vision_example(example: dict[str, Any]) -> bool:
    return "image" in example or "images" in example


def check_trainer_args(model, args, config_class, unsupported, trainer_name: str, train_dataset):
    """The trainer's config: a default one named after the model when `args` is None (`Qwen3-4B-EntroDPO`), else
    `args` checked to be a `config_class` with no unsupported TRL option; text-only datasets."""
    from .dpo_config import reject_options

    if args is None:
        name = model if isinstance(model, str) else model.config._name_or_path
        args = config_class(f"{str(name).split('/')[-1] or 'model'}-{trainer_name.removesuffix('Trainer')}")
    elif not isinstance(args, config_class):
        raise TypeError(f"`args` must be an {config_class.__name__}, got {type(args).__name__}")
    reject_options(args, unsupported)
    if train_dataset is not None and is_vision_example(next(iter(train_dataset))):
        raise ValueError(f"{trainer_name} does not support vision datasets (rows with 'image' / 'images').")
    return args


class AssistantMaskMixin:
    """What both EntroPO trainers add to TRL's dataset handling: multi-turn conversational rows carry assistant-only
    masks (and EntroPO-KTO rows their KL bookkeeping) in `kept_columns`, which the trainer must not drop as unused
    columns."""

    kept_columns: tuple[str, ...] = ()

    def _uses_assistant_masks(self, dataset, args) -> bool:
        from trl.data_utils import is_conversational

        first = next(iter(dataset))
        return bool(getattr(args, "assistant_only", False)) and is_conversational(first)

    def _is_tokenized(self, first: dict[str, Any], args, dataset_name: str) -> bool:
        """Whether the rows are already tokenized (e.g. by a previous trainer or by data preparation): they are then
        used as they are, with a warning when assistant-only masks were asked for and the rows have none."""
        if "prompt_ids" not in first:
            return False
        if getattr(args, "assistant_only", False) and self.kept_columns[0] not in first:
            import logging

            logging.getLogger(type(self).__module__).warning(
                f"The {dataset_name} dataset is already tokenized without assistant masks "
                f"({self.kept_columns[0]!r}): every completion token is trained, tool observations included. "
                "Pass the conversational rows to get assistant-only masks."
            )
        return True

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns = list(self._signature_columns) + list(self.kept_columns)


def row_error(dataset_name: str, index: int, field: str, message: str) -> ValueError:
    return ValueError(f"{dataset_name} dataset, row {index}, field '{field}': {message}")


def require_messages(example: dict[str, Any], key: str, dataset_name: str, index: int) -> list[dict[str, Any]]:
    """The conversational field `key` of a row, or a clear error naming the row and field."""
    if key not in example:
        raise row_error(dataset_name, index, key, "missing")
    value = example[key]
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        raise row_error(dataset_name, index, key, "empty")
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, dict) for m in value):
        raise row_error(dataset_name, index, key, f"expected a list of messages, got {type(value).__name__}")
    for i, message in enumerate(value):
        if message.get("role") is None:
            raise row_error(dataset_name, index, key, f"message {i} has no role")
    return list(value)


def template_kwargs_of(example: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return tools, dict(example.get("chat_template_kwargs") or {})


def tokenize_row_completion(tokenizer, example, key: str, dataset_name: str, index: int) -> dict[str, list[int]]:
    """Tokenize `prompt + example[key]` with an assistant-only mask, errors naming the row and the field."""
    prompt = require_messages(example, "prompt", dataset_name, index)
    completion = require_messages(example, key, dataset_name, index)
    tools, kwargs = template_kwargs_of(example)
    try:
        return tokenize_prompt_completion(tokenizer, prompt, completion, tools, **kwargs)
    except ValueError as error:
        raise row_error(dataset_name, index, key, str(error)) from error


def single_message_completions(example: dict[str, Any], keys: tuple[str, ...]) -> bool:
    """Whether every completion in `keys` is one assistant message: a single-turn row, tokenised as TRL does."""
    return all(
        isinstance(example.get(key), (list, tuple))
        and len(example[key]) == 1
        and isinstance(example[key][0], dict)
        and example[key][0].get("role") == "assistant"
        for key in keys
    )


def tokenize_like_trl(tokenizer, example, keys: tuple[str, ...], dataset_name: str, index: int) -> dict[str, list]:
    """TRL's own tokenisation of a conversational row: the prompt with the generation prompt, `prompt + completion`
    for each key, the completions starting where the prompt and all of them diverge. Every completion token counts, as
    in TRL (the template's end of turn and what follows it, e.g. `<|im_end|>\n`). Returns `prompt_ids` and, per key,
    `{key}_ids` and an all-ones `{key}_mask`."""
    from trl.data_utils import _tokenize, common_prefix_length

    prompt = require_messages(example, "prompt", dataset_name, index)
    tools, kwargs = template_kwargs_of(example)
    prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True, tools=tools, **kwargs)["input_ids"]
    full = {
        key: _tokenize(tokenizer, prompt + require_messages(example, key, dataset_name, index), tools=tools, **kwargs)[
            "input_ids"
        ]
        for key in keys
    }
    prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full.values())
    out: dict[str, list] = {"prompt_ids": prompt_ids[:prompt_len]}
    for key, ids in full.items():
        out[f"{key}_ids"] = ids[prompt_len:]
        out[f"{key}_mask"] = [1] * (len(ids) - prompt_len)
    return out


def map_options(dataset, args, dataset_name: str, description: str | None = None) -> dict[str, Any]:
    """`Dataset.map` / `filter` options: worker processes and a progress-bar description for map-style datasets
    (an `IterableDataset` takes neither)."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        return {}
    options: dict[str, Any] = {"num_proc": args.dataset_num_proc}
    if description:
        options["desc"] = f"{description} ({dataset_name} dataset)"
    return options


def ensure_prompt(dataset, args, dataset_name: str):
    """Rows given as whole `chosen` / `rejected` conversations get their shared `prompt` split off (TRL's
    `extract_prompt`)."""
    from trl.data_utils import extract_prompt

    first = next(iter(dataset))
    if "prompt" in first:
        return dataset
    for key in ("chosen", "rejected"):
        if key not in first:
            raise ValueError(f"{dataset_name} dataset has no 'prompt' column and no '{key}' column")
    return dataset.map(extract_prompt, **map_options(dataset, args, dataset_name, "Extracting the prompt"))


def drop_fully_truncated(dataset, args, dataset_name: str, logger):
    """Drop rows whose prompt alone fills `max_length` (no completion token left to train on), counted in a warning."""
    from datasets import Dataset

    if args.max_length is None:
        return dataset
    before = len(dataset) if isinstance(dataset, Dataset) else None
    options = map_options(dataset, args, dataset_name, "Dropping fully truncated rows")
    dataset = dataset.filter(_shorter_than, fn_kwargs={"max_length": args.max_length}, **options)
    if before is not None and len(dataset) < before:
        logger.warning(
            f"Dropped {before - len(dataset)} of {before} {dataset_name} rows whose prompt alone fills "
            f"max_length={args.max_length}: they have no completion token left to train on."
        )
    return dataset


def _shorter_than(example, max_length):
    """Keep rows whose prompt leaves room for completion tokens (a module-level function, so the dataset fingerprint
    depends on `max_length` only and cached reference log-probs survive changes to unrelated arguments)."""
    return len(example["prompt_ids"]) < max_length


def _masks_tensor(examples, prompt_key, mask_key, max_length, keep_end, pad_to_multiple_of) -> torch.Tensor:
    masks = [[0] * len(example[prompt_key]) + list(example[mask_key]) for example in examples]
    if max_length is not None:
        masks = [m[-max_length:] if keep_end else m[:max_length] for m in masks]
    return pad(
        [torch.tensor(m, dtype=torch.int64) for m in masks],
        padding_value=0,
        padding_side="right",
        pad_to_multiple_of=pad_to_multiple_of,
    )


@contextlib.contextmanager
def swapped_attributes(obj, **values) -> Iterator[None]:
    """Temporarily set attributes on `obj` (used to hand EntroPO's reference values to TRL's loss)."""
    saved = {name: getattr(obj, name) for name in values}
    try:
        for name, value in values.items():
            setattr(obj, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)

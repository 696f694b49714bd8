"""EntroPO-DPO on top of TRL's `DPOTrainer` (docs/design.md, "A narrow way in").

EntroPO-DPO is TRL's sigmoid DPO with β replaced by α and every reference log-prob multiplied by β/α. So the trainer
(a) sets the sigmoid's coefficient to α, (b) supplies the reference log-probs itself (the cached ones with
`precompute_ref_log_probs=True`, otherwise TRL's `compute_ref_log_probs`), multiplied by β/α at use time, and (c) hands
over to TRL's `compute_loss`, which then reads them from the batch. TRL's forward, fused LM head and metrics stay
untouched; its logged rewards, `β·(logp − ref)`, become `α·logp − β·ref`, the EntroPO reward. Cached reference
log-probs are stored unscaled, so they stay valid for any α.

Multi-turn conversational rows are tokenized with [`~entropo_trl.multiturn.tokenize_prompt_completion`], and the
collator turns the assistant-only masks into TRL's `completion_mask`, so only assistant tokens enter `logp`, `ref`, the
loss and the entropy metric.
"""

from dataclasses import dataclass
from typing import Any

import torch
from accelerate.logging import get_logger
from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase
from trl import DPOTrainer
from trl.data_utils import common_prefix_length
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import global_then_local_main_first

from ._common import (
    ENTROPO_PAPER,
    AssistantMaskMixin,
    _masks_tensor,
    check_trainer_args,
    drop_fully_truncated,
    ensure_prompt,
    map_options,
    resolve_tokenizer,
    single_message_completions,
    swapped_attributes,
    tokenize_like_trl,
    tokenize_row_completion,
)
from .dpo_config import DPO_UNSUPPORTED, EntroDPOConfig

logger = get_logger(__name__)

MASK_COLUMNS = ("chosen_assistant_mask", "rejected_assistant_mask")


@dataclass
class DataCollatorForMultiTurnPreference(DataCollatorForPreference):
    """TRL's preference collator, whose `completion_mask` comes from per-token assistant masks when rows carry them.

    Rows with `chosen_assistant_mask` / `rejected_assistant_mask` (aligned with `chosen_ids` / `rejected_ids`) get a
    `completion_mask` that is 1 only on assistant tokens; other rows are collated exactly as TRL does.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        if MASK_COLUMNS[0] not in examples[0]:
            return output
        keep_end = self.truncation_mode == "keep_end"
        args = ("prompt_ids", self.max_length, keep_end, self.pad_to_multiple_of)
        chosen = _masks_tensor(examples, args[0], "chosen_assistant_mask", *args[1:])
        rejected = _masks_tensor(examples, args[0], "rejected_assistant_mask", *args[1:])
        width = output["input_ids"].shape[1]
        masks = torch.cat([pad_to(chosen, width), pad_to(rejected, width)], dim=0)
        output["completion_mask"] = masks
        return output


def pad_to(mask: torch.Tensor, width: int) -> torch.Tensor:
    if mask.shape[1] < width:
        mask = torch.nn.functional.pad(mask, (0, width - mask.shape[1]))
    return mask


class EntroDPOTrainer(AssistantMaskMixin, DPOTrainer):
    """EntroPO-DPO trainer: [`~trl.DPOTrainer`] with the entropy-enhanced loss of eq. (6) of the EntroPO paper.

        loss = −log σ(α·(logp(y+) − logp(y−)) − β·(ref(y+) − ref(y−)))

    with `logp` summed over the tokens of assistant turns only when `args.assistant_only` is set and the rows are
    conversational with multi-message completions (prompt `[system, issue]`, `chosen` / `rejected` the multi-turn
    continuations). Rows whose completions are each a single assistant message, and plain-text rows, are tokenised
    exactly as TRL does (every completion token counts, the template's `<|im_end|>\n` included). At α = β
    (`alpha=None`) it is TRL's DPO, loss and updates.

    Args are those of [`~trl.DPOTrainer`]; `args` must be an [`EntroDPOConfig`] (default: one with α = β).

    Logs, besides TRL's metrics: `entropo/alpha`; `rewards/*` and `rewards/margins` are in EntroPO units
    (`α·logp − β·ref`); `entropy` is the mean per-token policy entropy over the scored (assistant) tokens.
    """

    kept_columns = MASK_COLUMNS
    _tag_names = ["trl", "dpo", "entropo"]
    _name = "EntroPO-DPO"
    _paper = ENTROPO_PAPER

    def __init__(
        self,
        model,
        ref_model=None,
        args: EntroDPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | None = None,
        **kwargs,
    ):
        args = check_trainer_args(model, args, EntroDPOConfig, DPO_UNSUPPORTED, "EntroDPOTrainer", train_dataset)
        processing_class = resolve_tokenizer(model, processing_class, args, "EntroDPOTrainer")
        if data_collator is None:
            data_collator = DataCollatorForMultiTurnPreference(
                pad_token_id=processing_class.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        elif data_collator is not None and args.assistant_only:
            logger.warning(
                "A custom data_collator was passed with assistant_only=True: assistant-only masks are applied only "
                "when the collator turns the rows' 'chosen_assistant_mask' / 'rejected_assistant_mask' into "
                "'completion_mask' (as DataCollatorForMultiTurnPreference does)."
            )
        self.alpha = args.effective_alpha
        self.entropo_beta = args.beta
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Dataset preparation: multi-turn conversational rows get assistant-only masks
    # ----------------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if self._is_tokenized(next(iter(dataset)), args, dataset_name):
            return dataset
        if not self._uses_assistant_masks(dataset, args):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        tokenizer = processing_class
        with global_then_local_main_first():
            dataset = ensure_prompt(dataset, args, dataset_name)

            def tokenize(example, index):
                if single_message_completions(example, ("chosen", "rejected")):  # single-turn: exactly as TRL
                    tokens = tokenize_like_trl(tokenizer, example, ("chosen", "rejected"), dataset_name, index)
                    return {
                        "prompt_ids": tokens["prompt_ids"],
                        **{f"{key}_ids": tokens[f"{key}_ids"] for key in ("chosen", "rejected")},
                        **{f"{key}_assistant_mask": tokens[f"{key}_mask"] for key in ("chosen", "rejected")},
                    }
                chosen = tokenize_row_completion(tokenizer, example, "chosen", dataset_name, index)
                rejected = tokenize_row_completion(tokenizer, example, "rejected", dataset_name, index)
                # Both share the prompt's rendering; a token merged across the prompt boundary moves to the completion.
                prompt_len = common_prefix_length(chosen["prompt_ids"], rejected["prompt_ids"])
                out = {"prompt_ids": chosen["prompt_ids"][:prompt_len]}
                for key, tokens in (("chosen", chosen), ("rejected", rejected)):
                    moved = tokens["prompt_ids"][prompt_len:]
                    out[f"{key}_ids"] = moved + tokens["completion_ids"]
                    out[f"{key}_assistant_mask"] = [0] * len(moved) + tokens["completion_mask"]
                return out

            options = map_options(dataset, args, dataset_name, "Tokenizing with assistant-only masks")
            dataset = dataset.map(tokenize, with_indices=True, **options)
            if args.truncation_mode == "keep_start":
                dataset = drop_fully_truncated(dataset, args, dataset_name, logger)
        return dataset

    # ----------------------------------------------------------------------------------------------------------------
    # Loss: α in the sigmoid, reference log-probs scaled by β/α at use time, then TRL's own loss
    # ----------------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        if "ref_chosen_logps" in inputs and "ref_rejected_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]  # cached, unscaled
        else:
            reference = self.ref_model if self.ref_model is not None else self.model
            ref_chosen, ref_rejected = self.compute_ref_log_probs(reference, inputs)
        scale = self.entropo_beta / self.alpha  # eq. (6): β·ref = α·((β/α)·ref)
        device = inputs["input_ids"].device
        inputs["ref_chosen_logps"] = ref_chosen.to(device) * scale
        inputs["ref_rejected_logps"] = ref_rejected.to(device) * scale
        with swapped_attributes(self, precompute_ref_logps=True, beta=self.alpha):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._metrics[mode]["entropo/alpha"].append(self.alpha)
        return result

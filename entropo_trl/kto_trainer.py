"""EntroPO-KTO on top of TRL's `KTOTrainer` (DESIGN §2, "a narrow way in").

Paper variant (eqs. 7-8), with r(y) = logp(y) − (β/α)·ref(y):

    z0 = mean over the mismatched (KL) samples of r(y'), detached, averaged across processes (unclamped by default)
    desirable:   λ+·(1 − σ(α·(r(y) − z0)))        undesirable:   λ−·(1 − σ(α·(z0 − r(y))))

TRL computes `1 − σ(β'·((logp − ref') − kl))` with `kl = clamp≥0(mean(KL_logps − ref_KL))`. The trainer computes z0
itself (one no-grad policy forward on the KL samples, exactly the forward TRL would run), then hands TRL's loss
`β' = α`, reference values `ref' = (β/α)·ref + z0` and no KL term of its own, so TRL's logratio is `r − z0` and its
clamp never applies. TRL's forward, fused LM head and metrics stay in use; the logged rewards are shifted back by α·z0
to the EntroPO reward `α·logp − β·ref`. Cached reference log-probs are stored unscaled, so they stay valid for any α.

The authors' released variant (`kto_variant="reference_code"`) is handled the same way with `β' = β`, `ref' = ref + z`.
"""

from dataclasses import dataclass
from typing import Any

import torch
from accelerate.logging import get_logger
from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase
from trl import KTOTrainer
from trl.data_utils import extract_prompt, unpair_preference_dataset
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference
from trl.trainer.utils import global_then_local_main_first

from ._common import (
    ENTROPO_PAPER,
    AssistantMaskMixin,
    _masks_tensor,
    _shorter_than,
    check_trainer_args,
    resolve_tokenizer,
    row_error,
    swapped_attributes,
    tokenize_row_completion,
)
from .kto_config import KTO_UNSUPPORTED, EntroKTOConfig
from .losses import entropo_kto_z0

logger = get_logger(__name__)

MASK_COLUMNS = ("completion_assistant_mask", "KL_completion_assistant_mask")


@dataclass
class DataCollatorForMultiTurnUnpairedPreference(DataCollatorForUnpairedPreference):
    """TRL's unpaired-preference collator whose `completion_mask` / `KL_completion_mask` come from per-token assistant
    masks when rows carry `completion_assistant_mask` / `KL_completion_assistant_mask`; other rows are collated as TRL
    does."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        for prefix, ids_key, mask_key in (
            ("", "completion_ids", "completion_assistant_mask"),
            ("KL_", "KL_completion_ids", "KL_completion_assistant_mask"),
        ):
            if ids_key in examples[0] and mask_key in examples[0]:
                output[f"{prefix}completion_mask"] = _masks_tensor(
                    examples, "prompt_ids", mask_key, self.max_length, False, self.pad_to_multiple_of
                )
        return output


class EntroKTOTrainer(AssistantMaskMixin, KTOTrainer):
    """EntroPO-KTO trainer: [`~trl.KTOTrainer`] with the entropy-enhanced loss of eqs. (7-8) of the EntroPO paper.

    Log-probs are summed over the tokens of assistant turns only when `args.assistant_only` is set and the data is
    conversational (prompt `[system, issue]`, completion the rest of the trajectory), in the examples and in the
    mismatched KL samples alike. z0 is the unclamped mean by default (`z0_clamp=False`); at α = β with
    `z0_clamp=True` the trainer is TRL's KTO, loss and updates.

    Args are those of [`~trl.KTOTrainer`]; `args` must be an [`EntroKTOConfig`] (default: one with α = β).

    Logs, besides TRL's metrics: `entropo/alpha`, `entropo/z0` (the reference point used in the loss, after any clamp;
    TRL's `kl` shows the same value); `rewards/*` and `rewards/margins` in EntroPO units (`α·logp − β·ref`, or
    `β·(logp − ref)` for the reference-code variant); `entropy` over the scored (assistant) tokens.
    """

    mask_columns = MASK_COLUMNS
    _tag_names = ["trl", "kto", "entropo"]
    _name = "EntroPO-KTO"
    _paper = ENTROPO_PAPER

    def __init__(
        self,
        model,
        ref_model=None,
        args: EntroKTOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | None = None,
        data_collator=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        args = check_trainer_args(model, args, EntroKTOConfig, KTO_UNSUPPORTED, "EntroKTOTrainer", train_dataset)
        processing_class = resolve_tokenizer(model, processing_class, args, "EntroKTOTrainer")
        if data_collator is None:
            data_collator = DataCollatorForMultiTurnUnpairedPreference(
                pad_token_id=processing_class.pad_token_id,
                max_length=args.max_length,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        elif args.assistant_only:
            logger.warning(
                "A custom data_collator was passed with assistant_only=True: assistant-only masks are applied only "
                "when the collator turns the rows' 'completion_assistant_mask' / 'KL_completion_assistant_mask' into "
                "'completion_mask' / 'KL_completion_mask' (as DataCollatorForMultiTurnUnpairedPreference does)."
            )
        self.alpha = args.effective_alpha
        self.entropo_beta = args.beta
        self.z0_clamp = args.z0_clamp
        self.kto_variant = args.kto_variant
        super().__init__(
            model,
            ref_model=ref_model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )

    # ----------------------------------------------------------------------------------------------------------------
    # Dataset preparation: multi-turn conversational rows get assistant-only masks, KL samples included
    # ----------------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        first = next(iter(dataset))
        if "prompt_ids" in first:  # already tokenized (e.g. by a previous trainer or by data preparation)
            if getattr(args, "assistant_only", False) and MASK_COLUMNS[0] not in first:
                logger.warning(
                    f"The {dataset_name} dataset is already tokenized without assistant masks "
                    f"({MASK_COLUMNS[0]!r}): every completion token is trained, tool observations included. "
                    "Pass the conversational rows to get assistant-only masks."
                )
            return dataset
        if not self._uses_assistant_masks(dataset, args):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        tokenizer = processing_class
        map_kwargs: dict[str, Any] = {}
        if isinstance(dataset, Dataset):
            map_kwargs["num_proc"] = args.dataset_num_proc

        def describe(text):
            if isinstance(dataset, Dataset):
                map_kwargs["desc"] = f"{text} {dataset_name} dataset"

        with global_then_local_main_first():
            first = next(iter(dataset))
            if "prompt" not in first:
                describe("Extracting prompt from")
                dataset = dataset.map(extract_prompt, **map_kwargs)
            first = next(iter(dataset))
            if "chosen" in first and "rejected" in first:
                describe("Unpairing")
                dataset = unpair_preference_dataset(dataset, **map_kwargs)
            first = next(iter(dataset))
            if "label" not in first:
                raise ValueError(f"{dataset_name} dataset has no 'label' column (True = desirable trajectory)")

            def tokenize(example, index):
                if not isinstance(example["label"], bool):
                    raise row_error(dataset_name, index, "label", f"expected a bool, got {example['label']!r}")
                tokens = tokenize_row_completion(tokenizer, example, "completion", dataset_name, index)
                return {
                    "prompt_ids": tokens["prompt_ids"],
                    "completion_ids": tokens["completion_ids"],
                    "completion_assistant_mask": tokens["completion_mask"],
                }

            describe("Tokenizing with assistant-only masks")
            dataset = dataset.map(tokenize, with_indices=True, **map_kwargs)
            if args.max_length is not None:
                before = len(dataset) if isinstance(dataset, Dataset) else None
                describe("Dropping fully truncated examples from")
                dataset = dataset.filter(_shorter_than, fn_kwargs={"max_length": args.max_length}, **map_kwargs)
                if before is not None and len(dataset) < before:
                    logger.warning(
                        f"Dropped {before - len(dataset)} of {before} {dataset_name} rows whose prompt alone fills "
                        f"max_length={args.max_length}: they have no completion token left to train on."
                    )

            if self.calculate_KL:
                # Mismatched samples as TRL builds them: completions rotated by one within each batch, their masks too.
                def add_kl(batch):
                    for key in ("completion_ids", "completion_assistant_mask"):
                        batch[f"KL_{key}"] = [batch[key][-1]] + batch[key][:-1]
                    return batch

                describe("Extracting KL")
                dataset = dataset.map(add_kl, batched=True, batch_size=args.per_device_train_batch_size, **map_kwargs)

            if isinstance(dataset, Dataset):
                num_desirable = sum(dataset["label"])
                logger.info(
                    f"{dataset_name} dataset: {num_desirable} desirable, {len(dataset) - num_desirable} undesirable rows"
                )
        return dataset

    # ----------------------------------------------------------------------------------------------------------------
    # Loss
    # ----------------------------------------------------------------------------------------------------------------

    def _mean_across_processes(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather_for_metrics(value).mean()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        if "KL_input_ids" not in inputs:
            raise ValueError(
                "EntroKTOTrainer needs the mismatched (KL) samples in each batch: 'KL_input_ids' is missing"
            )
        if "ref_logps" in inputs and "ref_KL_logps" in inputs:
            ref_logps, ref_kl_logps = inputs["ref_logps"], inputs["ref_KL_logps"]  # cached, unscaled
        else:
            reference = self.ref_model if self.ref_model is not None else self.model
            ref_logps, ref_kl_logps = self.compute_ref_log_probs(reference, inputs)
        device = inputs["input_ids"].device
        ref_logps, ref_kl_logps = ref_logps.to(device), ref_kl_logps.to(device)
        kl_logps = self._compute_kl_logps(model, inputs)  # TRL's: the policy on the KL samples, no gradient

        alpha, beta = self.alpha, self.entropo_beta
        # Eq. (8): z0 = mean[logp(y') − (β/α)·ref(y')], averaged across processes, clamped only if asked.
        z0 = entropo_kto_z0(
            kl_logps.float(),
            ref_kl_logps.float(),
            alpha=alpha,
            beta=beta,
            clamp=self.z0_clamp,
            variant=self.kto_variant,
            reduce_fn=self._mean_across_processes,
        )
        if self.kto_variant == "paper":
            coefficient, shifted_ref = alpha, (beta / alpha) * ref_logps + z0  # TRL's logratio becomes r − z0
        else:
            coefficient, shifted_ref = beta, ref_logps + z0
        inputs["ref_logps"] = shifted_ref
        inputs.pop("ref_KL_logps", None)

        metrics = self._metrics[mode]
        # `.get`: indexing the defaultdict would leave an empty list that TRL then averages (division by zero) when
        # a batch has no example of one class
        sizes = {key: len(metrics.get(key, ())) for key in ("rewards/chosen", "rewards/rejected", "kl")}
        with swapped_attributes(self, beta=coefficient, precompute_ref_logps=True, calculate_KL=False):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        z0_value = z0.item()
        # TRL logged coefficient·(r − z0); shift back to the EntroPO reward coefficient·r.
        for key in ("rewards/chosen", "rewards/rejected"):
            if len(metrics.get(key, ())) > sizes[key]:
                metrics[key][-1] += coefficient * z0_value
        if len(metrics.get("kl", ())) > sizes["kl"]:
            metrics["kl"][-1] = z0_value
        metrics["entropo/z0"].append(z0_value)
        metrics["entropo/alpha"].append(alpha)
        return result

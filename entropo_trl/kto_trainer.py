"""EntroPO-KTO on top of TRL's `KTOTrainer` (docs/design.md, "A narrow way in").

Paper variant (eqs. 7-8), with r(y) = logp(y) − (β/α)·ref(y):

    z0 = mean over the mismatched (KL) samples of r(y'), detached, averaged across processes (unclamped by default)
    desirable:   λ+·(1 − σ(α·(r(y) − z0)))        undesirable:   λ−·(1 − σ(α·(z0 − r(y))))

TRL computes `1 − σ(β'·((logp − ref') − kl))` with `kl = clamp≥0(mean(KL_logps − ref_KL))`. The trainer computes z0
itself (one no-grad policy forward on the KL samples, exactly the forward TRL would run), then hands TRL's loss
`β' = α`, reference values `ref' = (β/α)·ref + z0` and no KL term of its own, so TRL's logratio is `r − z0` and its
clamp never applies. TRL's forward, fused LM head and metrics stay in use; the logged rewards are shifted back by α·z0
to the EntroPO reward `α·logp − β·ref`. Cached reference log-probs are stored unscaled, so they stay valid for any α.

The authors' released variant (`kto_variant="reference_code"`) is handled the same way with `β' = β`, `ref' = ref + z`.

Mismatched (KL) samples. TRL rotates completions inside each batch, which on a pool written instance by instance pairs
most rows with their own prompt (z0 then degenerates into the mean of the batch's own rewards) and needs batches of 2
or more. Here they are built with the dataset instead: the train rows are shuffled once (seeded by `args.seed`), and
row i's KL sample is row i's prompt followed by the completion of row `kl_partner[i]`, a seeded derangement across
prompts ([`kl_partners`]), so no row meets its own instance while the data holds another. z0 is still the mean over the
micro-batch's KL samples, averaged across processes; with a batch of 1 per process it rests on one sample per process:
noisy on one GPU, and, averaged over processes, what the authors trained with (LLaMA-Factory, batch size 1, also pairs
the KL samples while preparing the data). `entropo/kl_same_prompt` logs the share of KL samples that meet their own
prompt: 0 on any pool of more than one instance.
"""

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate.logging import get_logger
from datasets import Dataset, IterableDataset, concatenate_datasets
from transformers import PreTrainedTokenizerBase
from trl import KTOTrainer
from trl.data_utils import unpair_preference_dataset
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference
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
    row_error,
    single_message_completions,
    swapped_attributes,
    tokenize_like_trl,
    tokenize_row_completion,
)
from .kto_config import KTO_UNSUPPORTED, EntroKTOConfig
from .losses import entropo_kto_z0

logger = get_logger(__name__)

MASK_COLUMNS = ("completion_assistant_mask", "KL_completion_assistant_mask")


def kl_partners(prompt_keys: list, seed: int) -> list[int]:
    """For each row, the row whose completion forms its mismatched (KL) sample: never a row of the same prompt while
    the data holds another prompt. Depends on the prompts and `seed` only.

    Rows are listed prompt by prompt (prompts and rows within them in a seeded random order) and each row is paired
    with the row `m` places further round that list, `m` the largest prompt's row count: a permutation (every
    completion serves as exactly one KL sample) in which no row meets its own prompt whenever no prompt holds more
    than half of the rows. Otherwise the rows that would meet their own prompt take a seeded random row of another
    prompt instead."""
    n = len(prompt_keys)
    if n < 2:
        return list(range(n))
    rng = np.random.default_rng([seed, 0x4B4C])  # a stream of its own, not the dataset shuffle's
    groups: dict[Any, list[int]] = {}
    for index, key in enumerate(prompt_keys):
        groups.setdefault(key, []).append(index)
    members = list(groups.values())
    order, start_of = [], {}
    for g in rng.permutation(len(members)):
        start_of[prompt_keys[members[g][0]]] = len(order)
        order.extend(rng.permutation(members[g]).tolist())
    shift = max(len(m) for m in members)
    shift = 1 if shift == n else shift  # one prompt: nothing to mismatch, keep a permutation
    partners = [0] * n
    for position, index in enumerate(order):
        partners[index] = order[(position + shift) % n]
    if len(members) > 1:
        for index in range(n):
            key = prompt_keys[index]
            if prompt_keys[partners[index]] == key:  # the prompt holds more than half of the rows
                size = len(groups[key])
                partners[index] = order[(start_of[key] + size + int(rng.integers(n - size))) % n]
    return partners


def _prompt_keys(dataset: Dataset) -> list[str]:
    """A digest of each row's tokenized prompt, read in batches (the prompts are never all held as Python lists)."""
    keys = []
    for batch in dataset.select_columns(["prompt_ids"]).iter(batch_size=1024):
        for ids in batch["prompt_ids"]:
            keys.append(hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=16).hexdigest())
    return keys


def _last_run_start(mask: list[int]) -> int:
    """Where the last run of 1s of an assistant mask starts (the content of the last assistant message)."""
    end = len(mask)
    while end > 0 and not mask[end - 1]:
        end -= 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return start if end > 0 else len(mask)


def _splice_last_assistant_turn(batch: dict[str, list]) -> dict[str, list]:
    """The authors' KL sample: the row's completion up to its last assistant message (that message's header
    included), then the partner's last assistant message; only the partner's message is scored."""
    ids, masks = [], []
    for own_ids, own_mask, other_ids, other_mask in zip(
        batch["completion_ids"],
        batch["completion_assistant_mask"],
        batch["partner_completion_ids"],
        batch["partner_completion_assistant_mask"],
    ):
        own_cut, other_cut = _last_run_start(own_mask), _last_run_start(other_mask)
        ids.append(own_ids[:own_cut] + other_ids[other_cut:])
        masks.append([0] * own_cut + other_mask[other_cut:])
    return {"KL_completion_ids": ids, "KL_completion_assistant_mask": masks}


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
        if "kl_same_prompt" in examples[0]:
            output["kl_same_prompt"] = torch.tensor([example["kl_same_prompt"] for example in examples])
        return output


class EntroKTOTrainer(AssistantMaskMixin, KTOTrainer):
    """EntroPO-KTO trainer: [`~trl.KTOTrainer`] with the entropy-enhanced loss of eqs. (7-8) of the EntroPO paper.

    Log-probs are summed over the tokens of assistant turns only when `args.assistant_only` is set and the rows are
    conversational with multi-message completions (prompt `[system, issue]`, completion the rest of the trajectory),
    in the examples and in the mismatched KL samples alike. Rows whose completion is a single assistant message, and
    plain-text rows, are tokenised exactly as TRL does. z0 is the unclamped mean by default (`z0_clamp=False`); at
    α = β with `z0_clamp=True` the trainer is TRL's KTO loss, given the same KL samples. Unlike TRL, the KL samples pair rows of
    different prompts across the whole dataset (columns `kl_partner`, `kl_same_prompt`, `KL_completion_ids`), the
    train rows are shuffled once, and `per_device_train_batch_size=1` is allowed; the data must be a map-style
    `datasets.Dataset`.

    Args are those of [`~trl.KTOTrainer`]; `args` must be an [`EntroKTOConfig`] (default: one with α = β).

    Logs, besides TRL's metrics: `entropo/alpha`, `entropo/z0` (the reference point used in the loss, after any clamp;
    TRL's `kl` shows the same value); `entropo/kl_same_prompt` (the share of KL samples meeting their row's prompt);
    `rewards/*` and `rewards/margins` in EntroPO units (`α·logp − β·ref`, or
    `β·(logp − ref)` for the reference-code variant); `entropy` over the scored (assistant) tokens.
    """

    kept_columns = (*MASK_COLUMNS, "kl_same_prompt")
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
        **kwargs,
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
        # TRL builds KL samples by rotating completions inside each batch, and so refuses batch size 1 and any sampling
        # but sequential. EntroPO-KTO pairs rows across the whole dataset instead (`_add_kl_samples`), so TRL's KL
        # set-up is switched off while its constructor runs, and the KL forward passes switched back on after it.
        with swapped_attributes(args, loss_type="apo_zero_unpaired"):
            super().__init__(
                model,
                ref_model=ref_model,
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                data_collator=data_collator,
                **kwargs,
            )
        self.loss_type, self.calculate_KL = "kto", True

    # ----------------------------------------------------------------------------------------------------------------
    # Dataset preparation: multi-turn conversational rows get assistant-only masks; every row gets its KL sample
    # ----------------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        first = next(iter(dataset))
        if self._is_tokenized(first, args, dataset_name):
            if "KL_completion_ids" in first:  # prepared by an EntroKTOTrainer: its KL samples are kept
                return dataset
        elif self._uses_assistant_masks(dataset, args):
            dataset = self._tokenize_with_assistant_masks(dataset, processing_class, args, dataset_name)
        else:
            with swapped_attributes(self, calculate_KL=False):  # TRL's tokenisation, without its in-batch KL rotation
                dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return self._add_kl_samples(dataset, args, dataset_name)

    def _tokenize_with_assistant_masks(self, dataset, tokenizer, args, dataset_name):
        with global_then_local_main_first():
            dataset = ensure_prompt(dataset, args, dataset_name)
            first = next(iter(dataset))
            if "chosen" in first and "rejected" in first:
                dataset = unpair_preference_dataset(dataset, **map_options(dataset, args, dataset_name, "Unpairing"))
                first = next(iter(dataset))
            if "label" not in first:
                raise ValueError(f"{dataset_name} dataset has no 'label' column (True = desirable trajectory)")

            def tokenize(example, index):
                if not isinstance(example["label"], bool):
                    raise row_error(dataset_name, index, "label", f"expected a bool, got {example['label']!r}")
                if single_message_completions(example, ("completion",)):  # single-turn: exactly as TRL
                    tokens = tokenize_like_trl(tokenizer, example, ("completion",), dataset_name, index)
                else:
                    tokens = tokenize_row_completion(tokenizer, example, "completion", dataset_name, index)
                return {
                    "prompt_ids": tokens["prompt_ids"],
                    "completion_ids": tokens["completion_ids"],
                    "completion_assistant_mask": tokens["completion_mask"],
                }

            options = map_options(dataset, args, dataset_name, "Tokenizing with assistant-only masks")
            dataset = dataset.map(tokenize, with_indices=True, **options)
            dataset = drop_fully_truncated(dataset, args, dataset_name, logger)
            if isinstance(dataset, Dataset):
                num_desirable = sum(dataset["label"])
                logger.info(
                    f"{dataset_name} dataset: {num_desirable} desirable, {len(dataset) - num_desirable} undesirable rows"
                )
        return dataset

    def _add_kl_samples(self, dataset, args, dataset_name):
        """Shuffle the train rows once (seeded) and give every row its mismatched (KL) sample: its own prompt with the
        completion of row `kl_partner`, a row of another prompt (see [`kl_partners`]). The `reference_code` variant
        splices instead, as the authors' data preparation does: the row's own context up to its last assistant
        message, then the partner's last assistant message."""
        if not isinstance(dataset, Dataset):
            raise ValueError(
                f"EntroKTOTrainer pairs every row with a row of another prompt across the whole {dataset_name} dataset "
                "(its KL sample), which needs a map-style `datasets.Dataset`, not an IterableDataset: load the data "
                "without streaming."
            )
        with global_then_local_main_first():
            if dataset_name == "train":  # pools are written instance by instance: do not train in that order
                dataset = dataset.shuffle(seed=args.seed).flatten_indices()
            keys = _prompt_keys(dataset)
            partners = kl_partners(keys, args.seed)
            same_prompt = [int(keys[i] == keys[j]) for i, j in enumerate(partners)]
            if len(dataset) > 1 and len(set(keys)) == 1:
                logger.warning(
                    f"Every row of the {dataset_name} dataset has the same prompt: its KL samples cannot be mismatched, "
                    "so z0 is the mean reward of the batch's own completions (entropo/kl_same_prompt = 1)."
                )
            has_masks = MASK_COLUMNS[0] in dataset.column_names
            columns = ["completion_ids"] + ([MASK_COLUMNS[0]] if has_masks else [])
            partner_rows = dataset.select(partners).select_columns(columns).flatten_indices()
            partner_rows = partner_rows.rename_columns({c: f"partner_{c}" for c in columns})
            dataset = concatenate_datasets([dataset, partner_rows], axis=1)
            dataset = dataset.add_column("kl_partner", partners).add_column("kl_same_prompt", same_prompt)
            if self.kto_variant == "reference_code" and has_masks:
                dataset = dataset.map(
                    _splice_last_assistant_turn,
                    batched=True,
                    remove_columns=[f"partner_{c}" for c in columns],
                    desc=f"Building the authors' KL samples for the {dataset_name} dataset",
                )
            else:
                if self.kto_variant == "reference_code":
                    logger.warning(
                        "kto_variant='reference_code' builds each KL sample from the row's context and the partner's "
                        "last assistant message, which needs assistant masks (multi-turn conversational rows with "
                        "assistant_only=True); these rows have none, so the partner's whole completion is used."
                    )
                dataset = dataset.rename_columns({f"partner_{c}": f"KL_{c}" for c in columns})
            logger.info(
                f"{dataset_name} dataset: {len(dataset)} rows of {len(set(keys))} prompts, each paired with the "
                f"completion of a row of another prompt for its KL sample ({sum(same_prompt)} share their prompt)"
            )
        return dataset

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL's KL switch is off while its constructor runs (see `__init__`): cache the KL samples' reference too
        with swapped_attributes(self, calculate_KL=True):
            return super()._precompute_ref_logps(dataset, name, batch_size)

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
        same_prompt = inputs.pop("kl_same_prompt", None)
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
        if same_prompt is not None:  # KL samples that share their row's prompt: 0 on any pool of several instances
            metrics["entropo/kl_same_prompt"].append(
                self._mean_across_processes(same_prompt.float().to(device)).item()
            )
        return result

"""Where the docs promise TRL's behaviour, the trainers give TRL's numbers: single-turn conversational rows and plain
text rows are tokenised exactly as TRL does, with `assistant_only` left at its default (True). Side by side for three
steps at α = β, the policy moved away from the reference first."""

import random

import pytest
from datasets import Dataset
from helpers import load_model, perturbed, sentence, single_turn_pairs, training_kwargs
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from entropo_trl import EntroDPOConfig, EntroDPOTrainer, EntroKTOConfig, EntroKTOTrainer

STEPS = 3


def _text_pairs(n, seed=0):
    rng = random.Random(seed)
    return [
        {"prompt": sentence(rng, 8), "chosen": " " + sentence(rng, 6), "rejected": " " + sentence(rng, 5)}
        for _ in range(n)
    ]


def _single_turn_kto_rows(n, seed=0):
    return [
        {"prompt": p["prompt"], "completion": p["chosen"] if i % 3 else p["rejected"], "label": i % 3 != 0}
        for i, p in enumerate(single_turn_pairs(n, seed=seed))
    ]


def _text_kto_rows(n, seed=0):
    return [
        {"prompt": p["prompt"], "completion": p["chosen"] if i % 3 else p["rejected"], "label": i % 3 != 0}
        for i, p in enumerate(_text_pairs(n, seed=seed))
    ]


class _TRLWithPartners(KTOTrainer):
    """TRL's KTOTrainer, its own tokenisation and loss, with its in-batch rotation of the KL completions replaced by
    EntroKTO's dataset-level pairs (`partners`, row indices in the order TRL is given)."""

    partners = None

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        data = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        completions = data["completion_ids"]
        kl = [completions[j] for j in self.partners]
        return data.remove_columns("KL_completion_ids").add_column("KL_completion_ids", kl)


def _losses(trainer):
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == STEPS
    return logged


def _side_by_side(ours_cls, ours_config, trl_cls, trl_config, rows, trl_rows, model_dir, tokenizer, tmp_path, **ours):
    base = load_model(model_dir)
    runs = []
    for trainer_cls, config_cls, data, name, extra in (
        (ours_cls, ours_config, Dataset.from_list(rows), "ours", ours),
        (trl_cls, trl_config, trl_rows, "trl", {}),
    ):
        kwargs = training_kwargs(tmp_path / name, max_steps=STEPS, learning_rate=0.1, **extra)
        trainer = trainer_cls(
            model=perturbed(base),
            ref_model=load_model(model_dir),
            args=config_cls(**kwargs),
            train_dataset=data,
            processing_class=tokenizer,
        )
        runs.append((trainer, _losses(trainer)))
    return runs


@pytest.mark.parametrize("layout", ["conversational", "text"])
def test_dpo_matches_trl_on_single_turn_rows_with_default_masks(layout, tiny_model_dir, tokenizer, tmp_path):
    rows = single_turn_pairs(8) if layout == "conversational" else _text_pairs(8)
    (ours, ours_log), (_, trl_log) = _side_by_side(
        EntroDPOTrainer, EntroDPOConfig, DPOTrainer, DPOConfig, rows, Dataset.from_list(rows), tiny_model_dir,
        tokenizer, tmp_path,
    )  # fmt: skip
    assert ours.args.assistant_only is True
    assert max(abs(entry["loss"] - 0.6931) for entry in ours_log) > 1e-2, "policy equals reference: vacuous"
    for step, (a, b) in enumerate(zip(ours_log, trl_log), start=1):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), f"step {step}"
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5), f"step {step}"


@pytest.mark.parametrize("layout", ["conversational", "text"])
def test_kto_matches_trl_on_single_turn_rows_with_default_masks(layout, tiny_model_dir, tokenizer, tmp_path):
    """EntroKTO shuffles the train rows once with `seed` and pairs the KL samples across prompts (issue: TRL's in-batch
    rotation meets the row's own prompt); TRL is given the rows in that order and the same pairs, and tokenises and
    computes everything else itself."""
    rows = _single_turn_kto_rows(8) if layout == "conversational" else _text_kto_rows(8)
    probe = EntroKTOTrainer(
        model=load_model(tiny_model_dir),
        args=EntroKTOConfig(**training_kwargs(tmp_path / "probe")),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    _TRLWithPartners.partners = probe.train_dataset["kl_partner"]
    trl_rows = Dataset.from_list(rows).shuffle(seed=0).flatten_indices()  # EntroKTO's once-shuffled order
    (ours, ours_log), (trl, trl_log) = _side_by_side(
        EntroKTOTrainer, EntroKTOConfig, _TRLWithPartners, KTOConfig, rows, trl_rows, tiny_model_dir, tokenizer,
        tmp_path, z0_clamp=True,
    )  # fmt: skip
    assert ours.args.assistant_only is True
    assert ours.train_dataset["prompt_ids"] == trl.train_dataset["prompt_ids"]  # TRL's own tokens, in its order
    assert ours.train_dataset["completion_ids"] == trl.train_dataset["completion_ids"]
    assert ours.train_dataset["KL_completion_ids"] == trl.train_dataset["KL_completion_ids"]
    assert max(abs(entry["loss"] - 0.5) for entry in ours_log) > 1e-2, "policy equals reference: vacuous"
    for step, (a, b) in enumerate(zip(ours_log, trl_log), start=1):
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
            assert (key in a) == (key in b), f"step {step}: {key}"
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5), f"step {step}: {key}"


def test_single_turn_rows_score_the_end_of_turn_as_trl_does(tiny_model_dir, tokenizer, tmp_path):
    """TRL scores `'...<|im_end|>\\n'` for a single assistant message; multi-turn rows keep the assistant-only masks."""
    from helpers import multi_turn_pairs

    rows = single_turn_pairs(2) + multi_turn_pairs(2)
    args = EntroDPOConfig(**training_kwargs(tmp_path))
    trainer = EntroDPOTrainer(
        model=load_model(tiny_model_dir), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    data = trainer.train_dataset
    for i in range(2):
        assert tokenizer.decode(data[i]["chosen_ids"]).endswith("<|im_end|>\n")
        assert all(data[i]["chosen_assistant_mask"])
    for i in range(2, 4):  # multi-turn: observations and the closing newline are not scored
        assert not all(data[i]["chosen_assistant_mask"])
        assert data[i]["chosen_assistant_mask"][-1] == 0

import pytest
import torch
from datasets import Dataset
from helpers import load_model, manual_logps, multi_turn_pairs, perturbed, single_turn_pairs, training_kwargs
from trl import DPOConfig, DPOTrainer

from entropo_trl import EntroDPOConfig, EntroDPOTrainer, entropo_dpo_loss


def _train_one_step(trainer_cls, config_cls, policy, ref, tokenizer, rows, tmp_path, **config):
    args = config_cls(**training_kwargs(tmp_path, **config))
    trainer = trainer_cls(
        model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    trainer.train()
    return trainer


def _first_log(trainer):
    return next(entry for entry in trainer.state.log_history if "loss" in entry)


def test_matches_trl_dpo_at_alpha_equal_beta(tiny_model_dir, tokenizer, tmp_path):
    base = load_model(tiny_model_dir)
    policy = perturbed(base)
    rows = single_turn_pairs(4)
    ours = _train_one_step(
        EntroDPOTrainer,
        EntroDPOConfig,
        perturbed(base),
        load_model(tiny_model_dir),
        tokenizer,
        rows,
        tmp_path / "ours",
        assistant_only=False,
    )
    trl = _train_one_step(
        DPOTrainer, DPOConfig, perturbed(base), load_model(tiny_model_dir), tokenizer, rows, tmp_path / "trl"
    )
    ours_log, trl_log = _first_log(ours), _first_log(trl)
    assert abs(ours_log["loss"] - torch.log(torch.tensor(2.0)).item()) > 1e-3, "policy was not moved off the reference"
    assert ours_log["loss"] == pytest.approx(trl_log["loss"], abs=1e-5)
    moved = 0.0
    for (name, p_ours), (_, p_trl), p_start in zip(
        ours.model.named_parameters(), trl.model.named_parameters(), policy.parameters()
    ):
        torch.testing.assert_close(p_ours, p_trl, atol=1e-5, rtol=0, msg=name)
        moved = max(moved, (p_ours - p_start).abs().max().item())
    assert moved > 1e-4, "the step did not change the parameters"
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "entropy"):
        assert ours_log[key] == pytest.approx(trl_log[key], abs=1e-5), key
    assert ours_log["entropo/alpha"] == pytest.approx(0.1)


def _batch(trainer, indices):
    examples = [trainer.train_dataset[i] for i in indices]
    return trainer._prepare_inputs(trainer.data_collator(examples))


def test_real_trajectories_logps_are_assistant_token_sums(tmp_path):
    """On real SWE-smith trajectories the trainer's per-sequence log-probs are sums over exactly the assistant tokens,
    and its loss at alpha=0.11, beta=0.1 is eq. (6) of those sums."""
    from helpers import swesmith_rows

    from entropo_trl.multiturn import assistant_token_mask
    from entropo_trl.testing import build_tiny_model, build_tiny_tokenizer

    rows = swesmith_rows()
    corpus = [m["content"] for row in rows for m in row["prompt"] + row["completion"]]
    tokenizer = build_tiny_tokenizer("qwen3", corpus=corpus, vocab_size=4000)
    build_tiny_model(tokenizer).save_pretrained(tmp_path / "base")
    base = load_model(tmp_path / "base")
    pairs = []
    for row in rows:
        completion = row["completion"]
        earlier = [i for i, m in enumerate(completion[:-1]) if m["role"] == "assistant"]
        rejected = completion[: earlier[-1] + 1] if earlier else completion  # a shorter real continuation
        pairs.append({"prompt": row["prompt"], "chosen": completion, "rejected": rejected})
    args = EntroDPOConfig(**training_kwargs(tmp_path / "out", alpha=0.11, per_device_train_batch_size=1))
    trainer = EntroDPOTrainer(
        model=perturbed(base),
        ref_model=load_model(tmp_path / "base"),
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
    )
    policy_copy = perturbed(base)
    for index, pair in enumerate(pairs):
        batch = _batch(trainer, [index])
        # the completion mask is the assistant mask of the full conversation
        ids, mask = assistant_token_mask(tokenizer, pair["prompt"] + pair["chosen"])
        n_chosen = int(batch["attention_mask"][0].sum())
        assert batch["input_ids"][0, :n_chosen].tolist() == ids
        assert batch["completion_mask"][0, :n_chosen].tolist() == mask
        mode = "train" if trainer.model.training else "eval"
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
        logged = trainer._metrics[mode]
        policy = manual_logps(policy_copy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        ref = manual_logps(trainer.ref_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        assert logged["logps/chosen"][-1] == pytest.approx(policy[0].item(), abs=2e-3)
        assert logged["logps/rejected"][-1] == pytest.approx(policy[1].item(), abs=2e-3)
        expected, chosen_reward, _ = entropo_dpo_loss(policy[:1], policy[1:], ref[:1], ref[1:], alpha=0.11, beta=0.1)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-4)
        assert logged["rewards/chosen"][-1] == pytest.approx(chosen_reward.item(), abs=1e-3)
        # TRL's entropy metric, computed on assistant tokens only
        with torch.no_grad():
            logits = policy_copy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        scored = batch["completion_mask"][:, 1:].bool()
        assert logged["entropy"][-1] == pytest.approx(entropy[scored].mean().item(), abs=1e-4)


def test_multi_turn_with_gradient_checkpointing_trains_assistant_tokens(tiny_model_dir, tokenizer, tmp_path):
    base = load_model(tiny_model_dir)
    start = perturbed(base)
    trainer = _train_one_step(
        EntroDPOTrainer,
        EntroDPOConfig,
        perturbed(base),
        load_model(tiny_model_dir),
        tokenizer,
        multi_turn_pairs(4),
        tmp_path,
        alpha=0.11,
        activation_checkpointing=True,
    )
    log = _first_log(trainer)
    assert log["entropo/alpha"] == pytest.approx(0.11)
    assert log["rewards/margins"] == pytest.approx(log["rewards/chosen"] - log["rewards/rejected"], abs=1e-4)
    changed = [(p - q).abs().max().item() for p, q in zip(trainer.model.parameters(), start.parameters())]
    assert max(changed) > 1e-4


def test_peft_lora_without_reference_model(tiny_model_dir, tokenizer, tmp_path):
    from peft import LoraConfig

    args = EntroDPOConfig(
        **training_kwargs(tmp_path, alpha=0.11, learning_rate=0.05, optim="adamw_torch", per_device_train_batch_size=4)
    )
    trainer = EntroDPOTrainer(
        model=load_model(tiny_model_dir),
        args=args,
        train_dataset=Dataset.from_list(multi_turn_pairs(4)),
        processing_class=tokenizer,
        # a non-zero adapter from the start, so that the policy differs from the reference (the base model)
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    assert trainer.ref_model is None
    batch = _batch(trainer, [0, 1, 2, 3])  # the first step's batch holds every row
    args_ = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    ref = manual_logps(load_model(tiny_model_dir), *args_)[:4]  # the reference: the adapter switched off
    policy = manual_logps(trainer.model, *args_)[:4]
    assert (policy - ref).abs().max() > 0.1  # policy != reference
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert before and all(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    log = _first_log(trainer)
    assert log["logps/chosen"] == pytest.approx(policy.mean().item(), abs=2e-3)
    # EntroPO rewards: alpha * logp - beta * ref, with the reference from the base model
    assert log["rewards/chosen"] == pytest.approx(0.11 * policy.mean().item() - 0.1 * ref.mean().item(), abs=2e-3)


def test_precomputed_reference_is_reused_across_alphas(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    """The cache holds unscaled reference log-probs; a second run with another alpha reuses it and gets the
    alpha-correct loss."""
    base = load_model(tiny_model_dir)
    # The cache lives next to a file-backed dataset (an in-memory one gets a fresh temporary cache file each time).
    Dataset.from_list(multi_turn_pairs(2)).save_to_disk(tmp_path / "data")
    dataset = Dataset.load_from_disk(tmp_path / "data")
    calls = {"n": 0}
    original = EntroDPOTrainer.compute_ref_log_probs

    def counting(self, model, inputs):
        calls["n"] += 1
        return original(self, model, inputs)

    monkeypatch.setattr(EntroDPOTrainer, "compute_ref_log_probs", counting)
    losses = {}
    for alpha in (0.1, 0.13):
        calls["n"] = 0
        args = EntroDPOConfig(**training_kwargs(tmp_path / str(alpha), alpha=alpha, precompute_ref_log_probs=True))
        trainer = EntroDPOTrainer(
            model=perturbed(base),
            ref_model=load_model(tiny_model_dir),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        precompute_calls = calls["n"]
        batch = next(iter(trainer.get_train_dataloader()))
        assert "ref_chosen_logps" in batch
        policy = manual_logps(perturbed(base), batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        ref = manual_logps(base, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        torch.testing.assert_close(batch["ref_chosen_logps"], ref[:2], atol=2e-3, rtol=0)  # cached unscaled
        trainer.train()
        assert calls["n"] == precompute_calls, "the training step recomputed reference log-probs"
        losses[alpha] = (precompute_calls, _first_log(trainer)["loss"])
        expected, _, _ = entropo_dpo_loss(policy[:2], policy[2:], ref[:2], ref[2:], alpha=alpha, beta=0.1)
        assert losses[alpha][1] == pytest.approx(expected.mean().item(), abs=1e-4)
    assert losses[0.1][0] > 0 and losses[0.13][0] == 0, "the second run did not reuse the cache"
    assert losses[0.1][1] != pytest.approx(losses[0.13][1], abs=1e-4)


@pytest.mark.parametrize(
    "option, value",
    [
        ("loss_type", ["ipo"]),
        ("ld_alpha", 0.5),
        ("f_divergence_type", "js_divergence"),
        ("use_weighting", True),
        ("label_smoothing", 0.1),
        ("sync_ref_model", True),
        ("loss_weights", [1.0]),
        ("discopop_tau", 0.1),
        ("f_alpha_divergence_coef", 0.9),
        ("label_smoothing_factor", 0.1),
    ],
)
def test_unsupported_options_raise_naming_them(option, value, tmp_path, tiny_model_dir, tokenizer):
    with pytest.raises(ValueError, match=option):
        EntroDPOConfig(**training_kwargs(tmp_path, **{option: value}))
    # set after the config was built: the trainer's construction still refuses it
    args = EntroDPOConfig(**training_kwargs(tmp_path))
    setattr(args, option, value)
    with pytest.raises(ValueError, match=option):
        EntroDPOTrainer(
            model=load_model(tiny_model_dir),
            args=args,
            train_dataset=Dataset.from_list(single_turn_pairs(2)),
            processing_class=tokenizer,
        )


def test_invalid_alpha_raises_and_small_alpha_warns(tmp_path):
    for bad in (0.0, -0.1, float("inf"), True):
        with pytest.raises(ValueError, match="alpha"):
            EntroDPOConfig(**training_kwargs(tmp_path, alpha=bad))
    with pytest.warns(UserWarning, match="alpha"):
        EntroDPOConfig(**training_kwargs(tmp_path, alpha=0.05))


def test_plain_dpo_config_is_refused(tiny_model_dir, tokenizer, tmp_path):
    with pytest.raises(TypeError, match="EntroDPOConfig"):
        EntroDPOTrainer(
            model=load_model(tiny_model_dir),
            args=DPOConfig(**training_kwargs(tmp_path)),
            train_dataset=Dataset.from_list(single_turn_pairs(2)),
            processing_class=tokenizer,
        )


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda row: row.update(rejected=[]), r"row 1, field 'rejected': empty"),
        (
            lambda row: row.update(chosen=[{"role": "user", "content": "only an observation"}]),
            r"row 1, field 'chosen'.*assistant",
        ),
        (lambda row: row.update(prompt=[]), r"row 1, field 'prompt': empty"),
    ],
)
def test_malformed_rows_raise_with_row_and_field(mutate, message, tiny_model_dir, tokenizer, tmp_path):
    rows = multi_turn_pairs(3)
    mutate(rows[1])
    with pytest.raises(ValueError, match=message):
        EntroDPOTrainer(
            model=load_model(tiny_model_dir),
            args=EntroDPOConfig(**training_kwargs(tmp_path)),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )


def test_missing_column_raises(tiny_model_dir, tokenizer, tmp_path):
    rows = [{k: v for k, v in row.items() if k != "rejected"} for row in multi_turn_pairs(2)]
    with pytest.raises(ValueError, match="rejected"):
        EntroDPOTrainer(
            model=load_model(tiny_model_dir),
            args=EntroDPOConfig(**training_kwargs(tmp_path)),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )


def test_prepared_dataset_is_accepted_as_is(tiny_model_dir, tokenizer, tmp_path):
    """A dataset one trainer already tokenized (with assistant masks) can be handed to another trainer unchanged, e.g.
    to sweep alpha without tokenizing the trajectories again."""
    rows = multi_turn_pairs(3)
    first = EntroDPOTrainer(
        model=load_model(tiny_model_dir),
        ref_model=load_model(tiny_model_dir),
        args=EntroDPOConfig(**training_kwargs(tmp_path / "a")),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    prepared = first.train_dataset
    assert {"prompt_ids", "chosen_ids", "chosen_assistant_mask"} <= set(prepared.column_names)
    second = EntroDPOTrainer(
        model=load_model(tiny_model_dir),
        ref_model=load_model(tiny_model_dir),
        args=EntroDPOConfig(**training_kwargs(tmp_path / "b", alpha=0.12)),
        train_dataset=prepared,
        processing_class=tokenizer,
    )
    assert second.train_dataset[:] == prepared[:]
    batch = _batch(second, [0, 1])
    assert "chosen_assistant_mask" not in batch  # folded into the completion mask by the collator
    second.train()
    assert second.state.global_step == 1


@pytest.mark.parametrize("max_length, mode", [(None, "keep_start"), (200, "keep_start"), (200, "keep_end")])
def test_collated_masks_are_the_assistant_masks_of_the_kept_tokens(
    tiny_model_dir, tokenizer, tmp_path, max_length, mode
):
    """Each row's completion_mask is the assistant mask of its conversation, on exactly the tokens the collator
    kept (untruncated, or cut to max_length from either end)."""
    from entropo_trl.multiturn import assistant_token_mask

    pairs = multi_turn_pairs(3)
    args = EntroDPOConfig(**training_kwargs(tmp_path, max_length=max_length, truncation_mode=mode))
    trainer = EntroDPOTrainer(
        model=load_model(tiny_model_dir),
        ref_model=load_model(tiny_model_dir),
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
    )
    checked = 0
    for index, pair in enumerate(pairs):
        batch = _batch(trainer, [index])
        for row, key in enumerate(("chosen", "rejected")):
            ids, mask = assistant_token_mask(tokenizer, pair["prompt"] + pair[key])
            n = int(batch["attention_mask"][row].sum())
            assert max_length is None and n == len(ids) or n == min(max_length or n, len(ids))
            kept = slice(len(ids) - n, None) if mode == "keep_end" and n < len(ids) else slice(0, n)
            assert batch["input_ids"][row, :n].tolist() == ids[kept]
            assert batch["completion_mask"][row, :n].tolist() == mask[kept]
            assert sum(mask[kept]) > 0
            checked += 1
    assert checked == 6


def test_pad_token_option_is_honoured_and_checked(tiny_model_dir, tmp_path, caplog):
    from entropo_trl.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer("qwen3")  # a fresh one: the trainer sets its pad token
    data = Dataset.from_list(multi_turn_pairs(2))
    model = load_model(tiny_model_dir)
    args = EntroDPOConfig(**training_kwargs(tmp_path, pad_token="<|im_end|>"))
    trainer = EntroDPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    assert trainer.processing_class.pad_token == "<|im_end|>"
    assert trainer.data_collator.pad_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        EntroDPOTrainer(
            model=model,
            args=EntroDPOConfig(**training_kwargs(tmp_path, pad_token="<not-a-token>")),
            train_dataset=data,
            processing_class=tokenizer,
        )
    # a dataset tokenized without assistant masks trains every completion token: said, not silent
    tokenized = trainer.train_dataset.remove_columns(["chosen_assistant_mask", "rejected_assistant_mask"])
    EntroDPOTrainer(model=model, args=args, train_dataset=tokenized, processing_class=tokenizer)
    assert "without assistant masks" in caplog.text

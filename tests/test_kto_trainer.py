import pytest
import torch
from datasets import Dataset
from helpers import load_model, manual_logps, multi_turn_kto_rows, perturbed, training_kwargs
from trl import KTOConfig, KTOTrainer

from entropo_trl import EntroKTOConfig, EntroKTOTrainer, assistant_token_mask, entropo_kto_loss, entropo_kto_z0


def single_turn_kto_rows(n=4, seed=0):
    import random

    from helpers import sentence

    rng = random.Random(seed)
    return [
        {
            "prompt": [{"role": "user", "content": sentence(rng, 8)}],
            "completion": [{"role": "assistant", "content": sentence(rng, rng.randint(4, 10))}],
            "label": i % 2 == 0,
        }
        for i in range(n)
    ]


def _train(trainer_cls, config_cls, policy, ref, tokenizer, rows, out, **config):
    args = config_cls(**training_kwargs(out, **config))
    trainer = trainer_cls(
        model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    trainer.train()
    return trainer


def _first_log(trainer):
    return next(entry for entry in trainer.state.log_history if "loss" in entry)


class _TRLOnPreparedRows(KTOTrainer):
    """TRL's own KTOTrainer on the rows an EntroKTOTrainer prepared (same order, same KL samples): only TRL's in-batch
    rotation of the KL completions is skipped, everything it computes from the rows is TRL's."""

    prepared = None

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return self.prepared


@pytest.mark.parametrize("moved", ["policy", "reference"])
def test_matches_trl_kto_with_clamp_at_alpha_equal_beta(tiny_model_dir, tokenizer, tmp_path, moved):
    """Moving the policy gives TRL a negative KL (clamped to 0); moving the reference a positive one (used as is).
    TRL trains on the rows as EntroKTOTrainer prepared them, so both see the same KL samples."""
    base = load_model(tiny_model_dir)
    if moved == "policy":
        make_policy, make_ref = (lambda: perturbed(base)), (lambda: load_model(tiny_model_dir))
    else:
        make_policy, make_ref = (lambda: load_model(tiny_model_dir)), (lambda: perturbed(base, scale=0.3))
    start = make_policy()
    rows = single_turn_kto_rows(4)
    ours = _train(
        EntroKTOTrainer,
        EntroKTOConfig,
        make_policy(),
        make_ref(),
        tokenizer,
        rows,
        tmp_path / "ours",
        assistant_only=False,
        z0_clamp=True,
        per_device_train_batch_size=4,
    )
    _TRLOnPreparedRows.prepared = ours.train_dataset
    trl = _train(
        _TRLOnPreparedRows,
        KTOConfig,
        make_policy(),
        make_ref(),
        tokenizer,
        rows,
        tmp_path / "trl",
        per_device_train_batch_size=4,
    )
    ours_log, trl_log = _first_log(ours), _first_log(trl)
    assert ours_log["entropo/kl_same_prompt"] == 0.0
    assert abs(ours_log["loss"] - 0.5) > 1e-3, "policy equals reference: the comparison would be vacuous"
    if moved == "reference":
        assert trl_log["kl"] > 0.1, "this case must exercise a positive (unclamped) KL"
    assert ours_log["loss"] == pytest.approx(trl_log["loss"], abs=1e-5)
    moved = 0.0
    for (name, p_ours), (_, p_trl), p_start in zip(
        ours.model.named_parameters(), trl.model.named_parameters(), start.parameters()
    ):
        torch.testing.assert_close(p_ours, p_trl, atol=1e-5, rtol=0, msg=name)
        moved = max(moved, (p_ours - p_start).abs().max().item())
    assert moved > 1e-4
    for key in ("rewards/chosen", "rewards/rejected", "kl", "entropy"):
        assert ours_log[key] == pytest.approx(trl_log[key], abs=1e-5), key


def _trainer(model, ref, tokenizer, rows, out, **config):
    args = EntroKTOConfig(**training_kwargs(out, **config))
    return EntroKTOTrainer(
        model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )


def _kl_batch_manual(trainer, policy, ref, alpha, beta):
    batch = next(iter(trainer.get_train_dataloader()))
    kl = manual_logps(policy, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
    ref_kl = manual_logps(ref, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
    logps = manual_logps(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    ref_logps = manual_logps(ref, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    return batch, kl, ref_kl, logps, ref_logps


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0)], ids=["desirable", "undesirable"])
def test_unclamped_default_keeps_gradients_on_long_trajectories(tiny_model_dir, tokenizer, tmp_path, weights):
    """alpha=0.11, beta=0.1, trajectories of a few hundred assistant tokens: the default (no clamp) gives non-zero
    gradients for desirable and for undesirable examples; clamping z0 at 0 makes them vanish."""
    base = load_model(tiny_model_dir)
    rows = multi_turn_kto_rows(4, turns=4, words=40)
    grad_norms = {}
    for clamp in (False, True):
        trainer = _trainer(
            perturbed(base, scale=0.01),
            load_model(tiny_model_dir),
            tokenizer,
            rows,
            tmp_path / str(clamp),
            alpha=0.11,
            z0_clamp=clamp,
            per_device_train_batch_size=4,
            desirable_weight=weights[0],
            undesirable_weight=weights[1],
        )
        batch = next(iter(trainer.get_train_dataloader()))
        assert int(batch["completion_mask"].sum(1).min()) > 200, (
            "trajectories must have a few hundred assistant tokens"
        )
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grad_norms[clamp] = torch.sqrt(
            sum((p.grad**2).sum() for p in trainer.model.parameters() if p.grad is not None)
        )
        z0 = trainer._metrics["train"]["entropo/z0"][-1]
        if clamp:
            assert z0 == 0.0
        else:
            assert z0 < -10, "z0 should be the large negative unclamped mean"
    assert grad_norms[False] > 1e-3
    assert grad_norms[True] < 1e-3 * grad_norms[False]


def test_logged_z0_is_the_unclamped_mean_of_the_kl_samples(tiny_model_dir, tokenizer, tmp_path):
    base = load_model(tiny_model_dir)
    alpha, beta = 0.11, 0.1
    trainer = _trainer(
        perturbed(base),
        load_model(tiny_model_dir),
        tokenizer,
        multi_turn_kto_rows(4, turns=3, words=30),
        tmp_path,
        alpha=alpha,
        per_device_train_batch_size=4,
    )
    batch, kl, ref_kl, logps, ref_logps = _kl_batch_manual(trainer, perturbed(base), base, alpha, beta)
    trainer.train()
    log = _first_log(trainer)
    expected_z0 = (kl - beta / alpha * ref_kl).mean().item()
    assert expected_z0 < -1
    assert log["entropo/z0"] == pytest.approx(expected_z0, abs=1e-3)
    assert log["kl"] == pytest.approx(expected_z0, abs=1e-3)
    losses, rewards = entropo_kto_loss(logps, ref_logps, batch["label"], expected_z0, alpha=alpha, beta=beta)
    assert log["loss"] == pytest.approx(losses.mean().item(), abs=1e-4)
    labels = batch["label"].bool()
    assert log["rewards/chosen"] == pytest.approx(rewards[labels].mean().item(), abs=1e-3)
    assert log["rewards/rejected"] == pytest.approx(rewards[~labels].mean().item(), abs=1e-3)


def test_reference_code_variant_matches_the_authors_formula(tiny_model_dir, tokenizer, tmp_path):
    base = load_model(tiny_model_dir)
    alpha, beta = 0.105, 0.1
    # a strongly moved reference gives a positive z (the authors clamp it at 0)
    trainer = _trainer(
        load_model(tiny_model_dir),
        perturbed(base, scale=0.6),
        tokenizer,
        multi_turn_kto_rows(4),
        tmp_path,
        alpha=alpha,
        kto_variant="reference_code",
        per_device_train_batch_size=4,
    )
    ref = perturbed(base, scale=0.6)
    batch, kl, ref_kl, logps, ref_logps = _kl_batch_manual(trainer, base, ref, alpha, beta)
    trainer.train()
    log = _first_log(trainer)
    z = entropo_kto_z0(kl, ref_kl, alpha=alpha, beta=beta, variant="reference_code")
    assert z.item() > 0.1
    assert log["entropo/z0"] == pytest.approx(z.item(), abs=1e-3)
    losses, _ = entropo_kto_loss(logps, ref_logps, batch["label"], z, alpha=alpha, beta=beta, variant="reference_code")
    assert log["loss"] == pytest.approx(losses.mean().item(), abs=1e-4)


def test_real_trajectories_logps_are_assistant_token_sums(tmp_path):
    from helpers import swesmith_rows

    from entropo_trl.testing import build_tiny_model, build_tiny_tokenizer

    rows = [{**row, "label": i != 1} for i, row in enumerate(swesmith_rows())]
    corpus = [m["content"] for row in rows for m in row["prompt"] + row["completion"]]
    tokenizer = build_tiny_tokenizer("qwen3", corpus=corpus, vocab_size=4000)
    build_tiny_model(tokenizer).save_pretrained(tmp_path / "base")
    base = load_model(tmp_path / "base")
    trainer = _trainer(
        perturbed(base),
        load_model(tmp_path / "base"),
        tokenizer,
        [{k: r[k] for k in ("prompt", "completion", "label")} for r in rows],
        tmp_path / "out",
        alpha=0.11,
        per_device_train_batch_size=3,
    )
    batch, kl, ref_kl, logps, ref_logps = _kl_batch_manual(trainer, perturbed(base), base, 0.11, 0.1)
    for i, row in enumerate(trainer.train_dataset):  # the rows in training order (shuffled once)
        ids, mask = assistant_token_mask(tokenizer, row["prompt"] + row["completion"])
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, :n].tolist() == ids and batch["completion_mask"][i, :n].tolist() == mask
    trainer.train()
    log = _first_log(trainer)
    labels = batch["label"].bool()
    assert log["logps/chosen"] == pytest.approx(logps[labels].mean().item(), abs=2e-3)
    assert log["logps/rejected"] == pytest.approx(logps[~labels].mean().item(), abs=2e-3)
    z0 = (kl - 0.1 / 0.11 * ref_kl).mean().item()
    assert log["entropo/z0"] == pytest.approx(z0, abs=2e-3)


def test_peft_lora_without_reference_model(tiny_model_dir, tokenizer, tmp_path):
    from peft import LoraConfig

    args = EntroKTOConfig(**training_kwargs(tmp_path, alpha=0.11, learning_rate=0.05, optim="adamw_torch"))
    trainer = EntroKTOTrainer(
        model=load_model(tiny_model_dir),
        args=args,
        train_dataset=Dataset.from_list(multi_turn_kto_rows(4)),
        processing_class=tokenizer,
        # a non-zero adapter from the start, so that the policy differs from the reference (the base model)
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    assert trainer.ref_model is None
    base = load_model(tiny_model_dir)  # the reference: the policy with its adapter switched off
    _, kl, ref_kl, _, _ = _kl_batch_manual(trainer, trainer.model, base, 0.11, 0.1)
    assert (kl - ref_kl).abs().max() > 0.1  # policy != reference
    expected_z0 = (kl - 0.1 / 0.11 * ref_kl).mean().item()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert before and all(not torch.equal(before[n], after[n]) for n in before)
    # z0 = mean[logp(KL samples) - (beta/alpha) ref], the reference computed with the adapter switched off
    assert expected_z0 < -1.0
    assert _first_log(trainer)["entropo/z0"] == pytest.approx(expected_z0, rel=1e-3)


def test_precomputed_reference_is_reused_across_alphas(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    base = load_model(tiny_model_dir)
    Dataset.from_list(multi_turn_kto_rows(4)).save_to_disk(tmp_path / "data")
    dataset = Dataset.load_from_disk(tmp_path / "data")
    calls = {"n": 0}
    original = EntroKTOTrainer.compute_ref_log_probs

    def counting(self, model, inputs):
        calls["n"] += 1
        return original(self, model, inputs)

    monkeypatch.setattr(EntroKTOTrainer, "compute_ref_log_probs", counting)
    counts = []
    for alpha in (0.1, 0.13):
        calls["n"] = 0
        args = EntroKTOConfig(**training_kwargs(tmp_path / str(alpha), alpha=alpha, precompute_ref_log_probs=True))
        trainer = EntroKTOTrainer(
            model=perturbed(base),
            ref_model=load_model(tiny_model_dir),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        counts.append(calls["n"])
        batch, kl, ref_kl, logps, ref_logps = _kl_batch_manual(trainer, perturbed(base), base, alpha, 0.1)
        torch.testing.assert_close(batch["ref_logps"], ref_logps, atol=2e-3, rtol=0)  # cached unscaled
        trainer.train()
        assert calls["n"] == counts[-1], "the training step recomputed reference log-probs"
        z0 = entropo_kto_z0(kl, ref_kl, alpha=alpha, beta=0.1)
        losses, _ = entropo_kto_loss(logps, ref_logps, batch["label"], z0, alpha=alpha, beta=0.1)
        assert _first_log(trainer)["loss"] == pytest.approx(losses.mean().item(), abs=1e-4)
    assert counts[0] > 0 and counts[1] == 0, "the second run did not reuse the cache"


@pytest.mark.parametrize(
    "option, value",
    [("loss_type", "apo_zero_unpaired"), ("sync_ref_model", True), ("label_smoothing_factor", 0.1)],
)
def test_unsupported_options_raise_naming_them(option, value, tmp_path, tiny_model_dir, tokenizer):
    with pytest.raises(ValueError, match=option):
        EntroKTOConfig(**training_kwargs(tmp_path, **{option: value}))
    args = EntroKTOConfig(**training_kwargs(tmp_path))
    setattr(args, option, value)
    with pytest.raises(ValueError, match=option):
        EntroKTOTrainer(
            model=load_model(tiny_model_dir),
            args=args,
            train_dataset=Dataset.from_list(single_turn_kto_rows(2)),
            processing_class=tokenizer,
        )


def test_invalid_config_values_raise(tmp_path):
    with pytest.raises(ValueError, match="kto_variant"):
        EntroKTOConfig(**training_kwargs(tmp_path, kto_variant="authors"))
    with pytest.raises(ValueError, match="alpha"):
        EntroKTOConfig(**training_kwargs(tmp_path, alpha=-1.0))
    with pytest.warns(UserWarning, match="alpha"):
        EntroKTOConfig(**training_kwargs(tmp_path, alpha=0.09))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda row: row.update(completion=[]), r"row 2, field 'completion': empty"),
        (
            lambda row: row.update(completion=[{"role": "user", "content": "obs"}]),
            r"row 2, field 'completion'.*assistant",
        ),
        (lambda row: row.update(label=None), r"row 2, field 'label'"),
    ],
)
def test_malformed_rows_raise_with_row_and_field(mutate, message, tiny_model_dir, tokenizer, tmp_path):
    rows = multi_turn_kto_rows(4)
    mutate(rows[2])
    with pytest.raises(ValueError, match=message):
        _trainer(load_model(tiny_model_dir), load_model(tiny_model_dir), tokenizer, rows, tmp_path)


def test_missing_label_column_raises(tiny_model_dir, tokenizer, tmp_path):
    rows = [{k: v for k, v in row.items() if k != "label"} for row in multi_turn_kto_rows(2)]
    with pytest.raises(ValueError, match="label"):
        _trainer(load_model(tiny_model_dir), load_model(tiny_model_dir), tokenizer, rows, tmp_path)


def test_kl_samples_use_assistant_masks(tiny_model_dir, tokenizer, tmp_path):
    trainer = _trainer(
        load_model(tiny_model_dir),
        load_model(tiny_model_dir),
        tokenizer,
        multi_turn_kto_rows(4),
        tmp_path,
        per_device_train_batch_size=4,
    )
    data = trainer.train_dataset
    batch = next(iter(trainer.get_train_dataloader()))
    # the KL sample of row i is row i's prompt, then row kl_partner[i]'s completion with its assistant mask
    for i in range(4):
        j = data[i]["kl_partner"]
        assert j != i
        kl = batch["KL_completion_mask"][i].bool() & batch["KL_attention_mask"][i].bool()
        expected = [t for t, m in zip(data[j]["completion_ids"], data[j]["completion_assistant_mask"]) if m]
        assert batch["KL_input_ids"][i][kl].tolist() == expected
        n = len(data[i]["prompt_ids"])
        assert batch["KL_input_ids"][i][:n].tolist() == data[i]["prompt_ids"]
        assert 0 < int(kl.sum()) < int(batch["KL_attention_mask"][i].sum()) // 2


def test_batches_of_one_class_log_without_error(tiny_model_dir, tokenizer, tmp_path):
    """Every batch desirable-only: the class with no example must not leave an empty metric list behind (TRL would
    average it: division by zero at logging)."""
    rows = [dict(r, label=True) for r in multi_turn_kto_rows(4)]
    args = EntroKTOConfig(**training_kwargs(tmp_path, alpha=0.11, max_steps=2, per_device_train_batch_size=2))
    trainer = EntroKTOTrainer(
        model=perturbed(load_model(tiny_model_dir)),
        ref_model=load_model(tiny_model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("rewards/rejected" not in entry for entry in logged)
    assert all("entropo/z0" in entry for entry in logged)


@pytest.mark.parametrize("max_length", [None, 200])
def test_collated_masks_are_the_assistant_masks_of_the_kept_tokens(tiny_model_dir, tokenizer, tmp_path, max_length):
    rows = multi_turn_kto_rows(4)
    args = EntroKTOConfig(**training_kwargs(tmp_path, max_length=max_length))
    trainer = EntroKTOTrainer(
        model=load_model(tiny_model_dir),
        ref_model=load_model(tiny_model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    for index, row in enumerate(trainer.train_dataset):  # the rows in training order (shuffled once)
        ids, mask = assistant_token_mask(tokenizer, row["prompt"] + row["completion"])
        n = int(batch["attention_mask"][index].sum())
        assert n == (len(ids) if max_length is None else min(max_length, len(ids)))
        assert batch["input_ids"][index, :n].tolist() == ids[:n]  # KTO keeps the start
        assert batch["completion_mask"][index, :n].tolist() == mask[:n] and sum(mask[:n]) > 0

import math

import pytest
import torch
from datasets import Dataset
from trl import KTOConfig, KTOTrainer

from entropo_trl import EntroKTOConfig, EntroKTOTrainer

from conftest import load_model, multi_turn_kto_rows, perturbed, training_kwargs


def single_turn_kto_rows(n=4, seed=0):
    import random

    from conftest import sentence

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


@pytest.mark.parametrize("moved", ["policy", "reference"])
def test_matches_trl_kto_with_clamp_at_alpha_equal_beta(tiny_model_dir, tokenizer, tmp_path, moved):
    """Moving the policy gives TRL a negative KL (clamped to 0); moving the reference a positive one (used as is)."""
    base = load_model(tiny_model_dir)
    if moved == "policy":
        make_policy, make_ref = (lambda: perturbed(base)), (lambda: load_model(tiny_model_dir))
    else:
        make_policy, make_ref = (lambda: load_model(tiny_model_dir)), (lambda: perturbed(base, scale=0.3))
    start = make_policy()
    rows = single_turn_kto_rows(4)
    ours = _train(
        EntroKTOTrainer, EntroKTOConfig, make_policy(), make_ref(), tokenizer, rows,
        tmp_path / "ours", assistant_only=False, z0_clamp=True,
    )
    trl = _train(KTOTrainer, KTOConfig, make_policy(), make_ref(), tokenizer, rows, tmp_path / "trl")
    ours_log, trl_log = _first_log(ours), _first_log(trl)
    print(ours_log, trl_log)
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

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from entropo_trl import EntroDPOConfig, EntroDPOTrainer, entropo_dpo_loss

from conftest import load_model, multi_turn_pairs, perturbed, single_turn_pairs, training_kwargs


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
        EntroDPOTrainer, EntroDPOConfig, perturbed(base), load_model(tiny_model_dir), tokenizer, rows,
        tmp_path / "ours", assistant_only=False,
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

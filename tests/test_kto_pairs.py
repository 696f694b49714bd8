"""EntroPO-KTO's mismatched (KL) samples, paired at the dataset level: every row meets a row of another instance."""

import random

import pytest
import torch
from datasets import Dataset
from helpers import load_model, manual_logps, perturbed, prompt_of, training_kwargs, trajectory

from entropo_trl import EntroKTOConfig, EntroKTOTrainer, entropo_kto_loss
from entropo_trl.data.builders import build_kto_rows
from entropo_trl.data.trajectory import Trajectory
from entropo_trl.kto_trainer import kl_partners


@pytest.mark.parametrize("seed", range(40))
def test_kl_partners_never_share_a_prompt_when_another_exists(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 6) for _ in range(rng.randint(2, 7))]
    keys = [f"prompt-{g}" for g, size in enumerate(sizes) for _ in range(size)]
    rng.shuffle(keys)
    partners = kl_partners(keys, seed=seed)
    assert len(partners) == len(keys)
    assert all(keys[i] != keys[j] for i, j in enumerate(partners))
    if max(sizes) <= len(keys) / 2:  # then every completion serves as exactly one KL sample
        assert sorted(partners) == list(range(len(keys)))
    assert kl_partners(keys, seed=seed) == partners  # seeded: reproducible


def test_kl_partners_edge_cases():
    assert kl_partners([], seed=0) == []
    assert kl_partners(["a"], seed=0) == [0]
    one_prompt = kl_partners(["a"] * 5, seed=0)  # nothing to mismatch: a permutation without fixed points
    assert sorted(one_prompt) == list(range(5)) and all(i != j for i, j in enumerate(one_prompt))
    keys = ["a"] * 9 + ["b"]  # one prompt holds most rows: all of them still meet "b"
    assert all(keys[j] != keys[i] for i, j in enumerate(kl_partners(keys, seed=3)))
    draws = {tuple(kl_partners(["a", "a", "b", "b", "c", "c", "d", "d"], seed=s)) for s in range(20)}
    assert len(draws) > 1, "the pairing must depend on the seed"


def _pool(instances=4, per_instance=4, seed=0):
    rng = random.Random(seed)
    trajectories = []
    for k in range(instances):
        prompt = prompt_of(rng)
        for j in range(per_instance):
            trajectories.append(
                Trajectory(
                    instance_id=f"repo__issue-{k}",
                    messages=prompt + trajectory(rng, turns=2, words=8),
                    reward=float(j % 2 == 0),
                    finished=True,
                )
            )
    return trajectories


def _kto_trainer(model, ref, tokenizer, rows, out, **config):
    args = EntroKTOConfig(**training_kwargs(out, **config))
    return EntroKTOTrainer(
        model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )


def test_pool_rows_are_shuffled_once_and_paired_across_instances(tiny_model_dir, tokenizer, tmp_path):
    rows = list(build_kto_rows(_pool()))
    assert [r["instance_id"] for r in rows] == sorted(r["instance_id"] for r in rows)  # written instance by instance
    trainers = [
        _kto_trainer(load_model(tiny_model_dir), None, tokenizer, rows, tmp_path / str(seed), seed=seed)
        for seed in (0, 0, 1)
    ]
    data = trainers[0].train_dataset
    order = data["instance_id"]
    assert order != [r["instance_id"] for r in rows], "training must not run instance by instance"
    assert sorted(order) == sorted(r["instance_id"] for r in rows)
    assert all(order[i] != order[j] for i, j in enumerate(data["kl_partner"]))
    assert data["kl_same_prompt"] == [0] * len(rows)
    assert sorted(data["kl_partner"]) == list(range(len(rows)))  # each completion is one KL sample
    same_seed = trainers[1].train_dataset
    assert same_seed["instance_id"] == order and same_seed["kl_partner"] == data["kl_partner"]
    other_seed = trainers[2].train_dataset
    assert (other_seed["instance_id"], other_seed["kl_partner"]) != (order, data["kl_partner"])


def _sequence(prompt_ids, completion_ids, completion_mask):
    ids = torch.tensor([prompt_ids + completion_ids])
    mask = torch.tensor([[0] * len(prompt_ids) + completion_mask])
    return ids, torch.ones_like(ids), mask


def _row_logps(model, data, i, completion_row):
    """logp of row i's prompt followed by row `completion_row`'s completion, over that completion's assistant tokens."""
    ids, attention, mask = _sequence(
        data[i]["prompt_ids"],
        data[completion_row]["completion_ids"],
        data[completion_row]["completion_assistant_mask"],
    )
    return manual_logps(model, ids, attention, mask)[0]


@pytest.mark.parametrize("batch_size", [4, 1])
def test_loss_and_z0_equal_a_hand_computation_over_the_declared_partners(
    tiny_model_dir, tokenizer, tmp_path, batch_size
):
    """Batch 4, and batch 1 (which TRL's KTOTrainer refuses): the first logged step against logps computed here from
    full logits, row by row, with each row's KL sample built from its declared `kl_partner`."""
    alpha, beta = 0.11, 0.1
    base = load_model(tiny_model_dir)
    rows = list(build_kto_rows(_pool()))
    trainer = _kto_trainer(
        perturbed(base), base, tokenizer, rows, tmp_path, alpha=alpha, per_device_train_batch_size=batch_size
    )
    data, policy = trainer.train_dataset, perturbed(load_model(tiny_model_dir))
    batch = range(batch_size)  # sequential sampling over the (once shuffled) dataset
    kl = torch.stack([_row_logps(policy, data, i, data[i]["kl_partner"]) for i in batch])
    ref_kl = torch.stack([_row_logps(base, data, i, data[i]["kl_partner"]) for i in batch])
    logps = torch.stack([_row_logps(policy, data, i, i) for i in batch])
    ref_logps = torch.stack([_row_logps(base, data, i, i) for i in batch])
    labels = torch.tensor([data[i]["label"] for i in batch])

    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "loss" in entry)
    z0 = (kl - beta / alpha * ref_kl).mean()  # eq. (8), unclamped
    losses, _ = entropo_kto_loss(logps, ref_logps, labels, z0, alpha=alpha, beta=beta)
    assert abs(z0.item()) > 1.0
    assert log["entropo/z0"] == pytest.approx(z0.item(), abs=1e-4)
    assert log["loss"] == pytest.approx(losses.mean().item(), abs=1e-4)
    assert log["entropo/kl_same_prompt"] == 0.0
    moved = max((p - q).abs().max().item() for p, q in zip(trainer.model.parameters(), policy.parameters()))
    assert moved > 1e-4


def test_reference_code_kl_sample_is_own_context_then_the_partners_last_message(tiny_model_dir, tokenizer, tmp_path):
    rows = list(build_kto_rows(_pool()))
    trainer = _kto_trainer(
        load_model(tiny_model_dir), None, tokenizer, rows, tmp_path, alpha=0.105, kto_variant="reference_code"
    )
    data = trainer.train_dataset
    for i in range(len(data)):
        own, partner = data[i], data[data[i]["kl_partner"]]
        scored = [t for t, m in zip(own["KL_completion_ids"], own["KL_completion_assistant_mask"]) if m]
        assert tokenizer.decode(scored) == partner["completion"][-1]["content"] + "<|im_end|>"
        # the context: the row's own completion up to its last assistant message's header, unscored
        context = own["KL_completion_ids"][: own["KL_completion_assistant_mask"].index(1)]
        assert own["completion_ids"][: len(context)] == context
        assert tokenizer.decode(context).endswith(
            own["completion"][-2]["content"] + "<|im_end|>\n<|im_start|>assistant\n"
        )

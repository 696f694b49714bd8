"""Run by tests/test_multiprocess.py under `torchrun --nproc_per_node 2` (CPU, gloo): one EntroKTO step where each
process sees a different batch; every rank writes its local z0 (computed by hand) and the z0 the trainer logged."""

import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset

# run as a script: its folder (tests/) is first on the module path, so `helpers` imports as in the tests
from helpers import load_model, manual_logps, multi_turn_kto_rows, perturbed, training_kwargs  # noqa: E402

from entropo_trl import EntroKTOConfig, EntroKTOTrainer  # noqa: E402
from entropo_trl.testing import build_tiny_model, build_tiny_tokenizer  # noqa: E402


def main(workdir: str) -> None:
    workdir = Path(workdir)
    rank = int(os.environ["RANK"])
    tokenizer = build_tiny_tokenizer("qwen3")
    model_dir = workdir / "model"
    if rank == 0:
        build_tiny_model(tokenizer).save_pretrained(model_dir)
    torch.distributed.init_process_group("gloo") if not torch.distributed.is_initialized() else None
    torch.distributed.barrier()
    base = load_model(model_dir)
    # rows of very different lengths so the two processes' local z0 differ
    rows = multi_turn_kto_rows(2, seed=1, turns=2, words=8) + multi_turn_kto_rows(2, seed=2, turns=5, words=40)
    args = EntroKTOConfig(**training_kwargs(workdir / "out", alpha=0.11, per_device_train_batch_size=2))
    trainer = EntroKTOTrainer(
        model=perturbed(base),
        ref_model=load_model(model_dir),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    policy, ref = perturbed(base), base
    kl = manual_logps(policy, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
    ref_kl = manual_logps(ref, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
    local_z0 = (kl - 0.1 / 0.11 * ref_kl).mean().item()
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "entropo/z0" in entry)["entropo/z0"]
    world = trainer.accelerator.num_processes
    (workdir / f"rank{rank}.json").write_text(json.dumps({"local_z0": local_z0, "logged_z0": logged, "world": world}))
    # Tear the process group down before exit: a gloo group left to the interpreter's shutdown can abort the process
    # ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

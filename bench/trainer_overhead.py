"""Benchmark: EntroPO trainers' overhead over TRL's, and the peak memory of a long multi-turn step.

    python bench/trainer_overhead.py            # both parts (about 15 minutes on a 2-core CPU)
    python bench/trainer_overhead.py --part time
    python bench/trainer_overhead.py --part memory --tokens 4096,16384 --vocab 151936

Step time: EntroDPO vs DPO and EntroKTO vs KTO at alpha == beta, on the same tiny model and multi-turn data, measured
side by side in one run (interleaved rounds, median step time after warm-up), reported as the median over rounds\nof each round's ratio.

Peak memory: one EntroDPO training step on a pair of multi-turn trajectories of `--tokens` tokens each, with a
`--vocab`-token LM head, run in a fresh subprocess and measured as the growth of the process's peak resident memory
over its footprint before the step. Full fp32 logits for one such sequence would take tokens x vocab x 4 bytes.
Two lengths show how the step's memory grows with the trajectory. The pair has equal lengths (no padding), so CPU
attention takes PyTorch's memory-efficient kernel; TRL's fused LM head on CPU works on 4,096-token x 32,768-vocab
fp32 tiles (about 0.5 GiB each, a few alive at once), bounded whatever the length.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402

from entropo_trl import EntroDPOConfig, EntroDPOTrainer, EntroKTOConfig, EntroKTOTrainer  # noqa: E402
from entropo_trl.multiturn import assistant_token_mask  # noqa: E402
from entropo_trl.testing import build_tiny_model, build_tiny_tokenizer  # noqa: E402

WORDS = "the test fails because parse returns None so we edit the file and run pytest again src module fix".split()


def _text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _trajectory(rng, turns, words):
    messages = []
    for t in range(turns):
        messages.append({"role": "assistant", "content": _text(rng, words) + "\n<function=execute_bash>\n</function>"})
        if t < turns - 1:
            messages.append({"role": "user", "content": "Exit code: 0\n" + _text(rng, 3 * words)})
    return messages


def _prompt(rng):
    return [{"role": "system", "content": "You are a programming agent."}, {"role": "user", "content": _text(rng, 30)}]


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def _common_args(out, steps, batch):
    return dict(
        output_dir=out,
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=1e-4,
        bf16=False,
        activation_checkpointing=False,
        report_to="none",
        logging_steps=10_000,
        save_strategy="no",
        max_length=None,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def time_part(steps: int, rounds: int, warmup: int) -> dict:
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer("qwen3")
    workdir = tempfile.mkdtemp()
    build_tiny_model(tokenizer, hidden_size=128, num_layers=2, vocab_size=32768).save_pretrained(workdir)
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(workdir, dtype=torch.float32)

    rng = random.Random(0)
    pairs = [
        {"prompt": _prompt(rng), "chosen": _trajectory(rng, 3, 20), "rejected": _trajectory(rng, 3, 20)}
        for _ in range(steps * 4)
    ]
    kto_rows = [{"prompt": p["prompt"], "completion": p["chosen"], "label": i % 2 == 0} for i, p in enumerate(pairs)]
    # alpha == beta (alpha=None) and assistant_only=False: both trainers score the same tokens, so the ratio is the
    # subclass's own overhead.
    setups = {
        "DPO": (DPOTrainer, DPOConfig, {}, pairs),
        "EntroDPO": (EntroDPOTrainer, EntroDPOConfig, {"assistant_only": False}, pairs),
        "KTO": (KTOTrainer, KTOConfig, {}, kto_rows),
        "EntroKTO": (EntroKTOTrainer, EntroKTOConfig, {"assistant_only": False, "z0_clamp": True}, kto_rows),
    }
    step_times = {name: [] for name in setups}
    ratios = {"EntroDPO/DPO": [], "EntroKTO/KTO": []}
    for _ in range(rounds):  # interleaved rounds: each pair is compared under the same machine load
        medians = {}
        for name, (cls, cfg, extra, rows) in setups.items():
            timer = StepTimer()
            trainer = cls(
                model=load(),
                ref_model=load(),
                args=cfg(**_common_args(workdir + "/o", steps, 2), **extra),
                train_dataset=Dataset.from_list(rows),
                processing_class=tokenizer,
                callbacks=[timer],
            )
            trainer.train()
            step_times[name].extend(timer.times[warmup:])
            medians[name] = statistics.median(timer.times[warmup:])
        ratios["EntroDPO/DPO"].append(medians["EntroDPO"] / medians["DPO"])
        ratios["EntroKTO/KTO"].append(medians["EntroKTO"] / medians["KTO"])
    return {
        "median_step_s": {name: statistics.median(times) for name, times in step_times.items()},
        **{name: statistics.median(values) for name, values in ratios.items()},
        "per_round_ratios": ratios,
        "measured_steps_per_trainer": len(step_times["DPO"]),
    }


def _status_gib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: peak since the last reset), in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset the peak-RSS mark (Linux >= 4.0), so the peak measured is the step's own. ru_maxrss cannot be used: it
    keeps the parent's high-water mark across fork + exec."""
    Path("/proc/self/clear_refs").write_text("5")


def memory_child(tokens: int, vocab: int) -> dict:
    tokenizer = build_tiny_tokenizer("qwen3")
    workdir = tempfile.mkdtemp()
    build_tiny_model(tokenizer, hidden_size=64, num_layers=2, vocab_size=vocab).save_pretrained(workdir)
    from transformers import AutoModelForCausalLM

    rng = random.Random(0)
    prompt = _prompt(rng)
    final = {"role": "assistant", "content": "done\n<function=finish>\n</function>"}

    def render(blocks):
        messages = [m for block in blocks for m in block] + [final]
        ids, mask = assistant_token_mask(tokenizer, prompt + messages)
        return messages, ids, mask

    # (assistant, observation) blocks: estimate how many reach `tokens`, then add one at a time until they do
    blocks = [_trajectory(rng, 2, 60)[:2] for _ in range(4)]
    base, per_block = len(render([])[1]), (len(render(blocks)[1]) - len(render([])[1])) / 4
    blocks += [_trajectory(rng, 2, 60)[:2] for _ in range(max(0, int((tokens - base) / per_block) - 4))]
    chosen, ids, mask = render(blocks)
    while len(ids) < tokens:
        blocks.append(_trajectory(rng, 2, 60)[:2])
        chosen, ids, mask = render(blocks)
    # The rejected trajectory holds the same turns in another order: same length, different sequence. Equal lengths
    # mean no padding, so PyTorch's CPU attention takes its memory-efficient (flash) kernel; a padded batch falls back
    # to the math kernel, whose seq x seq attention weights would dominate the measurement (see --padded).
    shuffled = blocks[:]
    random.Random(1).shuffle(shuffled)
    rejected = [m for block in shuffled for m in block] + [final]
    n_rejected = len(assistant_token_mask(tokenizer, prompt + rejected)[0])
    args = EntroDPOConfig(**_common_args(workdir + "/o", 1, 1), alpha=0.11)
    trainer = EntroDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(workdir, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(workdir, dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": prompt, "chosen": chosen, "rejected": rejected}]),
        processing_class=tokenizer,
    )
    _reset_peak()
    before = _status_gib("VmRSS")
    start = time.perf_counter()
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "train_loss" in entry)
    return {
        "tokens_chosen": len(ids),
        "tokens_rejected": n_rejected,
        "assistant_tokens_chosen": sum(mask),
        "vocab": vocab,
        "rss_before_step_gib": before,
        "peak_rss_gib": _status_gib("VmHWM"),
        "step_growth_gib": _status_gib("VmHWM") - before,
        "step_seconds": time.perf_counter() - start,
        "loss": log["train_loss"],
        "full_fp32_logits_one_sequence_gib": len(ids) * vocab * 4 / 2**30,
    }


def memory_part(tokens: list[int], vocab: int) -> list[dict]:
    """One fresh process per length, so each peak is that step's alone."""
    results = []
    for n in tokens:
        command = [sys.executable, __file__, "--part", "memory-child", "--tokens", str(n), "--vocab", str(vocab)]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"the memory measurement failed:\n{out.stderr[-4000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "time", "memory", "memory-child"], default="all")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tokens", default="4096,16384", help="comma-separated trajectory lengths (memory part)")
    parser.add_argument("--vocab", type=int, default=151936)
    cli = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if cli.part == "memory-child":
        print(json.dumps(memory_child(int(cli.tokens), cli.vocab)))
        return
    results = {"torch": torch.__version__, "device": "cpu", "threads": torch.get_num_threads()}
    if cli.part in ("all", "time"):
        results["step_time"] = time_part(cli.steps, cli.rounds, cli.warmup)
    if cli.part in ("all", "memory"):
        results["memory"] = memory_part([int(n) for n in cli.tokens.split(",")], cli.vocab)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

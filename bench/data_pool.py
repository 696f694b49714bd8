"""Benchmark: streaming a large trajectory pool, and the cost of assistant-only masks.

    python bench/data_pool.py                      # 10k vs 40k pool + tokenisation (about 12 minutes, ~3 GB of disk)
    python bench/data_pool.py --part tokenize

Pool streaming: synthetic pools of 10,000 and 40,000 trajectories of realistic size (30 assistant turns, ~60 KB of
JSON each, like the SWE-smith and R2E-Gym files) are written with `write_trajectories`, then streamed through
`read_trajectories` + `build_kto_rows` in a fresh process each; the peak resident memory of the two runs is compared
(it must not grow with the pool: ratio <= 1.2).

Tokenisation: `assistant_token_mask` (assistant-only masks located by rendering the chat template in short windows,
checked against the full rendering) against a plain `tokenizer.apply_chat_template(messages, tokenize=True)` on the
same trajectories, side by side in one run: speed ratio mask / plain at 30, 100 and 200 assistant turns per trajectory
(`--turns`; the authors run up to 100 agent steps for pools and 200 at test time), targets >= 0.7 at 100 turns and
>= 0.5 at 200. The tokenizer is Qwen's real one (`QWEN_TOKENIZER`, from the real-data fixtures when they sit beside
the repository, with TRL's `qwen3_instruct_2507` chat template), for real token counts; without the fixtures, a tiny
trained BPE tokenizer with the same template (about 3 times as many tokens, so the encoding weighs more and the ratio
comes out a little higher).
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from entropo_trl.data.builders import build_kto_rows  # noqa: E402
from entropo_trl.data.readers import ReadStats, read_trajectories  # noqa: E402
from entropo_trl.data.trajectory import Trajectory, write_trajectories
from entropo_trl.multiturn import assistant_token_mask  # noqa: E402

QWEN_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen-tokenizer"

WORDS = (
    "def return self test assert import pytest file line error value the fix patch module class None True "
    "False raise except parse config path run output"
).split()


def _text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def synthetic_trajectory(rng: random.Random, index: int, turns: int = 30) -> Trajectory:
    messages = [
        {"role": "system", "content": "You are a programming agent. " + _text(rng, 300)},
        {"role": "user", "content": "<github_issue>\n" + _text(rng, 250) + "\n</github_issue>"},
    ]
    for t in range(turns):
        call = (
            "<function=finish>\n<parameter=command>submit</parameter>\n</function>"
            if t == turns - 1
            else f"<function=execute_bash>\n<parameter=cmd>pytest -x tests/test_{t}.py</parameter>\n</function>"
        )
        messages.append({"role": "assistant", "content": _text(rng, 40) + "\n\n" + call})
        if t < turns - 1:
            lines = "\n".join(_text(rng, 12) for _ in range(rng.randint(4, 40)))
            messages.append(
                {
                    "role": "user",
                    "content": f"Exit code: 1\nExecution output of [execute_bash]:\n{lines}"
                    f"\nSteps Remaining: {99 - t}",
                }
            )
    return Trajectory(
        instance_id=f"repo__name-{index % 500}",
        messages=messages,
        reward=float(rng.random() < 0.3),
        finished=True,
        num_steps=turns,
        source="synthetic",
        episode_id=str(index),
    )


def make_pool(path: Path, count: int, seed: int = 0) -> float:
    rng = random.Random(seed)
    # 200 distinct trajectories, re-labelled: generating 40k random texts would dominate the run
    templates = [synthetic_trajectory(rng, i) for i in range(200)]

    def records():
        for i in range(count):
            t = templates[i % len(templates)]
            yield Trajectory(
                **{
                    **t.__dict__,
                    "instance_id": f"repo__name-{i % 2000}",
                    "episode_id": str(i),
                    "reward": float((i * 7919) % 10 < 3),
                }
            )

    write_trajectories(path, records())
    return path.stat().st_size / 2**30


def _peak_mib() -> float:
    """Peak RSS since the last reset (VmHWM), MiB. ru_maxrss would include the parent's mark from before the exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not in /proc/self/status")


def stream_child(path: str) -> dict:
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to this process's own footprint
    start = time.perf_counter()
    stats = ReadStats()
    rows = build_kto_rows(read_trajectories(path, stats=stats))
    count = sum(1 for _ in rows)
    return {
        "rows": count,
        "read": stats.read,
        "seconds": time.perf_counter() - start,
        "peak_rss_mib": _peak_mib(),
        "desirable": rows.stats.extra["desirable"],
        "undesirable": rows.stats.extra["undesirable"],
    }


def stream_part(sizes: list[int], workdir: Path) -> dict:
    results = {}
    for size in sizes:
        path = workdir / f"pool_{size}.jsonl"
        gib = make_pool(path, size)
        out = subprocess.run(
            [sys.executable, __file__, "--part", "stream-child", "--pool", str(path)], capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-4000:])
        results[size] = {"pool_gib": gib, **json.loads(out.stdout.strip().splitlines()[-1])}
        path.unlink()
    small, large = min(sizes), max(sizes)
    results["peak_rss_ratio_large_over_small"] = results[large]["peak_rss_mib"] / results[small]["peak_rss_mib"]
    return results


def bench_tokenizer():
    """Qwen's real tokenizer with TRL's Qwen3 chat template, or (without the fixtures) the tiny test tokenizer."""
    from entropo_trl.testing import build_tiny_tokenizer, chat_template

    if not (QWEN_TOKENIZER / "tokenizer.json").exists():
        print(
            f"note: Qwen's tokenizer not found at {QWEN_TOKENIZER}; using a tiny trained BPE tokenizer (more tokens "
            "per trajectory than the real one)",
            file=sys.stderr,
        )
        return build_tiny_tokenizer("qwen3")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(QWEN_TOKENIZER))
    tokenizer.chat_template = chat_template("qwen3_instruct_2507")
    return tokenizer


def tokenize_part(tokenizer, count: int, rounds: int, turns: int = 30) -> dict:
    """Seconds per round for plain tokenisation and for `assistant_token_mask` on `count` synthetic trajectories of
    `turns` assistant turns (median of `rounds`), and their ratio."""
    rng = random.Random(1)
    conversations = [synthetic_trajectory(rng, i, turns).messages for i in range(count)]
    plain_times, masked_times = [], []
    for _ in range(rounds):
        plain = masked = 0.0
        for messages in conversations:  # both on each trajectory in turn, so that they see the same machine load
            start = time.perf_counter()
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            middle = time.perf_counter()
            masked_ids, _ = assistant_token_mask(tokenizer, messages)
            masked += time.perf_counter() - middle
            plain += middle - start
            assert masked_ids == ids, "masked tokenisation must give the plain token ids"
        plain_times.append(plain)
        masked_times.append(masked)
    tokens = len(ids)
    plain, masked = statistics.median(plain_times), statistics.median(masked_times)
    return {
        "tokenizer": tokenizer.name_or_path,
        "trajectories": count,
        "assistant_turns": turns,
        "tokens_per_trajectory": tokens,
        "plain_s": plain,
        "assistant_mask_s": masked,
        "speed_ratio_mask_over_plain": plain / masked,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "stream", "tokenize", "stream-child"], default="all")
    parser.add_argument("--sizes", default="10000,40000")
    parser.add_argument("--pool")
    parser.add_argument("--trajectories", type=int, default=100, help="tokenisation part")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--turns", default="30,100,200", help="tokenisation part: assistant turns per trajectory, e.g. 30,100,200"
    )
    cli = parser.parse_args()
    if cli.part == "stream-child":
        print(json.dumps(stream_child(cli.pool)))
        return
    results = {}
    if cli.part in ("all", "tokenize"):
        tokenizer = bench_tokenizer()
        turns = [int(t) for t in cli.turns.split(",")]
        results["tokenize"] = [tokenize_part(tokenizer, cli.trajectories, cli.rounds, t) for t in turns]
    if cli.part in ("all", "stream"):
        workdir = Path(tempfile.mkdtemp(prefix="entropo-pool-"))
        try:
            results["stream"] = stream_part([int(s) for s in cli.sizes.split(",")], workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Shared test helpers (tiny models, hand-computed log-probs, synthetic and real conversations). Tests import them
from here; `conftest.py` holds only the fixtures and the offline environment."""

import copy
import json
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
SWESMITH = FIXTURES / "swesmith_trajectories.jsonl"


def load_swesmith():
    if not SWESMITH.exists():
        pytest.skip(f"real trajectories not found at {SWESMITH} (../shared/fixtures is absent)")
    with SWESMITH.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def perturbed(model, scale=0.05, seed=1):
    """A copy of `model` moved away from it (at initialisation every DPO variant gives log 2)."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


def training_kwargs(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        bf16=False,
        activation_checkpointing=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        max_length=None,
        seed=0,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return kwargs


WORDS = (
    "the test fails because parse returns None instead of raising ValueError so we edit the file and run pytest again "
    "looking at src module config path line error fix patch diff repository issue function argument"
).split()


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def single_turn_pairs(n=4, seed=0):
    import random

    rng = random.Random(seed)
    return [
        {
            "prompt": [{"role": "user", "content": sentence(rng, 8)}],
            "chosen": [{"role": "assistant", "content": sentence(rng, rng.randint(4, 10))}],
            "rejected": [{"role": "assistant", "content": sentence(rng, rng.randint(4, 10))}],
        }
        for _ in range(n)
    ]


def trajectory(rng, turns, words=12):
    """`turns` assistant turns, each followed by an observation except the last (which calls finish)."""
    messages = []
    for t in range(turns):
        call = (
            "<function=finish>\n</function>"
            if t == turns - 1
            else ("<function=execute_bash>\n<parameter=cmd>" + sentence(rng, 3) + "</parameter>\n</function>")
        )
        messages.append({"role": "assistant", "content": sentence(rng, words) + "\n" + call})
        if t < turns - 1:
            messages.append(
                {"role": "user", "content": "Exit code: 0\n" + sentence(rng, 2 * words) + "\nSteps Remaining: 9"}
            )
    return messages


def prompt_of(rng):
    return [
        {"role": "system", "content": "You are a programming agent. " + sentence(rng, 6)},
        {"role": "user", "content": "Issue: " + sentence(rng, 12)},
    ]


def multi_turn_pairs(n=4, seed=0, turns=3, words=12):
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        rows.append(
            {
                "prompt": prompt_of(rng),
                "chosen": trajectory(rng, turns, words),
                "rejected": trajectory(rng, turns, words),
            }
        )
    return rows


def multi_turn_kto_rows(n=4, seed=0, turns=3, words=12):
    import random

    rng = random.Random(seed)
    return [
        {"prompt": prompt_of(rng), "completion": trajectory(rng, turns, words), "label": i % 2 == 0} for i in range(n)
    ]


def manual_logps(model, input_ids, attention_mask, completion_mask):
    """Σ log π(token) over the positions where `completion_mask` is 1, from full logits (independent of TRL)."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    per_token = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (per_token * completion_mask[:, 1:]).sum(-1)


def swesmith_rows(max_chars=8000):
    """Real trajectories cut after the last assistant turn that fits in `max_chars` of completion (at least two
    assistant turns are kept, so the rows stay multi-turn): a tiny model on CPU cannot attend over the full 60-200k
    characters."""
    rows = []
    for record in load_swesmith():
        messages = record["messages"]
        prompt, rest = messages[:2], messages[2:]
        assistant_ends = [i + 1 for i, m in enumerate(rest) if m["role"] == "assistant"]
        total, end = 0, assistant_ends[0]
        for i, message in enumerate(rest):
            total += len(message["content"])
            if total > max_chars:
                break
            if message["role"] == "assistant":
                end = max(end, i + 1)
        completion = rest[:end]
        if len(completion) == 1 and len(assistant_ends) > 1:  # keep it multi-turn: two turns, each message clipped
            completion = [dict(m, content=m["content"][: max_chars // 4]) for m in rest[: assistant_ends[1]]]
        rows.append({"instance_id": record["instance_id"], "prompt": prompt, "completion": completion})
    return rows


def wandb_offline_history(folder) -> dict[str, list[dict]]:
    """The history rows of every offline W&B run under `folder` (its `wandb/offline-run-*-ID` folders), by run id,
    read from the runs' `.wandb` files: W&B's append-only record log (7-byte file header, 32 KiB blocks of
    records with a 7-byte header: CRC, length, type full / first / middle / last) of `Record` protobufs."""
    import struct

    from wandb.proto import wandb_internal_pb2

    def records(data: bytes):
        assert data[:4] == b":W&B", "not a W&B run file"
        position, pending = 7, b""
        while position + 7 <= len(data):
            left = 32768 - position % 32768
            _, length, kind = struct.unpack("<IHB", data[position : position + 7])
            if left < 7 or (length == 0 and kind == 0):  # block padding
                position += left
                continue
            chunk = data[position + 7 : position + 7 + length]
            position += 7 + length
            if kind == 1:
                yield chunk
            elif kind in (2, 3):
                pending += chunk
            elif kind == 4:
                yield pending + chunk
                pending = b""

    history: dict[str, list[dict]] = {}
    for path in sorted(Path(folder).glob("**/wandb/offline-run-*/run-*.wandb")):
        run_id = path.stem.removeprefix("run-")
        for raw in records(path.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "history":
                items = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                history.setdefault(run_id, []).append(items)
    return history

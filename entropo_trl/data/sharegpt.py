"""LLaMA-Factory ShareGPT export and import, so users of the EntroPO authors' pipeline can move data both ways.

Layouts (the authors' LLaMA-Factory fork; `from` / `value` messages, roles `system`, `human`, `gpt`, `observation`):

- SFT: `{"conversations": [system, human, gpt, human, ..., gpt]}`
- DPO: `{"conversations": [system, human], "chosen": [gpt, human, ..., gpt], "rejected": [gpt, ...]}`; the fork
  accepts lists for `chosen` / `rejected` (multi-turn); upstream LLaMA-Factory accepts a single message there, so
  multi-turn pairs need the fork.
- KTO: `{"conversations": [system, human, ..., gpt], "kto_tag": true}`

Tool observations are `user` messages in R2E-Gym and SWE-smith trajectories and become `human` turns, as the authors
export them; `tool` messages become `observation`. [`sharegpt_dataset_info`] writes the matching
`dataset_info.json` entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

TO_SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}
FROM_SHAREGPT = {
    "system": "system",
    "human": "human",
    "gpt": "gpt",
    "observation": "observation",
    "function_call": "gpt",
}
_ROLE = {"system": "system", "human": "user", "gpt": "assistant", "observation": "tool", "function_call": "assistant"}


def _to(messages: list[dict[str, Any]], where: str) -> list[dict[str, str]]:
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in TO_SHAREGPT:
            raise ValueError(f"{where}[{i}].role: cannot export role {role!r} to ShareGPT")
        if message.get("tool_calls"):
            raise ValueError(f"{where}[{i}].tool_calls: structured tool calls have no ShareGPT text to export")
        out.append({"from": TO_SHAREGPT[role], "value": message.get("content") or ""})
    return out


def _from(turns: Any, where: str) -> list[dict[str, str]]:
    if isinstance(turns, dict):
        turns = [turns]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: expected a non-empty list of ShareGPT turns, got {turns!r:.80}")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"{where}[{i}]: expected {{'from', 'value'}}, got {turn!r:.80}")
        if turn["from"] not in _ROLE:
            raise ValueError(f"{where}[{i}].from: unknown ShareGPT role {turn['from']!r}")
        if not isinstance(turn["value"], str):
            raise ValueError(f"{where}[{i}].value: expected a string, got {type(turn['value']).__name__}")
        out.append({"role": _ROLE[turn["from"]], "content": turn["value"]})
    return out


def to_sharegpt(row: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """One builder row (SFT `messages`, DPO `prompt`/`chosen`/`rejected`, KTO `prompt`/`completion`/`label`) as a
    ShareGPT row. Other columns (e.g. `instance_id`) are kept."""
    where = f"row {index}"
    # `label` becomes `kto_tag` for KTO rows; SFT and verifier rows keep it as a column
    kto = "completion" in row and "label" in row
    extra = {
        k: v
        for k, v in row.items()
        if k not in ("messages", "prompt", "chosen", "rejected", "completion") and not (kto and k == "label")
    }
    if "messages" in row:
        return {"conversations": _to(row["messages"], f"{where}.messages"), **extra}
    if "chosen" in row and "rejected" in row:
        return {
            "conversations": _to(row["prompt"], f"{where}.prompt"),
            "chosen": _to(row["chosen"], f"{where}.chosen"),
            "rejected": _to(row["rejected"], f"{where}.rejected"),
            **extra,
        }
    if "completion" in row and "label" in row:
        if not isinstance(row["label"], bool):
            raise ValueError(f"{where}.label: expected true/false, got {row['label']!r}")
        conversations = _to(row["prompt"], f"{where}.prompt") + _to(row["completion"], f"{where}.completion")
        return {"conversations": conversations, "kto_tag": row["label"], **extra}
    raise ValueError(
        f"{where}: not an SFT ('messages'), DPO ('prompt', 'chosen', 'rejected') or KTO "
        f"('prompt', 'completion', 'label') row; keys: {sorted(row)}"
    )


def from_sharegpt(row: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """One ShareGPT row back to this library's layout: DPO when it has `chosen` / `rejected`, KTO when it has
    `kto_tag`, SFT otherwise. A separate `system` column is put in front as a system message."""
    where = f"row {index}"
    if "conversations" not in row:
        raise ValueError(f"{where}: no 'conversations' column (keys: {sorted(row)})")
    messages = _from(row["conversations"], f"{where}.conversations")
    if row.get("system") and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": row["system"]}] + messages
    extra = {k: v for k, v in row.items() if k not in ("conversations", "chosen", "rejected", "kto_tag", "system")}
    if "chosen" in row or "rejected" in row:
        return {
            "prompt": messages,
            "chosen": _from(row.get("chosen"), f"{where}.chosen"),
            "rejected": _from(row.get("rejected"), f"{where}.rejected"),
            **extra,
        }
    if "kto_tag" in row:
        if not isinstance(row["kto_tag"], bool):
            raise ValueError(
                f"{where}.kto_tag: expected true/false (LLaMA-Factory treats anything else as SFT), "
                f"got {row['kto_tag']!r}"
            )
        end = next((i + 1 for i, m in enumerate(messages) if m["role"] == "user"), 0)
        return {"prompt": messages[:end], "completion": messages[end:], "label": row["kto_tag"], **extra}
    return {"messages": messages, **extra}


def export_sharegpt(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for index, row in enumerate(rows):
        yield to_sharegpt(row, index)


def import_sharegpt(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for index, row in enumerate(rows):
        yield from_sharegpt(row, index)


def sharegpt_dataset_info(name: str, file_name: str, kind: str) -> dict[str, Any]:
    """The `dataset_info.json` entry for an exported file; `kind` is `"sft"`, `"dpo"` or `"kto"`."""
    columns = {"messages": "conversations"}
    entry: dict[str, Any] = {"file_name": file_name, "formatting": "sharegpt"}
    if kind == "dpo":
        entry["ranking"] = True
        columns.update(chosen="chosen", rejected="rejected")
    elif kind == "kto":
        columns["kto_tag"] = "kto_tag"
    elif kind != "sft":
        raise ValueError(f"kind must be 'sft', 'dpo' or 'kto', got {kind!r}")
    entry["columns"] = columns
    return {name: entry}

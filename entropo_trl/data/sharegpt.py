"""LLaMA-Factory ShareGPT export and import, so users of the EntroPO authors' pipeline can move data both ways.

Layouts (the authors' LLaMA-Factory fork; `from` / `value` messages, roles `system`, `human`, `gpt`, `observation`):

- SFT: `{"conversations": [system, human, gpt, human, ..., gpt]}`
- DPO: `{"conversations": [system, human], "chosen": [gpt, human, ..., gpt], "rejected": [gpt, ...]}`; the fork
  accepts lists for `chosen` / `rejected` (multi-turn).
- DPO with `single_turn=True` (`--single_turn`): `{"conversations": [system, human], "chosen": gpt, "rejected": gpt}`,
  one message object each: upstream LLaMA-Factory's layout, for pairs whose chosen and rejected are one message each.
- KTO: `{"conversations": [system, human, ..., gpt], "kto_tag": true}`

What upstream LLaMA-Factory (0.9.x, from PyPI) reads of these: SFT rows, every assistant turn trained; KTO rows, but
its KTO encoder trains only the **final** assistant turn (all before it is prompt), so multi-turn EntroPO-KTO is not
what it trains; DPO pairs only in the single-message layout (it drops every row whose `chosen` / `rejected` is a
list, and then stops with "Cannot find valid samples"). Multi-turn pairs and multi-turn KTO need the authors' fork, or
this library's trainers. [`upstream_warning`] says so in one line.

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


UPSTREAM_WARNINGS = {
    "dpo": "upstream LLaMA-Factory cannot load these DPO pairs (it reads `chosen` / `rejected` as single message "
    "objects, these are lists): train them with the EntroPO authors' LLaMA-Factory fork or this library's trainers "
    "(`entropo train edpo`); pairs of one message each load upstream with --single_turn",
    "kto": "upstream LLaMA-Factory trains only the final assistant turn of each KTO row (the turns before it are "
    "prompt): multi-turn EntroPO-KTO needs the EntroPO authors' LLaMA-Factory fork or this library's trainers "
    "(`entropo train ekto`)",
}


def sharegpt_kind(row: dict[str, Any]) -> str:
    """`"dpo"`, `"kto"` or `"sft"`: the layout of an exported ShareGPT row."""
    return "dpo" if "chosen" in row else "kto" if "kto_tag" in row else "sft"


def upstream_warning(kind: str, single_turn: bool = False) -> str | None:
    """One line on what upstream LLaMA-Factory does with an export of this kind (None when it reads it as meant)."""
    if kind == "dpo" and single_turn:
        return None
    return UPSTREAM_WARNINGS.get(kind)


def _single_message(messages: list[dict[str, Any]], where: str) -> dict[str, str]:
    """The one assistant message of a single-turn pair side, as a ShareGPT object (upstream's layout)."""
    if len(messages) != 1 or messages[0].get("role") != "assistant":
        roles = [m.get("role") for m in messages]
        raise ValueError(
            f"{where}: --single_turn writes one message object per side, and this side holds {len(messages)} "
            f"messages ({', '.join(map(str, roles))}); multi-turn pairs need the list layout (drop --single_turn) "
            "and the EntroPO authors' LLaMA-Factory fork"
        )
    return _to(messages, where)[0]


def to_sharegpt(row: dict[str, Any], index: int = 0, single_turn: bool = False) -> dict[str, Any]:
    """One builder row (SFT `messages`, DPO `prompt`/`chosen`/`rejected`, KTO `prompt`/`completion`/`label`) as a
    ShareGPT row. Other columns (e.g. `instance_id`) are kept. `single_turn` writes a DPO pair's `chosen` and
    `rejected` as one message object each (upstream LLaMA-Factory's layout) and refuses a side of several messages."""
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
        side = _single_message if single_turn else _to
        return {
            "conversations": _to(row["prompt"], f"{where}.prompt"),
            "chosen": side(row["chosen"], f"{where}.chosen"),
            "rejected": side(row["rejected"], f"{where}.rejected"),
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


def export_sharegpt(rows: Iterable[dict[str, Any]], single_turn: bool = False) -> Iterator[dict[str, Any]]:
    for index, row in enumerate(rows):
        yield to_sharegpt(row, index, single_turn)


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

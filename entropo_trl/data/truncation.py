"""Trajectory-aware truncation: fit a multi-turn trajectory into a token budget without losing its end.

The authors cut trajectories to 12k / 18k tokens keeping the start, which silently drops the final turns, including
the patch and the `finish` call. [`truncate_trajectory`] instead

1. shortens the longest tool observations first (keeping their head and tail lines, with a marker saying what was
   cut), down to a floor;
2. then drops whole middle turns (an assistant action with the observations after it), nearest the middle first,
   leaving a marker in the observation before the gap;
3. never touches the system prompt, the issue or the final assistant turn; when even those do not fit it raises
   [`TruncationError`].

It returns the shortened messages and a [`TruncationReport`] of what was cut.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

OBSERVATION_MARKER = "[... {lines} lines (about {tokens} tokens) cut to fit the context ...]"
TURNS_MARKER = "[... {turns} turns (about {tokens} tokens) omitted to fit the context ...]"
_OBSERVATION_ROLES = ("user", "tool")


class TruncationError(ValueError):
    """The trajectory cannot fit the budget without cutting the prompt or the final assistant turn."""


@dataclass
class TruncationReport:
    """What [`truncate_trajectory`] cut."""

    tokens_before: int
    tokens_after: int
    max_tokens: int
    shortened_observations: list[int] = field(default_factory=list)  # indices in the original messages
    dropped_turns: int = 0
    dropped_messages: int = 0

    @property
    def truncated(self) -> bool:
        return self.tokens_after < self.tokens_before

    @property
    def cut_tokens(self) -> int:
        return self.tokens_before - self.tokens_after

    def __str__(self) -> str:
        if not self.truncated:
            return f"{self.tokens_before} tokens, within {self.max_tokens}"
        return (
            f"{self.tokens_before} -> {self.tokens_after} tokens (budget {self.max_tokens}): "
            f"{len(self.shortened_observations)} observations shortened, {self.dropped_turns} middle turns "
            f"dropped, {self.cut_tokens} tokens cut"
        )


def count_tokens(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools=None) -> int:
    """Tokens of the conversation as the chat template renders it (what the trainers see)."""
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _content_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def shorten_text(text: str, keep_tokens: int, text_tokens: int) -> tuple[str, int]:
    """Keep about `keep_tokens` of `text` (which has `text_tokens`): its head and tail lines around a marker.
    Returns the new text and the number of lines cut. Lines longer than the budget are cut inside the line."""
    if text_tokens <= keep_tokens:
        return text, 0
    chars_per_token = max(1.0, len(text) / max(1, text_tokens))
    budget = int(keep_tokens * chars_per_token)
    half = budget // 2
    lines = text.splitlines(keepends=True)
    head, used = [], 0
    for line in lines:
        if used + len(line) > half:
            break
        head.append(line)
        used += len(line)
    tail, used = [], 0
    for line in reversed(lines[len(head) :]):
        if used + len(line) > half:
            break
        tail.append(line)
        used += len(line)
    tail.reverse()
    cut_lines = len(lines) - len(head) - len(tail)
    if not head and not tail:  # one huge line (minified output, a long JSON blob): cut inside it
        marker = OBSERVATION_MARKER.format(lines=1, tokens=text_tokens - keep_tokens)
        return text[:half] + "\n" + marker + "\n" + text[len(text) - half :], 1
    cut_tokens = int((len(text) - sum(map(len, head)) - sum(map(len, tail))) / chars_per_token)
    marker = OBSERVATION_MARKER.format(lines=cut_lines, tokens=cut_tokens)
    joined_head = "".join(head)
    if joined_head and not joined_head.endswith("\n"):
        joined_head += "\n"
    return joined_head + marker + "\n" + "".join(tail), cut_lines


def _water_level(sizes: list[int], excess: int, floor: int, marker_cost: int) -> int:
    """The largest cap (>= floor) such that cutting every size above it down to it saves at least `excess`."""

    def saving(cap: int) -> int:
        return sum(max(0, s - cap - marker_cost) for s in sizes)

    low, high = floor, max(sizes, default=floor)
    if saving(floor) < excess:
        return floor
    while low < high:  # saving is non-increasing in cap
        mid = (low + high + 1) // 2
        if saving(mid) >= excess:
            low = mid
        else:
            high = mid - 1
    return low


def truncate_trajectory(
    messages: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
    *,
    min_observation_tokens: int = 64,
    tools=None,
    max_rounds: int = 6,
) -> tuple[list[dict[str, Any]], TruncationReport]:
    """Fit `messages` into `max_tokens` (as the tokenizer's chat template renders them).

    Args:
        messages: `[system, user(issue), assistant, observation, ..., assistant]`; not modified.
        tokenizer: counts tokens with its chat template.
        max_tokens: the budget.
        min_observation_tokens: observations are never shortened below this; beyond it, middle turns are dropped.

    Returns:
        `(messages, report)`: a shortened copy and what was cut.

    Raises:
        TruncationError: the system prompt, the issue and the final assistant turn alone exceed the budget.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    total = count_tokens(tokenizer, messages, tools)
    report = TruncationReport(tokens_before=total, tokens_after=total, max_tokens=max_tokens)
    if total <= max_tokens:
        return copy.deepcopy(messages), report

    out = copy.deepcopy(messages)
    prompt_end = next((i + 1 for i, m in enumerate(out) if m["role"] == "user"), 0)
    assistant = [i for i, m in enumerate(out) if m["role"] == "assistant" and i >= prompt_end]
    if not assistant:
        raise TruncationError(f"{total} tokens > {max_tokens} and no assistant turn to keep")
    observations = [i for i in range(prompt_end, assistant[-1]) if out[i]["role"] in _OBSERVATION_ROLES]

    total, report.shortened_observations = _shorten_observations(
        out, observations, tokenizer, tools, total, max_tokens, min_observation_tokens, max_rounds
    )
    if total > max_tokens:
        out, total, report.dropped_turns, report.dropped_messages = _drop_middle_turns(
            out, assistant, prompt_end, tokenizer, tools, total, max_tokens
        )
    if total > max_tokens:
        raise TruncationError(
            f"the trajectory needs {total} tokens after shortening every observation to {min_observation_tokens} "
            f"tokens and dropping every middle turn; the system prompt, the issue and the final assistant turn alone "
            f"exceed max_tokens={max_tokens}"
        )
    report.tokens_after = total
    return out, report


def _shorten_observations(
    messages: list[dict[str, Any]],
    observations: list[int],
    tokenizer: PreTrainedTokenizerBase,
    tools,
    total: int,
    max_tokens: int,
    min_observation_tokens: int,
    max_rounds: int,
) -> tuple[int, list[int]]:
    """Phase 1: shorten the longest observations (in place) toward a common cap, re-measuring until within budget or
    nothing changes. Returns the new token count and the indices of the shortened observations."""
    sizes = {i: _content_tokens(tokenizer, messages[i]["content"] or "") for i in observations}
    marker_cost = _content_tokens(tokenizer, OBSERVATION_MARKER.format(lines=1000, tokens=10000)) + 2
    shortened: set[int] = set()
    for _ in range(max_rounds):
        excess = total - max_tokens
        if excess <= 0:
            break
        cap = _water_level([sizes[i] for i in observations], excess, min_observation_tokens, marker_cost)
        changed = False
        for i in observations:
            if sizes[i] > cap + marker_cost:
                new_text, _ = shorten_text(messages[i]["content"], cap, sizes[i])
                if new_text != messages[i]["content"]:
                    messages[i]["content"] = new_text
                    sizes[i] = _content_tokens(tokenizer, new_text)
                    shortened.add(i)
                    changed = True
        total = count_tokens(tokenizer, messages, tools)
        if not changed:
            break
    return total, sorted(shortened)


def _drop_middle_turns(
    messages: list[dict[str, Any]],
    assistant: list[int],
    prompt_end: int,
    tokenizer: PreTrainedTokenizerBase,
    tools,
    total: int,
    max_tokens: int,
) -> tuple[list[dict[str, Any]], int, int, int]:
    """Phase 2: drop whole middle turns, units `[assistant_k, observations...]` before the final assistant turn,
    nearest the middle first. The first unit after the prompt is kept: without it the issue would be followed by
    another user message (the marker), and templates that require alternating roles refuse that.

    Returns the messages without the dropped units, their token count, and the numbers of units and messages
    dropped."""
    starts = assistant[:-1]
    units = [(start, (starts[k + 1] if k + 1 < len(starts) else assistant[-1])) for k, start in enumerate(starts)]
    unit_tokens = [
        sum(_content_tokens(tokenizer, messages[j]["content"] or "") + 4 for j in range(a, b)) for a, b in units
    ]
    middle = (len(units) - 1) / 2
    order = sorted(range(1, len(units)), key=lambda k: (abs(k - middle), k))
    # a first guess from the estimated unit sizes, then one more unit at a time until the rendered chat fits
    dropped: set[int] = set()
    estimate = total
    for k in order:
        if estimate <= max_tokens:
            break
        dropped.add(k)
        estimate -= unit_tokens[k]
    while True:
        candidate = _without_units(messages, units, dropped, unit_tokens, prompt_end)
        total = count_tokens(tokenizer, candidate, tools)
        remaining = [k for k in order if k not in dropped]
        if total <= max_tokens or not remaining:
            break
        dropped.add(remaining[0])
    return candidate, total, len(dropped), sum(units[k][1] - units[k][0] for k in dropped)


def _without_units(messages, units, dropped: set[int], unit_tokens, prompt_end: int) -> list[dict[str, Any]]:
    """`messages` without the dropped units; each gap gets a marker appended to the message before it."""
    drop_index = {j for k in dropped for j in range(*units[k])}
    out: list[dict[str, Any]] = []
    gap_turns, gap_tokens = 0, 0
    unit_of = {j: k for k, (a, b) in enumerate(units) for j in range(a, b)}
    for j, message in enumerate(messages):
        if j in drop_index:
            if j == units[unit_of[j]][0]:
                gap_turns += 1
                gap_tokens += unit_tokens[unit_of[j]]
            continue
        if gap_turns:
            marker = TURNS_MARKER.format(turns=gap_turns, tokens=gap_tokens)
            # never into an assistant turn (a training target) nor into the prompt (the system prompt and the issue)
            if out and out[-1]["role"] != "assistant" and len(out) > prompt_end:
                out[-1] = {**out[-1], "content": (out[-1].get("content") or "") + "\n\n" + marker}
            else:
                out.append({"role": "user", "content": marker})
            gap_turns, gap_tokens = 0, 0
        out.append(message)
    return out

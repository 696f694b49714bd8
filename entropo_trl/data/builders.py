"""Dataset builders: trajectory pools in, the rows the trainers and the verifier consume out.

Every builder returns a [`Rows`] stream: iterate it (or `list()` it) to get the rows; afterwards `rows.stats` says how
many rows were built and how many trajectories were skipped, by reason. Nothing is dropped silently.

- [`build_sft_rows`]: `{"messages"}` rows for TRL's `SFTTrainer` (train on assistant turns only).
- [`build_dpo_pairs`]: `{"prompt", "chosen", "rejected", "instance_id"}` for [`EntroDPOTrainer`], a passing and a
  failing trajectory of the same instance sharing the prompt `[system, issue]`.
- [`build_kto_rows`]: `{"prompt", "completion", "label"}` for [`EntroKTOTrainer`], with the class weights that
  balance desirable and undesirable rows.
- [`build_verifier_rows`]: judge conversations ending in `<judgement>YES</judgement>` / `NO` (the authors' prompt).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from .trajectory import Trajectory
from .truncation import TruncationError, TruncationReport, truncate_trajectory

DPO_POLICIES = ("all", "authors")


@dataclass
class BuildStats:
    """Rows built, trajectories skipped by reason, and builder-specific counts (`extra`)."""

    rows: int = 0
    trajectories: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    tokens_cut: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        text = f"{self.rows} rows from {self.trajectories} trajectories"
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
        if self.truncated:
            text += f"; {self.truncated} truncated ({self.tokens_cut} tokens cut)"
        return text


class Rows:
    """An iterable of rows whose [`BuildStats`] fill as it is consumed. Iterate once (it streams)."""

    def __init__(self, generate: Callable[[BuildStats], Iterator[dict[str, Any]]]):
        self.stats = BuildStats()
        self._generate = generate
        self._used = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._used:
            raise RuntimeError("these rows were already consumed; build them again (they stream from the pool)")
        self._used = True
        for row in self._generate(self.stats):
            self.stats.rows += 1
            yield row


class _Budget:
    """Optional trajectory-aware truncation of messages to a token budget, counted in the stats."""

    def __init__(self, tokenizer, max_tokens: int | None):
        if max_tokens is not None and tokenizer is None:
            raise ValueError("max_tokens needs a tokenizer to count tokens with")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (or None for no budget), got {max_tokens}")
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def fit(self, messages: list[dict[str, Any]], stats: BuildStats) -> list[dict[str, Any]] | None:
        if self.max_tokens is None:
            return messages
        try:
            out, report = truncate_trajectory(messages, self.tokenizer, self.max_tokens)
        except TruncationError:
            stats.skipped["does not fit max_tokens"] += 1
            return None
        except TemplateError as error:  # the tokenizer's chat template refuses the conversation (e.g. its roles)
            stats.skipped[f"chat template error: {str(error)[:80]}"] += 1
            return None
        self._count(report, stats)
        return out

    @staticmethod
    def _count(report: TruncationReport, stats: BuildStats) -> None:
        if report.truncated:
            stats.truncated += 1
            stats.tokens_cut += report.cut_tokens


def _split(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(prompt, completion): the prompt runs through the first user message (system prompt and issue)."""
    end = next((i + 1 for i, m in enumerate(messages) if m["role"] == "user"), 0)
    return messages[:end], messages[end:]


def _usable(trajectory: Trajectory, stats: BuildStats, finished_only: bool) -> bool:
    """Common filters, each skip counted: no action at all, or not finished (when required)."""
    stats.trajectories += 1
    if trajectory.metadata.get("labelled") is False:
        stats.skipped["unlabelled (no test oracle ran)"] += 1
        return False
    _, completion = _split(trajectory.messages)
    if not any(m["role"] == "assistant" for m in completion):
        stats.skipped["no assistant turn"] += 1
        return False
    if finished_only and not trajectory.finished:
        stats.skipped["not finished"] += 1
        return False
    if any(m.get("tool_calls") for m in trajectory.messages):
        # the rows keep text only: structured calls would turn into empty assistant turns
        stats.skipped["structured tool_calls (only text calls, as the R2E scaffold writes them, are supported)"] += 1
        return False
    return True


def _stable_key(trajectory: Trajectory) -> str:
    """An order-independent identity: the episode id, else a hash of the conversation and patch."""
    if trajectory.episode_id:
        return trajectory.episode_id
    content = json.dumps([trajectory.messages, trajectory.patch], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


def _strip(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as plain `{"role", "content"}` (what chat templates and datasets need)."""
    return [{"role": m["role"], "content": m.get("content") or ""} for m in messages]


# --------------------------------------------------------------------------------------------------------------------
# SFT
# --------------------------------------------------------------------------------------------------------------------


def build_sft_rows(
    trajectories: Iterable[Trajectory],
    require_success: bool = False,
    *,
    finished_only: bool = True,
    tokenizer=None,
    max_tokens: int | None = None,
) -> Rows:
    """`{"messages", "instance_id"}` rows for supervised fine-tuning on whole trajectories (assistant turns only, with
    TRL's `assistant_only_loss=True`). The authors keep every finished teacher trajectory (`require_success=False`);
    `require_success=True` keeps passing ones only."""
    budget = _Budget(tokenizer, max_tokens)

    def generate(stats: BuildStats) -> Iterator[dict[str, Any]]:
        for trajectory in trajectories:
            if not _usable(trajectory, stats, finished_only):
                continue
            if require_success and not trajectory.passed:
                stats.skipped["not passing"] += 1
                continue
            messages = budget.fit(_strip(trajectory.messages), stats)
            if messages is None:
                continue
            yield {"messages": messages, "instance_id": trajectory.instance_id}

    return Rows(generate)


# --------------------------------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------------------------------


def build_dpo_pairs(
    trajectories: Iterable[Trajectory],
    policy: str = "all",
    max_pairs_per_instance: int | None = 4,
    seed: int = 0,
    *,
    finished_only: bool = True,
    tokenizer=None,
    max_tokens: int | None = None,
) -> Rows:
    """Preference pairs `{"prompt": [system, issue], "chosen": [...], "rejected": [...], "instance_id"}`.

    Policies:
        `"authors"`: per instance and source, one pair only when exactly one of its two runs passed (the EntroPO
            authors' rule: two independent runs of the same model, pairs from the instances they disagree on).
            Groups without exactly two runs are skipped, counted.
        `"all"`: every passing x failing pair of the instance (any source), sampled down to
            `max_pairs_per_instance` (`None`: all), deterministically for a `seed`.

    Pairs whose prompts differ (e.g. another system prompt) are skipped and counted. Trajectories are grouped per
    instance in memory (only the instance's own trajectories are paired), in the order they arrive.
    """
    if policy not in DPO_POLICIES:
        raise ValueError(f"policy must be one of {DPO_POLICIES}, got {policy!r}")
    if max_pairs_per_instance is not None and max_pairs_per_instance < 1:
        raise ValueError(f"max_pairs_per_instance must be >= 1 or None, got {max_pairs_per_instance}")
    budget = _Budget(tokenizer, max_tokens)

    def generate(stats: BuildStats) -> Iterator[dict[str, Any]]:
        groups: dict[Any, list[Trajectory]] = defaultdict(list)
        for trajectory in trajectories:
            if not _usable(trajectory, stats, finished_only):
                continue
            key = (trajectory.instance_id, trajectory.source) if policy == "authors" else trajectory.instance_id
            groups[key].append(trajectory)
        stats.extra["instances"] = len({k[0] if policy == "authors" else k for k in groups})
        for key, group in groups.items():
            instance_id = key[0] if policy == "authors" else key
            passing = [t for t in group if t.passed]
            failing = [t for t in group if not t.passed]
            if policy == "authors":
                if len(group) != 2:
                    stats.skipped[f"authors policy: {len(group)} runs, not 2"] += len(group)
                    continue
                if len(passing) != 1:
                    stats.skipped["authors policy: both passed" if passing else "authors policy: both failed"] += 2
                    continue
                candidates = [(passing[0], failing[0])]
            else:
                if not passing or not failing:
                    stats.skipped["all passed" if passing else "all failed"] += len(group)
                    continue
                candidates = list(itertools.product(passing, failing))
            matching = []
            for chosen, rejected in candidates:
                if _split(chosen.messages)[0] != _split(rejected.messages)[0]:
                    stats.skipped["pair prompts differ"] += 1
                    continue
                matching.append((chosen, rejected))
            if policy == "all" and max_pairs_per_instance is not None and len(matching) > max_pairs_per_instance:
                rng = random.Random(f"{seed}/{instance_id}")  # per instance: independent of the pool's order
                matching.sort(key=lambda pair: (_stable_key(pair[0]), _stable_key(pair[1])))
                matching = rng.sample(matching, max_pairs_per_instance)
                stats.extra["pairs_capped"] = stats.extra.get("pairs_capped", 0) + 1
            for chosen, rejected in matching:
                chosen_messages = budget.fit(_strip(chosen.messages), stats)
                rejected_messages = budget.fit(_strip(rejected.messages), stats)
                if chosen_messages is None or rejected_messages is None:
                    continue
                # truncation never edits the system prompt or the issue: the pair still shares its prompt
                prompt, chosen_completion = _split(chosen_messages)
                _, rejected_completion = _split(rejected_messages)
                yield {
                    "prompt": prompt,
                    "chosen": chosen_completion,
                    "rejected": rejected_completion,
                    "instance_id": instance_id,
                }

    return Rows(generate)


# --------------------------------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------------------------------


def kto_class_weights(desirable: int, undesirable: int) -> dict[str, float]:
    """`desirable_weight` / `undesirable_weight` for `EntroKTOConfig` that balance the classes
    (λD·nD = λU·nU, the rarer class up-weighted, the other at 1.0). The KTO paper recommends
    λD·nD / (λU·nU) in [1, 4/3]; these give exactly 1."""
    if desirable <= 0 or undesirable <= 0:
        raise ValueError(f"both classes are needed to balance them (desirable={desirable}, undesirable={undesirable})")
    if desirable <= undesirable:
        return {"desirable_weight": undesirable / desirable, "undesirable_weight": 1.0}
    return {"desirable_weight": 1.0, "undesirable_weight": desirable / undesirable}


def build_kto_rows(
    trajectories: Iterable[Trajectory],
    finished_only: bool = True,
    *,
    tokenizer=None,
    max_tokens: int | None = None,
) -> Rows:
    """Unpaired rows `{"prompt": [system, issue], "completion": [...], "label", "instance_id"}`, label = the
    trajectory passed. After iteration `rows.stats.extra` holds `desirable`, `undesirable` and `class_weights`
    (see [`kto_class_weights`]; absent when a class is empty)."""
    budget = _Budget(tokenizer, max_tokens)

    def generate(stats: BuildStats) -> Iterator[dict[str, Any]]:
        counts = Counter()
        for trajectory in trajectories:
            if not _usable(trajectory, stats, finished_only):
                continue
            messages = budget.fit(_strip(trajectory.messages), stats)
            if messages is None:
                continue
            prompt, completion = _split(messages)
            counts[trajectory.passed] += 1
            stats.extra["desirable"], stats.extra["undesirable"] = counts[True], counts[False]
            yield {
                "prompt": prompt,
                "completion": completion,
                "label": trajectory.passed,
                "instance_id": trajectory.instance_id,
            }
        stats.extra["desirable"], stats.extra["undesirable"] = counts[True], counts[False]
        if counts[True] and counts[False]:
            stats.extra["class_weights"] = kto_class_weights(counts[True], counts[False])

    return Rows(generate)


# --------------------------------------------------------------------------------------------------------------------
# Verifier
# --------------------------------------------------------------------------------------------------------------------

VERIFIER_SYSTEM_PROMPT = """You are an expert judge evaluating AI assistant interactions. Your task is to determine if the assistant successfully resolved the user's request.

Key evaluation criteria:
1. Did the assistant complete the main task requested by the user?
2. Did the assistant handle all edge cases and requirements specified?
3. Were there any errors or issues in the final solution?
4. Did the assistant verify the solution works as intended?

Respond only with "<judgement>YES</judgement>" or "<judgement>NO</judgement>"."""  # noqa: E501 (the authors' text)
JUDGEMENT = "<judgement>{}</judgement>"
CONDENSED = "<Execution result condensed for saving context>"


def _interaction_log(messages: list[dict[str, Any]], patch: str, condensed: set[int]) -> str:
    prompt, completion = _split(messages)
    system = next((m["content"] for m in prompt if m["role"] == "system"), "")
    issue = prompt[-1]["content"] if prompt else ""
    parts = [
        "Please evaluate the following interaction between an AI assistant and a user:\n\n"
        "=== INTERACTION LOG ===\n\n"
        f"[SYSTEM]\n{system}\n[/SYSTEM]\n\n[USER]\n{issue}\n[/USER]"
    ]
    step = 0
    for offset, message in enumerate(completion):
        index = len(prompt) + offset
        if message["role"] == "assistant":
            step += 1
            parts.append(f"\n\n[STEP]\n{step}\n[/STEP]\n\n[ASSISTANT]\n{message['content']}\n[/ASSISTANT]")
        else:
            content = CONDENSED if index in condensed else message["content"]
            parts.append(f"\n\n[USER]\n{content}\n[/USER]")
    parts.append(
        "\n\n=== END INTERACTION ===\n\n=== FINAL PATCH ===\n\n"
        f"[PATCH]\n{patch}\n[/PATCH]\n\n=== END FINAL PATCH ===\n\n"
        "Based on the above interaction, did the assistant successfully resolve the user's initial request? "
        "Respond with YES or NO."
    )
    return "".join(parts)


def _length(tokenizer, text: str) -> int:
    """Tokens of `text`; without a tokenizer, an estimate of 4 characters a token."""
    if tokenizer is None:
        return (len(text) + 3) // 4
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def verifier_prompt(
    trajectory: Trajectory, tokenizer=None, max_tokens: int | None = 60_000
) -> tuple[list[dict[str, str]], int]:
    """The judge's `[system, user]` messages for a trajectory (the authors' verifier prompt), and how many
    observations were condensed to fit `max_tokens`: the largest observation blocks are replaced by
    `<Execution result condensed for saving context>` first (the issue never is).

    Raises:
        TruncationError: still over `max_tokens` with every observation condensed.
    """
    messages = _strip(trajectory.messages)
    prompt_length = len(_split(messages)[0])
    condensed: set[int] = set()
    text = _interaction_log(messages, trajectory.patch, condensed)
    overhead = _length(tokenizer, VERIFIER_SYSTEM_PROMPT) + 16
    if max_tokens is not None:
        total = _length(tokenizer, text) + overhead
        if total > max_tokens:
            observations = sorted(
                (i for i in range(prompt_length, len(messages)) if messages[i]["role"] != "assistant"),
                key=lambda i: (-len(messages[i]["content"]), i),
            )
            sizes = {i: _length(tokenizer, messages[i]["content"]) for i in observations}
            condensed_cost = _length(tokenizer, CONDENSED)
            pending = list(observations)
            while pending:  # condense by estimate, then measure; repeat while the measured text is still over
                while pending and total > max_tokens:
                    i = pending.pop(0)
                    condensed.add(i)
                    total -= sizes[i] - condensed_cost
                text = _interaction_log(messages, trajectory.patch, condensed)
                total = _length(tokenizer, text) + overhead
                if total <= max_tokens:
                    break
            if total > max_tokens:
                raise TruncationError(
                    f"the judge prompt needs {total} tokens with every observation condensed (max_tokens={max_tokens})"
                )
    return [{"role": "system", "content": VERIFIER_SYSTEM_PROMPT}, {"role": "user", "content": text}], len(condensed)


def build_verifier_rows(
    trajectories: Iterable[Trajectory],
    tokenizer=None,
    max_tokens: int | None = 60_000,
    *,
    finished_only: bool = True,
) -> Rows:
    """Verifier training rows `{"messages": [system, user, assistant "<judgement>YES</judgement>" or NO], "label",
    "instance_id"}`: YES when the trajectory passed. Long trajectories are condensed to `max_tokens` (see
    [`verifier_prompt`]); `stats.extra["condensed_observations"]` counts the condensed blocks."""

    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 (or None for no budget), got {max_tokens}")

    def generate(stats: BuildStats) -> Iterator[dict[str, Any]]:
        stats.extra["condensed_observations"] = 0
        for trajectory in trajectories:
            if not _usable(trajectory, stats, finished_only):
                continue
            try:
                prompt, condensed = verifier_prompt(trajectory, tokenizer, max_tokens)
            except TruncationError:
                stats.skipped["does not fit max_tokens"] += 1
                continue
            if condensed:
                stats.truncated += 1
                stats.extra["condensed_observations"] += condensed
            answer = JUDGEMENT.format("YES" if trajectory.passed else "NO")
            yield {
                "messages": prompt + [{"role": "assistant", "content": answer}],
                "label": trajectory.passed,
                "instance_id": trajectory.instance_id,
            }

    return Rows(generate)


def row_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The whole conversation of a built row, whatever the builder (`messages`; `prompt` + `chosen`; `prompt` +
    `completion`)."""
    if "messages" in row:
        return row["messages"]
    if "chosen" in row:
        return row["prompt"] + row["chosen"]
    return row["prompt"] + row["completion"]

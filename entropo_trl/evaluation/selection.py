"""Test-time selection: verifier scores and the hybrid best-of-N selector (docs/design.md, 'Test-time scaling').

The hybrid selector applies stages in order to one instance's candidate trajectories:

1. `finished`: keep those whose last turn called `finish` (not cut by a step or token limit);
2. `regression`, by `regression_rule`:
   - `"free"` (the paper, §3.4): keep the regression-free candidates (`regression_fail_count == 0`, no
     PASS_TO_PASS failure). When the fail counts are unknown (pools written before the oracle counted failures, R2E-Gym
     logs that name no test), the stage falls back to the most passing regression tests among those candidates and
     says so: a warning is logged (once per selector) and the [`Selection`]'s `notes["regression"]` explains it.
     Known failures rank below unknown counts, which rank below known regression-free candidates;
   - `"most_passed"` (the authors' code): keep those with the most passing regression tests;
3. `reproduction`: keep those with the highest reproduction-test score;
4. `verifier`: drop those whose verifier p(YES) is below a threshold (default 0.01; `verifier_inclusive` drops
   p <= threshold, as the authors' code does); an unscored candidate (p(YES) None) is never dropped;
5. `steps`: most steps (SWE-bench Verified) or fewest (Lite), counted as assistant turns or as messages.

If a filtering stage would empty the set, the set from before it is kept (the trace marks the stage as fallen back).
Remaining ties go by `tie_break`: `"index"`, the earliest candidate; `"verifier"`, the highest p(YES), then the
earliest. An unscored candidate ranks below every scored one in that tie-break (as if p(YES) were minus infinity).

The presets: `paper-verified` / `paper-lite` are the paper's selector (finished, regression-free, p(YES) >= 0.01,
most / fewest turns; ties to the earliest). `authors-verified` / `authors-lite` reproduce `run_hybrid_verifier` of
the authors' R2E-Gym fork (`create_bestofn_aggregate.py`) for "sweverify" / "swelite": finished (else all), sorted by
p(YES) descending (a stable sort), Verified only the most regression passes and then the highest reproduction score,
p(YES) > 0.01 (else all), then the longest / shortest history, the first in the p(YES) order on ties.

Because every stage either filters (with that fallback) or keeps a maximum, the selector is the maximum of a
lexicographic key: [`HybridSelector.rank`] gives every candidate a rank such that selecting from any subset is taking
its highest-ranked member (what the best-of-N estimates in [`entropo_trl.evaluation.metrics`] use).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..data.builders import verifier_prompt
from ..data.trajectory import Trajectory

logger = logging.getLogger(__name__)

STAGES = ("finished", "regression", "reproduction", "verifier", "steps")
REGRESSION_RULES = ("free", "most_passed")
TIE_BREAKS = ("index", "verifier")
# tiers of the "free" regression rule: known failures < unknown fail count (ranked by passes) < regression-free
_FAILING, _UNKNOWN, _FREE = 0, 1, 2


@dataclass
class SelectorConfig:
    """Which stages run, in which order, and their settings."""

    stages: list[str] = field(default_factory=lambda: ["finished", "regression", "verifier", "steps"])
    regression_rule: str = "free"  # "free" (paper: no PASS_TO_PASS failure) or "most_passed" (authors' code)
    verifier_threshold: float = 0.01
    verifier_inclusive: bool = False  # drop p < threshold (paper); True: drop p <= threshold (authors' code)
    steps: str = "most"  # "most" or "fewest"
    steps_measure: str = "num_steps"  # "num_steps" (assistant turns) or "messages" (history length, authors' code)
    tie_break: str = "index"  # remaining ties: "index" (the earliest) or "verifier" (highest p(YES), then earliest)

    def __post_init__(self):
        if not self.stages:
            raise ValueError(f"the selector needs at least one stage of {', '.join(STAGES)}")
        if not isinstance(self.verifier_inclusive, bool):  # YAML "false" in quotes would count as true
            raise ValueError(f"verifier_inclusive must be true or false, got {self.verifier_inclusive!r}")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown selector stage(s) {unknown}; stages are {', '.join(STAGES)}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"a stage is listed twice: {self.stages}")
        choices = {
            "regression_rule": REGRESSION_RULES,
            "steps": ("most", "fewest"),
            "steps_measure": ("num_steps", "messages"),
            "tie_break": TIE_BREAKS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        try:
            self.verifier_threshold = float(self.verifier_threshold)  # YAML reads `1e-2` as a string
        except (TypeError, ValueError):
            raise ValueError(f"verifier_threshold must be a number, got {self.verifier_threshold!r}") from None
        if not 0.0 <= self.verifier_threshold <= 1.0:
            raise ValueError(f"verifier_threshold must be in [0, 1], got {self.verifier_threshold}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "selector config") -> SelectorConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(values) - known - {"preset"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known | {'preset'})})")
        if "preset" in values and values["preset"] not in PRESETS:
            raise ValueError(f"{where}: unknown preset {values['preset']!r}; presets: {', '.join(PRESETS)}")
        base = PRESETS[values["preset"]] if "preset" in values else cls()
        stages = values.get("stages", base.stages)
        if isinstance(stages, str):
            stages = [s.strip() for s in stages.split(",") if s.strip()]
        settings = {k: v for k, v in values.items() if k not in ("preset", "stages")}
        return replace(base, **settings, stages=list(stages))

    @classmethod
    def from_yaml(cls, path: str | Path) -> SelectorConfig:
        import yaml

        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of selector settings")
        return cls.from_dict(values, str(path))

    def without(self, stage: str) -> SelectorConfig:
        """The same selector with one stage removed (for ablations)."""
        if stage not in self.stages:
            raise ValueError(f"cannot drop stage {stage!r}: the selector's stages are {', '.join(self.stages)}")
        return replace(self, stages=[s for s in self.stages if s != stage])


PRESETS = {
    # the paper's hybrid selector (§3.4): finished -> regression-free -> p(YES) >= 0.01 -> most / fewest turns
    "paper-verified": SelectorConfig(["finished", "regression", "verifier", "steps"], steps="most"),
    "paper-lite": SelectorConfig(["finished", "regression", "verifier", "steps"], steps="fewest"),
    # the authors' released `run_hybrid_verifier` ("sweverify" / "swelite"): the most regression passes and the best
    # reproduction score (Verified only), drops p <= 0.01, counts history length, ties to the highest p(YES)
    "authors-verified": SelectorConfig(
        ["finished", "regression", "reproduction", "verifier", "steps"],
        regression_rule="most_passed",
        verifier_inclusive=True,
        steps="most",
        steps_measure="messages",
        tie_break="verifier",
    ),
    "authors-lite": SelectorConfig(
        ["finished", "verifier", "steps"],
        verifier_inclusive=True,
        steps="fewest",
        steps_measure="messages",
        tie_break="verifier",
    ),
}


@dataclass
class Selection:
    """The chosen trajectory of one instance and how the stages narrowed the candidates."""

    trajectory: Trajectory
    index: int
    trace: list[tuple[str, int, bool]]  # (stage, candidates left, fell back)
    notes: dict[str, str] = field(default_factory=dict)  # stage -> why its rule did not apply as configured


class HybridSelector:
    """The paper's hybrid best-of-N selector; see the module docstring."""

    def __init__(self, config: SelectorConfig | str | None = None):
        if isinstance(config, str):
            if config not in PRESETS:
                raise ValueError(f"unknown preset {config!r}; presets: {', '.join(PRESETS)}")
            config = PRESETS[config]
        self.config = replace(config or PRESETS["paper-verified"])  # a copy: the presets stay as they are
        self.config.stages = list(self.config.stages)
        self._warned_unknown_failures = False

    # one key component per stage: larger is preferred
    def _component(self, stage: str, t: Trajectory) -> Any:
        config = self.config
        if stage == "finished":
            return 1.0 if t.finished else 0.0
        if stage == "regression":
            passed = -math.inf if t.regression_pass_count is None else float(t.regression_pass_count)
            if config.regression_rule == "most_passed":
                return passed
            if t.regression_fail_count is not None:
                return (_FREE if t.regression_fail_count == 0 else _FAILING, 0.0)
            if not self._warned_unknown_failures:
                self._warned_unknown_failures = True
                logger.warning(
                    "selector: some candidates have no regression_fail_count (PASS_TO_PASS failures unknown); the "
                    "regression stage ranks them by passing regression tests, below regression-free candidates and "
                    "above ones with known failures (each instance where this decided is noted in its selection)"
                )
            return (_UNKNOWN, passed)
        if stage == "reproduction":
            return -math.inf if t.reproduction_score is None else float(t.reproduction_score)
        if stage == "verifier":
            if t.verifier_prob is None:  # not scored: not dropped
                return 1.0
            keep = (
                t.verifier_prob > config.verifier_threshold
                if config.verifier_inclusive
                else (t.verifier_prob >= config.verifier_threshold)
            )
            return 1.0 if keep else 0.0
        size = t.num_steps if config.steps_measure == "num_steps" else len(t.messages)
        return float(size if config.steps == "most" else -size)

    def _tie(self, t: Trajectory, index: int) -> tuple:
        """The tie-break after the stages: the highest p(YES) (unscored lowest) with "verifier", then the earliest."""
        if self.config.tie_break == "verifier":
            return (-math.inf if t.verifier_prob is None else t.verifier_prob, -index)
        return (-index,)

    def _satisfied(self, stage: str, best: Any) -> bool:
        """Whether the best candidate meets a filtering stage (False: the stage kept the set from before it)."""
        if stage in ("finished", "verifier"):
            return best > 0
        if stage == "regression" and self.config.regression_rule == "free":
            return best[0] == _FREE
        return True

    def key(self, t: Trajectory, index: int) -> tuple:
        return (*(self._component(stage, t) for stage in self.config.stages), *self._tie(t, index))

    def rank(self, trajectories: Sequence[Trajectory]) -> list[int]:
        """Distinct ranks (0 = least preferred): the selector's choice from any subset is its highest-ranked member."""
        order = sorted(range(len(trajectories)), key=lambda i: self.key(trajectories[i], i))
        ranks = [0] * len(trajectories)
        for position, i in enumerate(order):
            ranks[i] = position
        return ranks

    def select(self, trajectories: Sequence[Trajectory]) -> Selection:
        """Apply the stages one by one (with the fallback) and return the choice with its trace."""
        if not trajectories:
            raise ValueError("no candidate trajectories to select from")
        candidates = list(range(len(trajectories)))
        trace, notes = [], {}
        for stage in self.config.stages:
            values = {i: self._component(stage, trajectories[i]) for i in candidates}
            best = max(values.values())
            # a filter keeps the candidates that pass it: the maximum, or all of them (the fallback) when none does
            candidates = [i for i in candidates if values[i] == best]
            trace.append((stage, len(candidates), not self._satisfied(stage, best)))
            if stage == "regression" and self.config.regression_rule == "free" and best[0] == _UNKNOWN:
                unknown = sum(trajectories[i].regression_fail_count is None for i in values)
                notes["regression"] = (
                    f"PASS_TO_PASS failures unknown for {unknown} of {len(values)} candidates and none known "
                    "regression-free: kept the most passing regression tests"
                )
        chosen = max(candidates, key=lambda i: self._tie(trajectories[i], i))
        return Selection(trajectories[chosen], chosen, trace, notes)


def select_pool(pool: dict[str, list[Trajectory]], selector: HybridSelector) -> dict[str, Selection]:
    """One selection per instance."""
    return {instance: selector.select(trajectories) for instance, trajectories in pool.items()}


def group_by_instance(trajectories) -> dict[str, list[Trajectory]]:
    """`{instance_id: [trajectories]}`, in arrival order."""
    pool: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        pool.setdefault(t.instance_id, []).append(t)
    return pool


def labelled_instances(pool: dict[str, list[Trajectory]]) -> dict[str, list[Trajectory]]:
    """The instances whose every trajectory carries a reward ([`Trajectory.labelled`]): the only ones a resolve rate
    may count. An instance with an unlabelled trajectory (a SWE-smith line without a reward, a rollout without a test
    oracle) is unlabelled: its placeholder rewards say nothing about whether it was resolved."""
    return {instance: group for instance, group in pool.items() if all(t.labelled for t in group)}


# --------------------------------------------------------------------------------------------------------------------
# Verifier scores
# --------------------------------------------------------------------------------------------------------------------

JUDGEMENT_OPEN = "<judgement>"


def judgement_probability(logprobs: list[dict]) -> float:
    """p(YES) / (p(YES) + p(NO)) at the judgement token, from OpenAI-style `logprobs.content` entries
    (`{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}`): the first position whose top candidates include
    YES or NO, after the text so far reaches `<judgement>` when it does."""
    text, start = "", 0
    for position, entry in enumerate(logprobs):
        text += entry.get("token", "")
        if text.rstrip().endswith(JUDGEMENT_OPEN):
            start = position + 1
            break
    for entry in logprobs[start:]:
        # the same word can appear under several spellings ("YES", " YES"): their probabilities add up
        candidates: dict[str, float] = {}
        listed = list(entry.get("top_logprobs") or [])
        if not any(c.get("token") == entry.get("token") for c in listed) and entry.get("logprob") is not None:
            listed.append({"token": entry.get("token", ""), "logprob": entry["logprob"]})
        for candidate in listed:
            word = candidate["token"].strip()
            if word in candidates:
                candidates[word] = float(np.logaddexp(candidates[word], candidate["logprob"]))
            else:
                candidates[word] = candidate["logprob"]
        yes, no = candidates.get("YES"), candidates.get("NO")
        if yes is None and no is None:
            continue
        if no is None:
            return 1.0
        if yes is None:
            return 0.0
        return 1.0 / (1.0 + math.exp(no - yes))
    raise ValueError("the verifier's answer has no YES / NO judgement token among its log-probs")


async def score_with_endpoint(
    trajectories: Sequence[Trajectory],
    client,
    *,
    tokenizer=None,
    max_tokens: int | None = 60_000,
    concurrency: int = 16,
    top_logprobs: int = 20,
    assign: bool = True,
) -> list[float | None]:
    """Verifier p(YES) for each trajectory from an OpenAI-compatible endpoint (e.g. vLLM serving the verifier),
    queried concurrently. Scores come back in the trajectories' order, each computed from its own response (never
    by completion order). A trajectory whose prompt cannot fit, or whose answer has no judgement, scores None.
    With `assign`, `trajectory.verifier_prob` is set."""
    from ..rollout.client import ContextLimitExceeded, LLMError, SamplingParams

    semaphore = asyncio.Semaphore(concurrency)
    sampling = SamplingParams(temperature=0.0, top_p=1.0, top_k=None, repetition_penalty=None, max_tokens=16)

    async def one(trajectory: Trajectory) -> float | None:
        try:
            messages, _ = verifier_prompt(trajectory, tokenizer, max_tokens)
        except ValueError:
            return None
        async with semaphore:
            try:
                completion = await client.complete(
                    messages, sampling, extra_body={"logprobs": True, "top_logprobs": top_logprobs}
                )
            except (ContextLimitExceeded, LLMError) as error:  # this trajectory only: the others keep their scores
                logger.warning(f"verifier: no score for {trajectory.episode_id or trajectory.instance_id}: {error}")
                return None
        try:
            return judgement_probability(completion.logprobs or [])
        except ValueError:
            return None

    scores = await asyncio.gather(*(one(t) for t in trajectories))
    if assign:
        for trajectory, score in zip(trajectories, scores):
            trajectory.verifier_prob = score
    return list(scores)


def score_with_model(
    trajectories: Sequence[Trajectory], model, tokenizer, *, max_tokens: int | None = 60_000, assign: bool = True
) -> list[float | None]:
    """Verifier p(YES) from a local transformers model: the judge prompt and an assistant turn opened with
    `<judgement>` (as the chat template renders it in training), then one forward pass; p(YES) / (p(YES) + p(NO))
    over the first tokens of "YES" and "NO"."""
    import torch

    yes = tokenizer("YES", add_special_tokens=False)["input_ids"][0]
    no = tokenizer("NO", add_special_tokens=False)["input_ids"][0]
    scores: list[float | None] = []
    for trajectory in trajectories:
        try:
            messages, _ = verifier_prompt(trajectory, tokenizer, max_tokens)
        except ValueError:
            scores.append(None)
            continue
        # the judgement opened as an assistant turn, rendered the way the verifier saw it in training (templates such
        # as GLM-4.5's put `<think></think>` before an assistant's answer, which a bare generation prompt lacks)
        text = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": JUDGEMENT_OPEN}], tokenize=False, continue_final_message=True
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
        with torch.no_grad():
            logits = model(ids).logits[0, -1].float()
        pair = torch.log_softmax(logits, dim=-1)[[yes, no]]
        scores.append(float(torch.softmax(pair, dim=-1)[0]))
    if assign:
        for trajectory, score in zip(trajectories, scores):
            trajectory.verifier_prob = score
    return scores

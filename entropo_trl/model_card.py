"""The model card written next to each trained adapter (and pushed with it): base model, stage, α, β, data, LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_CARD = """---
base_model: {base_model}
library_name: peft
tags:
- entropo
- entropo-trl
- {stage}
- trl
---

# {name}

{description} of [{base_model}](https://huggingface.co/{base_model}), trained with
[entropo-trl](https://github.com/entropo-trl/entropo-trl) {version} on top of TRL {trl_version}.

| setting | value |
|---|---|
| stage | {stage} |
| base model | {base_model} |
| alpha (α) | {alpha} |
| beta (β) | {beta} |
| data | {dataset} |
| LoRA | {lora} |

α is the absolute coefficient of the policy's log-probs (α = λ + β, λ the entropy-bonus weight); the paper's
"α = 1.1" is α / β. Method: EntroPO, "Building Coding Agents via Entropy-Enhanced Multi-Turn Preference Optimization".
"""

DESCRIPTIONS = {
    "sft": "Supervised fine-tuning (assistant turns only)",
    "edpo": "EntroPO-DPO",
    "ekto": "EntroPO-KTO",
    "verifier": "A trajectory verifier (judgement YES / NO)",
}


def write_model_card(
    output_dir: str,
    *,
    base_model: str,
    stage: str,
    dataset: str | None,
    alpha: Any = None,
    beta: Any = None,
    lora: str = "",
) -> Path:
    """README.md next to the adapter: base model, stage, α, β, the data and the library."""
    import trl

    from . import __version__

    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        MODEL_CARD.format(
            base_model=base_model,
            stage=stage,
            name=Path(output_dir).name,
            description=DESCRIPTIONS.get(stage, stage),
            version=__version__,
            trl_version=trl.__version__,
            alpha="n/a" if alpha is None else alpha,
            beta="n/a" if beta is None else beta,
            dataset=dataset or "n/a",
            lora=lora or "none",
        )
    )
    return path

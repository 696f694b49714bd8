"""entropo-trl: EntroPO (entropy-enhanced multi-turn preference optimisation) for coding agents, on TRL.

Every public name is imported on first use, so that `import entropo_trl` loads neither torch, TRL, the rollout
engine (aiohttp) nor matplotlib, and the `entropo` command starts quickly.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "EntroDPOConfig": ".dpo_config",
    "DataCollatorForMultiTurnPreference": ".dpo_trainer",
    "EntroDPOTrainer": ".dpo_trainer",
    "EntroKTOConfig": ".kto_config",
    "DataCollatorForMultiTurnUnpairedPreference": ".kto_trainer",
    "EntroKTOTrainer": ".kto_trainer",
    "entropo_dpo_loss": ".losses",
    "entropo_kto_loss": ".losses",
    "entropo_kto_z0": ".losses",
    "TemplateNotPrefixPreservingError": ".multiturn",
    "assistant_token_mask": ".multiturn",
    "tokenize_prompt_completion": ".multiturn",
    # the trajectory record and the row builders
    "Trajectory": ".data.trajectory",
    "read_trajectories": ".data.readers",
    "write_trajectories": ".data.trajectory",
    "build_sft_rows": ".data.builders",
    "build_dpo_pairs": ".data.builders",
    "build_kto_rows": ".data.builders",
    "build_verifier_rows": ".data.builders",
    # test-time scaling: the hybrid selector and the metrics
    "HybridSelector": ".evaluation.selection",
    "SelectorConfig": ".evaluation.selection",
    "group_by_instance": ".evaluation.selection",
    "pass_at_k": ".evaluation.metrics",
    "best_of_n_curve": ".evaluation.metrics",
    "pool_diversity": ".evaluation.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # pragma: no cover (for type checkers and IDEs)
    from .data.builders import build_dpo_pairs, build_kto_rows, build_sft_rows, build_verifier_rows  # noqa: F401
    from .data.readers import read_trajectories  # noqa: F401
    from .data.trajectory import Trajectory, write_trajectories  # noqa: F401
    from .dpo_config import EntroDPOConfig  # noqa: F401
    from .dpo_trainer import DataCollatorForMultiTurnPreference, EntroDPOTrainer  # noqa: F401
    from .evaluation.metrics import best_of_n_curve, pass_at_k, pool_diversity  # noqa: F401
    from .evaluation.selection import HybridSelector, SelectorConfig, group_by_instance  # noqa: F401
    from .kto_config import EntroKTOConfig  # noqa: F401
    from .kto_trainer import DataCollatorForMultiTurnUnpairedPreference, EntroKTOTrainer  # noqa: F401
    from .losses import entropo_dpo_loss, entropo_kto_loss, entropo_kto_z0  # noqa: F401
    from .multiturn import TemplateNotPrefixPreservingError, assistant_token_mask, tokenize_prompt_completion  # noqa: F401

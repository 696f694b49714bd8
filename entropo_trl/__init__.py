"""entropo-trl: EntroPO (entropy-enhanced multi-turn preference optimisation) for coding agents, on TRL.

The trainers and losses are imported on first use, so that the data and rollout tools (`entropo-data`,
`entropo-rollout`) start without loading torch and TRL.
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
    from .dpo_config import EntroDPOConfig  # noqa: F401
    from .dpo_trainer import DataCollatorForMultiTurnPreference, EntroDPOTrainer  # noqa: F401
    from .kto_config import EntroKTOConfig  # noqa: F401
    from .kto_trainer import DataCollatorForMultiTurnUnpairedPreference, EntroKTOTrainer  # noqa: F401
    from .losses import entropo_dpo_loss, entropo_kto_loss, entropo_kto_z0  # noqa: F401
    from .multiturn import TemplateNotPrefixPreservingError, assistant_token_mask, tokenize_prompt_completion  # noqa: F401

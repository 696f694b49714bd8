"""entropo-trl: EntroPO (entropy-enhanced multi-turn preference optimisation) for coding agents, on TRL."""

from .dpo_config import EntroDPOConfig
from .dpo_trainer import DataCollatorForMultiTurnPreference, EntroDPOTrainer
from .kto_config import EntroKTOConfig
from .kto_trainer import DataCollatorForMultiTurnUnpairedPreference, EntroKTOTrainer
from .losses import entropo_dpo_loss, entropo_kto_loss, entropo_kto_z0
from .multiturn import TemplateNotPrefixPreservingError, assistant_token_mask, tokenize_prompt_completion

__version__ = "0.1.0"

__all__ = [
    "DataCollatorForMultiTurnPreference",
    "DataCollatorForMultiTurnUnpairedPreference",
    "EntroDPOConfig",
    "EntroDPOTrainer",
    "EntroKTOConfig",
    "EntroKTOTrainer",
    "TemplateNotPrefixPreservingError",
    "assistant_token_mask",
    "entropo_dpo_loss",
    "entropo_kto_loss",
    "entropo_kto_z0",
    "tokenize_prompt_completion",
]

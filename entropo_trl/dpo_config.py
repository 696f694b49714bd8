"""Configuration for [`EntroDPOTrainer`]."""

import warnings
from dataclasses import dataclass, field

from trl import DPOConfig

from .losses import check_coefficient


def validate_alpha(alpha: float | None, beta: float) -> None:
    """Raise on invalid α / β; warn when α < β (allowed by the maths, but a negative entropy weight λ = α − β)."""
    check_coefficient("beta", beta)
    if alpha is None:
        return
    try:
        check_coefficient("alpha", alpha)
    except ValueError as error:
        raise ValueError(f"{error} (or None, which means alpha = beta)") from None
    if alpha < beta:
        warnings.warn(
            f"alpha ({alpha}) < beta ({beta}): the entropy weight lambda = alpha - beta is negative, which rewards "
            "lower entropy. EntroPO uses alpha >= beta (the authors train with beta = 0.1, alpha = 0.11; alpha in "
            "[0.105, 0.15] trains stably). Note that alpha is absolute: the paper's 'alpha = 1.1' is alpha / beta.",
            UserWarning,
            stacklevel=3,
        )


def reject_options(args, unsupported: dict[str, tuple[object, str]]) -> None:
    """Raise naming every TRL option set away from the value the EntroPO subclass supports."""
    bad = []
    for name, (supported, why) in unsupported.items():
        value = getattr(args, name, supported)
        if value != supported:
            bad.append(f"`{name}={value!r}` ({why}; supported: {supported!r})")
    if bad:
        raise ValueError(f"{type(args).__name__}: unsupported option(s) for EntroPO: " + "; ".join(bad))


# TRL DPO options that change the loss away from EntroPO-DPO's sigmoid, or that the subclass cannot honour.
DPO_UNSUPPORTED = {
    "loss_type": (["sigmoid"], "EntroPO-DPO is the sigmoid loss of eq. (6)"),
    "loss_weights": (None, "EntroPO-DPO is a single loss"),
    "ld_alpha": (None, "LD-DPO length weighting is not part of EntroPO"),
    "f_divergence_type": ("reverse_kl", "EntroPO-DPO uses the reverse-KL (standard DPO) form"),
    "label_smoothing": (0.0, "label smoothing only applies to robust/EXO losses"),
    "use_weighting": (False, "WPO weighting is not part of EntroPO"),
    "sync_ref_model": (False, "EntroPO keeps the SFT reference fixed"),
    "padding_free": (False, "TRL 1.16 disables padding-free DPO"),
    # accepted by TRL but without effect on the sigmoid loss: refused rather than silently ignored
    "discopop_tau": (0.05, "it only applies to the DiscoPOP loss"),
    "f_alpha_divergence_coef": (0.5, "it only applies to the alpha-divergence form"),
    "label_smoothing_factor": (0.0, "TRL's preference losses do not use the Trainer's label smoother"),
}


class EntroPOConfigMixin:
    """What both EntroPO configs share beyond their fields."""

    @property
    def effective_alpha(self) -> float:
        """α, with `None` resolved to β."""
        return self.beta if self.alpha is None else float(self.alpha)


@dataclass
class EntroDPOConfig(EntroPOConfigMixin, DPOConfig):
    r"""
    Configuration class for [`EntroDPOTrainer`]: TRL's [`~trl.DPOConfig`] plus the EntroPO coefficients.

    EntroPO-DPO (eq. 6 of the EntroPO paper) minimises `−log σ(α·(logp(y+) − logp(y−)) − β·(ref(y+) − ref(y−)))`,
    with log-probs summed over assistant tokens only.

    Mixture-of-experts policies: TRL adds its router load-balancing loss (`router_aux_loss_coef`, default the model's own
    coefficient, logged as `aux_loss`) to the EntroPO loss; set `router_aux_loss_coef=0.0` for the pure EntroPO loss.

    Parameters:
        alpha (`float` or `None`, *optional*, defaults to `None`):
            α, the absolute coefficient of the policy log-probs: α = λ + β with λ ≥ 0 the entropy-bonus weight.
            `None` means α = β (stock DPO). The authors use β = 0.1, α = 0.11 (the paper's "α = 1.1" is α/β).
            α < β warns.
        assistant_only (`bool`, *optional*, defaults to `True`):
            For conversational data whose completions are multi-turn lists, score and train only the tokens of
            assistant turns (content and end-of-turn token), never the tool observations. `False` gives TRL's
            tokenization, where every completion token counts.

    All other parameters are those of [`~trl.DPOConfig`]; `beta` is β. Options that change the loss away from
    EntroPO-DPO (`loss_type` other than `"sigmoid"`, `ld_alpha`, `f_divergence_type`, `use_weighting`, ...) raise.
    """

    alpha: float | None = field(
        default=None,
        metadata={
            "help": "EntroPO alpha, the absolute coefficient of the policy log-probs (alpha = lambda + beta, lambda "
            ">= 0 the entropy weight). None means alpha = beta: stock DPO. The authors use beta=0.1, alpha=0.11 (the "
            "paper's 'alpha = 1.1' is alpha/beta). alpha < beta warns."
        },
    )
    assistant_only: bool = field(
        default=True,
        metadata={
            "help": "Score and train only assistant-turn tokens (content + end-of-turn token) of multi-turn "
            "conversational completions; tool observations are masked. False: every completion token counts."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        validate_alpha(self.alpha, self.beta)
        reject_options(self, DPO_UNSUPPORTED)

"""Configuration for [`EntroKTOTrainer`]."""

from dataclasses import dataclass, field

from trl import KTOConfig

from .dpo_config import EntroPOConfigMixin, reject_options, validate_alpha
from .losses import KTO_VARIANTS

# TRL KTO options that change the loss away from EntroPO-KTO, or that the subclass cannot honour.
KTO_UNSUPPORTED = {
    "loss_type": ("kto", "EntroPO-KTO needs the KL reference point z0, which 'apo_zero_unpaired' does not estimate"),
    "sync_ref_model": (False, "EntroPO keeps the SFT reference fixed"),
    "label_smoothing_factor": (0.0, "TRL's preference losses do not use the Trainer's label smoother"),
}


@dataclass
class EntroKTOConfig(EntroPOConfigMixin, KTOConfig):
    r"""
    Configuration class for [`EntroKTOTrainer`]: TRL's [`~trl.KTOConfig`] plus the EntroPO coefficients.

    EntroPO-KTO (eqs. 7-8 of the EntroPO paper), with r(y) = logp(y) − (β/α)·ref(y) summed over assistant tokens:
    desirable `λ+·(1 − σ(α·(r − z0)))`, undesirable `λ−·(1 − σ(α·(z0 − r)))`, z0 the batch mean of r over the
    mismatched (KL) samples, averaged across processes.

    Mixture-of-experts policies: TRL adds its router load-balancing loss (`router_aux_loss_coef`, default the model's own
    coefficient, logged as `aux_loss`) to the EntroPO loss; set `router_aux_loss_coef=0.0` for the pure EntroPO loss.

    Parameters:
        alpha (`float` or `None`, *optional*, defaults to `None`):
            α, the absolute coefficient (α = λ + β, λ ≥ 0 the entropy weight). `None` means α = β (stock KTO).
            The authors use β = 0.1, α = 0.11. α < β warns.
        z0_clamp (`bool`, *optional*, defaults to `False`):
            Clamp z0 at ≥ 0 as TRL clamps its KL estimate. The paper-faithful default does not: for α > β on long
            trajectories z0 is large and negative, and clamping it to 0 makes the gradients vanish. With
            `z0_clamp=True` and α = β the loss equals TRL's KTO exactly.
        kto_variant (`str`, *optional*, defaults to `"paper"`):
            `"paper"` (eqs. 7-8) or `"reference_code"`, the authors' released code, needed to reproduce their
            checkpoint: r = logp − ref, z = clamp≥0(mean[α·logp(y') − β·ref(y')]), sigmoid scaled by β.
        assistant_only (`bool`, *optional*, defaults to `True`):
            For conversational data whose completions are multi-turn lists, score only assistant-turn tokens, in the
            examples and in the mismatched KL samples alike.

    All other parameters are those of [`~trl.KTOConfig`]; `beta` is β, `desirable_weight` / `undesirable_weight` are
    λ+ / λ−.
    """

    alpha: float | None = field(
        default=None,
        metadata={
            "help": "EntroPO alpha, the absolute coefficient (alpha = lambda + beta, lambda >= 0 the entropy weight). "
            "None means alpha = beta: stock KTO. The authors use beta=0.1, alpha=0.11. alpha < beta warns."
        },
    )
    z0_clamp: bool = field(
        default=False,
        metadata={
            "help": "Clamp the KTO reference point z0 at >= 0, as TRL does. The paper-faithful default (False) does "
            "not: for alpha > beta z0 is large and negative on long trajectories, and clamping kills the gradients. "
            "With True and alpha = beta the loss equals TRL's KTO."
        },
    )
    kto_variant: str = field(
        default="paper",
        metadata={
            "help": "'paper' (eqs. 7-8 of the EntroPO paper) or 'reference_code' (the authors' released code: "
            "r = logp - ref, z = clamp(mean[alpha*logp' - beta*ref']), sigmoid scaled by beta).",
            "choices": list(KTO_VARIANTS),
        },
    )
    assistant_only: bool = field(
        default=True,
        metadata={
            "help": "Score and train only assistant-turn tokens of multi-turn conversational completions (and of the "
            "mismatched KL samples); tool observations are masked. False: every completion token counts."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        validate_alpha(self.alpha, self.beta)
        if self.kto_variant not in KTO_VARIANTS:
            raise ValueError(f"`kto_variant` must be one of {KTO_VARIANTS}, got {self.kto_variant!r}")
        if not isinstance(self.z0_clamp, bool):
            raise ValueError(f"`z0_clamp` must be a bool, got {self.z0_clamp!r}")
        reject_options(self, KTO_UNSUPPORTED)

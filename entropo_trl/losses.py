"""EntroPO losses as pure tensor functions (paper eqs. 6-8; docs/design.md, "The losses").

Tensors in, tensors out: no TRL, no config. Every `*_logps` argument is a *sum* of per-token log-probabilities over the
assistant tokens of a trajectory (never a mean), shape `(batch,)`.

Units: `beta` (β) is TRL's usual KL coefficient; `alpha` (α) is absolute, α = λ + β with λ ≥ 0 the entropy-bonus
weight. α = β is plain DPO / KTO. The paper's "α = 1.1" is the ratio α/β (the authors train with β = 0.1, α = 0.11).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

KTO_VARIANTS = ("paper", "reference_code")


def check_coefficient(name: str, value: float) -> None:
    """Raise unless `value` is a positive finite number (booleans are refused). Shared by the losses and the configs."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}")


def _check_coefficients(alpha: float, beta: float) -> None:
    check_coefficient("alpha", alpha)
    check_coefficient("beta", beta)


def _check_variant(variant: str) -> None:
    if variant not in KTO_VARIANTS:
        raise ValueError(f"variant must be one of {KTO_VARIANTS}, got {variant!r}")


def entropo_dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EntroPO-DPO, eq. (6) of the EntroPO paper.

        logits    = α·(logp(y+) − logp(y−)) − β·(ref(y+) − ref(y−))
        loss      = −log σ(logits)
        reward(y) = α·logp(y) − β·ref(y)

    Equivalently TRL's sigmoid DPO with β replaced by α and every reference log-prob multiplied by β/α; at α = β it is
    exactly DPO.

    Args:
        chosen_logps, rejected_logps: `(batch,)` policy log-probs of the preferred / dispreferred trajectories.
        ref_chosen_logps, ref_rejected_logps: `(batch,)` the same under the frozen reference policy.
        alpha: α, the coefficient of the policy log-probs (α = λ + β).
        beta: β, the coefficient of the reference log-probs.

    Returns:
        `(losses, chosen_rewards, rejected_rewards)`, each `(batch,)`; rewards are detached.
    """
    _check_coefficients(alpha, beta)
    logits = alpha * (chosen_logps - rejected_logps) - beta * (ref_chosen_logps - ref_rejected_logps)  # (batch,)
    losses = -F.logsigmoid(logits)
    chosen_rewards = (alpha * chosen_logps - beta * ref_chosen_logps).detach()
    rejected_rewards = (alpha * rejected_logps - beta * ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def entropo_kto_z0(
    kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    clamp: bool = False,
    variant: str = "paper",
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The KTO reference point z0 from the batch's mismatched (KL) samples, eq. (8) of the EntroPO paper.

    `variant="paper"`:
        z0 = mean over y' of [logp(y') − (β/α)·ref(y')], detached; clamped at ≥ 0 only when `clamp=True`.
        z0 estimates −H(π) + (β/α)·H(π, π_ref); for α > β on long trajectories it is large and negative, so clamping
        it (as TRL does) pushes α·(r − z0) into the sigmoid's flat tail. The paper-faithful default does not clamp.
    `variant="reference_code"` (the authors' released code; docs/design.md, "The authors' released KTO code"):
        z = clamp≥0(mean over y' of [α·logp(y') − β·ref(y')]). The authors always clamp, so `clamp` has no further
        effect in this variant.

    Args:
        kl_logps, ref_kl_logps: `(batch,)` policy / reference log-probs of the mismatched samples.
        alpha, beta: α and β (see module docstring).
        clamp: clamp the paper's z0 at ≥ 0 (TRL's behaviour; with α = β this reproduces TRL's KTO exactly).
        variant: `"paper"` or `"reference_code"`.
        reduce_fn: applied to the local mean before clamping, e.g. an average across processes.

    Returns:
        A detached scalar tensor.
    """
    _check_coefficients(alpha, beta)
    _check_variant(variant)
    if kl_logps.shape != ref_kl_logps.shape:
        raise ValueError(f"kl_logps {tuple(kl_logps.shape)} and ref_kl_logps {tuple(ref_kl_logps.shape)} differ")
    if variant == "paper":
        z0 = (kl_logps - (beta / alpha) * ref_kl_logps).mean().detach()
    else:
        z0 = (alpha * kl_logps - beta * ref_kl_logps).mean().detach()
    if reduce_fn is not None:
        z0 = reduce_fn(z0)
    if clamp or variant == "reference_code":
        z0 = z0.clamp(min=0)
    return z0


def entropo_kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    z0: torch.Tensor | float,
    *,
    alpha: float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    variant: str = "paper",
) -> tuple[torch.Tensor, torch.Tensor]:
    """EntroPO-KTO, eq. (7) of the EntroPO paper, per example.

    `variant="paper"`:
        r(y) = logp(y) − (β/α)·ref(y)
        desirable:    λ+ · (1 − σ(α·(r(y) − z0)))
        undesirable:  λ− · (1 − σ(α·(z0 − r(y))))
        reward(y) = α·r(y) = α·logp(y) − β·ref(y)
    `variant="reference_code"` (the authors' released code):
        r(y) = logp(y) − ref(y);  desirable 1 − σ(β·(r − z)), undesirable 1 − σ(β·(z − r));  reward = β·r(y)

    λ+ / λ− are KTO's desirable / undesirable weights (not the entropy weight λ).

    Args:
        logps, ref_logps: `(batch,)` policy / reference log-probs of each example's own completion.
        labels: `(batch,)` boolean, True for desirable.
        z0: the reference point from [`entropo_kto_z0`] (a scalar).
        alpha, beta: α and β.
        desirable_weight, undesirable_weight: λ+ and λ−.
        variant: `"paper"` or `"reference_code"`.

    Returns:
        `(losses, rewards)`, each `(batch,)` in the examples' order; rewards are detached.
    """
    _check_coefficients(alpha, beta)
    _check_variant(variant)
    labels = torch.as_tensor(labels, device=logps.device).bool()
    if labels.shape != logps.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and logps {tuple(logps.shape)} differ")
    if variant == "paper":
        r = logps - (beta / alpha) * ref_logps  # (batch,)
        scale = alpha
    else:
        r = logps - ref_logps
        scale = beta
    desirable = desirable_weight * (1 - torch.sigmoid(scale * (r - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(scale * (z0 - r)))
    losses = torch.where(labels, desirable, undesirable)
    rewards = (scale * r).detach()
    return losses, rewards

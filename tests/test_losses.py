"""The pure losses against numbers computed by hand with plain floats."""

import math

import pytest
import torch
import torch.nn.functional as F

from entropo_trl import entropo_dpo_loss, entropo_kto_loss, entropo_kto_z0


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_hand_computed():
    # logits = 0.11 * (-10 - -12) - 0.1 * (-11 - -11) = 0.22
    losses, chosen_rewards, rejected_rewards = entropo_dpo_loss(
        torch.tensor([-10.0]),
        torch.tensor([-12.0]),
        torch.tensor([-11.0]),
        torch.tensor([-11.0]),
        alpha=0.11,
        beta=0.1,
    )
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.22)), abs=1e-6)
    assert chosen_rewards.item() == pytest.approx(0.11 * -10 - 0.1 * -11, abs=1e-6)  # 0.0
    assert rejected_rewards.item() == pytest.approx(0.11 * -12 - 0.1 * -11, abs=1e-6)  # -0.22


def test_dpo_at_alpha_equal_beta_is_dpo():
    gen = torch.Generator().manual_seed(0)
    c, r, rc, rr = (-500 * torch.rand(16, generator=gen) for _ in range(4))
    beta = 0.1
    losses, _, _ = entropo_dpo_loss(c, r, rc, rr, alpha=beta, beta=beta)
    torch.testing.assert_close(losses, -F.logsigmoid(beta * ((c - r) - (rc - rr))), atol=1e-6, rtol=1e-6)


def test_dpo_entropy_term_changes_the_loss():
    c, r, rc, rr = torch.tensor([-100.0]), torch.tensor([-120.0]), torch.tensor([-100.0]), torch.tensor([-120.0])
    dpo, _, _ = entropo_dpo_loss(c, r, rc, rr, alpha=0.1, beta=0.1)
    entro, _, _ = entropo_dpo_loss(c, r, rc, rr, alpha=0.11, beta=0.1)
    assert dpo.item() == pytest.approx(math.log(2))
    assert entro.item() == pytest.approx(math.log1p(math.exp(-(0.11 * 20 - 0.1 * 20))), abs=1e-6)


def test_dpo_gradients_scale_with_alpha():
    c = torch.tensor([-10.0], requires_grad=True)
    loss, _, _ = entropo_dpo_loss(
        c, torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), alpha=0.11, beta=0.1
    )
    loss.sum().backward()
    assert c.grad.item() == pytest.approx(-0.11 * (1 - sigmoid(0.22)), abs=1e-6)


KL, REF_KL = [-15.0, -17.0], [-14.0, -18.0]
LOGPS, REF, LABELS = [-10.0, -20.0], [-11.0, -19.0], [True, False]


def test_kto_z0_paper_hand_computed():
    expected = ((-15 + 14 * 0.1 / 0.11) + (-17 + 18 * 0.1 / 0.11)) / 2  # -1.4545...
    z0 = entropo_kto_z0(torch.tensor(KL), torch.tensor(REF_KL), alpha=0.11, beta=0.1)
    assert z0.item() == pytest.approx(expected, abs=1e-5)
    clamped = entropo_kto_z0(torch.tensor(KL), torch.tensor(REF_KL), alpha=0.11, beta=0.1, clamp=True)
    assert clamped.item() == 0.0
    assert not z0.requires_grad


def test_kto_z0_reduce_fn_runs_before_clamp():
    z0 = entropo_kto_z0(
        torch.tensor(KL), torch.tensor(REF_KL), alpha=0.11, beta=0.1, clamp=True, reduce_fn=lambda z: z + 10.0
    )
    assert z0.item() == pytest.approx(-1.4545454 + 10.0, abs=1e-5)


def test_kto_z0_reference_code_hand_computed():
    # mean(0.11*kl - 0.1*ref_kl) = mean(-1.65 + 1.4, -1.87 + 1.8) = -0.16 -> clamped to 0
    z = entropo_kto_z0(torch.tensor(KL), torch.tensor(REF_KL), alpha=0.11, beta=0.1, variant="reference_code")
    assert z.item() == 0.0
    z = entropo_kto_z0(torch.tensor([-1.0]), torch.tensor([-20.0]), alpha=0.11, beta=0.1, variant="reference_code")
    assert z.item() == pytest.approx(-0.11 + 2.0, abs=1e-6)


def test_kto_loss_paper_hand_computed():
    alpha, beta = 0.11, 0.1
    z0 = ((-15 + 14 * beta / alpha) + (-17 + 18 * beta / alpha)) / 2
    r = [LOGPS[0] - beta / alpha * REF[0], LOGPS[1] - beta / alpha * REF[1]]  # [0, -2.7272...]
    losses, rewards = entropo_kto_loss(
        torch.tensor(LOGPS),
        torch.tensor(REF),
        torch.tensor(LABELS),
        torch.tensor(z0),
        alpha=alpha,
        beta=beta,
        desirable_weight=1.5,
        undesirable_weight=0.5,
    )
    assert losses[0].item() == pytest.approx(1.5 * (1 - sigmoid(alpha * (r[0] - z0))), abs=1e-6)
    assert losses[1].item() == pytest.approx(0.5 * (1 - sigmoid(alpha * (z0 - r[1]))), abs=1e-6)
    assert rewards.tolist() == pytest.approx(
        [alpha * LOGPS[0] - beta * REF[0], alpha * LOGPS[1] - beta * REF[1]], abs=1e-5
    )


def test_kto_loss_reference_code_hand_computed():
    losses, rewards = entropo_kto_loss(
        torch.tensor(LOGPS),
        torch.tensor(REF),
        torch.tensor(LABELS),
        0.5,
        alpha=0.11,
        beta=0.1,
        variant="reference_code",
    )
    assert losses[0].item() == pytest.approx(1 - sigmoid(0.1 * (1.0 - 0.5)), abs=1e-6)
    assert losses[1].item() == pytest.approx(1 - sigmoid(0.1 * (0.5 - -1.0)), abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.1, -0.1], abs=1e-6)


def test_kto_at_alpha_equal_beta_with_clamp_is_kto():
    gen = torch.Generator().manual_seed(0)
    logps, ref = -300 * torch.rand(8, generator=gen), -300 * torch.rand(8, generator=gen)
    kl, ref_kl = -300 * torch.rand(8, generator=gen), -300 * torch.rand(8, generator=gen)
    labels = torch.arange(8) % 2 == 0
    beta = 0.1
    z0 = entropo_kto_z0(kl, ref_kl, alpha=beta, beta=beta, clamp=True)
    losses, _ = entropo_kto_loss(logps, ref, labels, z0, alpha=beta, beta=beta)
    kto_kl = (kl - ref_kl).mean().clamp(min=0)  # TRL's KTO, eqn (7) of the KTO paper
    expected = torch.where(
        labels, 1 - torch.sigmoid(beta * (logps - ref - kto_kl)), 1 - torch.sigmoid(beta * (kto_kl - (logps - ref)))
    )
    torch.testing.assert_close(losses, expected, atol=1e-6, rtol=1e-6)


def test_unclamped_z0_keeps_gradients_on_long_trajectories():
    """At alpha > beta, z0 ~ (1 - beta/alpha) * ref is large and negative; clamping it kills the sigmoid's gradient."""
    alpha, beta = 0.11, 0.1
    ref = torch.tensor([-1800.0, -1750.0])
    logps = ref.clone().requires_grad_(True)
    labels = torch.tensor([True, False])
    for clamp, bound in ((False, 1e-3), (True, None)):
        z0 = entropo_kto_z0(logps.detach(), ref, alpha=alpha, beta=beta, clamp=clamp)
        losses, _ = entropo_kto_loss(logps, ref, labels, z0, alpha=alpha, beta=beta)
        (grad,) = torch.autograd.grad(losses.sum(), logps)
        if bound is not None:
            assert z0.item() < -100
            assert (grad.abs() > bound).all()
        else:
            assert z0.item() == 0.0
            assert (grad.abs() < 1e-7).all()


@pytest.mark.parametrize("alpha, beta", [(0.0, 0.1), (-1.0, 0.1), (0.1, 0.0), (float("nan"), 0.1)])
def test_invalid_coefficients_raise(alpha, beta):
    with pytest.raises(ValueError):
        entropo_dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), alpha=alpha, beta=beta)


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match="variant"):
        entropo_kto_z0(torch.zeros(2), torch.zeros(2), alpha=0.1, beta=0.1, variant="authors")


def test_losses_refuse_bad_coefficients():
    c, r = torch.tensor([-1.0]), torch.tensor([-2.0])
    for bad in (0.0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="positive finite"):
            entropo_dpo_loss(c, r, c, r, alpha=bad, beta=0.1)
        with pytest.raises(ValueError, match="positive finite"):
            entropo_kto_z0(c, r, alpha=0.11, beta=bad)

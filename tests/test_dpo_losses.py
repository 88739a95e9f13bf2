"""Preference losses against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from src.losses.dpo import (PREFERENCE_LOSSES, gdpo_loss, ipo_loss, logratio_margin, preference_stats, rewards,
                            sigmoid_dpo_loss)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_policy_equal_to_reference_gives_log_2_and_zero_rewards():
    """h = 0 for every example -> -log sigmoid(0) = log 2; rewards beta * 0 = 0; margin 0 is not a win."""
    policy_c, policy_r = t(-12.0, -3.5, -40.0), t(-20.0, -1.0, -41.0)
    loss = sigmoid_dpo_loss(policy_c, policy_r, policy_c.clone(), policy_r.clone(), beta=0.1)
    assert loss.shape == (3,)
    assert torch.allclose(loss, torch.full((3,), math.log(2.0), dtype=torch.float64), atol=1e-12)
    stats = preference_stats(policy_c, policy_r, policy_c.clone(), policy_r.clone(), beta=0.1)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert torch.equal(stats[name], torch.zeros(3, dtype=stats[name].dtype)), name
    assert torch.equal(stats["logps/chosen"], policy_c) and torch.equal(stats["logps/rejected"], policy_r)


def test_known_margins_give_minus_log_sigmoid_of_beta_times_margin():
    """Reference 0; policy chosen 0/10/20 over rejected: h = 0, 10, 20; beta 0.1 -> -log sigmoid([0, 1, 2])
    = [0.693147, 0.313262, 0.126928]."""
    policy_c, policy_r = t(-5.0, 5.0, -10.0), t(-5.0, -5.0, -30.0)
    zeros = torch.zeros(3, dtype=torch.float64)
    loss = sigmoid_dpo_loss(policy_c, policy_r, zeros, zeros, beta=0.1)
    assert loss.tolist() == pytest.approx([0.6931471805599453, 0.31326168751822286, 0.12692801104297263], abs=1e-12)
    stats = preference_stats(policy_c, policy_r, zeros, zeros, beta=0.1)
    assert stats["rewards/chosen"].tolist() == pytest.approx([-0.5, 0.5, -1.0])
    assert stats["rewards/rejected"].tolist() == pytest.approx([-0.5, -0.5, -3.0])
    assert stats["rewards/margins"].tolist() == pytest.approx([0.0, 1.0, 2.0])
    assert stats["rewards/accuracies"].tolist() == [0.0, 1.0, 1.0]


def test_the_reference_shifts_the_margin():
    """policy (-10, -12), ref (-11, -9): h = (-10 + 11) - (-12 + 9) = 1 + 3 = 4; beta 0.5 -> -log sigmoid(2)."""
    assert logratio_margin(t(-10.0), t(-12.0), t(-11.0), t(-9.0)).item() == 4.0
    assert sigmoid_dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-9.0), beta=0.5).item() == pytest.approx(
        0.12692801104297263, abs=1e-12)
    assert rewards(t(-10.0), t(-11.0), beta=0.5).item() == 0.5


def test_ipo_formula():
    """(h - 1/(2 beta))^2 with beta 0.1 (target 5): h = 0 -> 25, h = 5 -> 0, h = 8 -> 9, h = -1 -> 36."""
    zeros = torch.zeros(4, dtype=torch.float64)
    loss = ipo_loss(t(0.0, 5.0, 8.0, -1.0), zeros, zeros, zeros, beta=0.1)
    assert loss.tolist() == pytest.approx([25.0, 0.0, 9.0, 36.0])
    # beta 0.25: target 2; h = 3 -> 1
    assert ipo_loss(t(-1.0), t(-2.0), t(-3.0), t(-1.0), beta=0.25).item() == pytest.approx((3 - 2) ** 2)


def test_gdpo_adds_exactly_lambda_times_ce():
    """gDPO - DPO == gt_weight * CE per example, for both preference losses; gt_weight 0 is plain DPO."""
    pc, pr, rc, rr = t(-3.0, -7.0), t(-4.0, -2.0), t(-3.5, -6.0), t(-3.0, -2.5)
    gt_ce = t(2.25, 0.5)
    for name, preference in PREFERENCE_LOSSES.items():
        base = preference(pc, pr, rc, rr, beta=0.1)
        guided = gdpo_loss(pc, pr, rc, rr, gt_ce, beta=0.1, gt_weight=0.1, preference=preference)
        assert torch.allclose(guided - base, 0.1 * gt_ce, atol=1e-12), name
        assert torch.equal(gdpo_loss(pc, pr, rc, rr, gt_ce, beta=0.1, gt_weight=0.0, preference=preference), base)
    # by hand, sigmoid: h = (0.5) - (-1.0) = 1.5 -> -log sigmoid(0.15) = 0.62095...; + 0.1 * 2.25
    assert gdpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], gt_ce[:1]).item() == pytest.approx(
        math.log1p(math.exp(-0.15)) + 0.225, abs=1e-12)


def test_loss_gradient_pushes_chosen_up_and_rejected_down():
    """d/d policy_chosen of -log sigmoid(beta h) = -beta * sigmoid(-beta h): at h = 0, -beta / 2 (= +beta/2 for
    rejected)."""
    pc, pr = t(-1.0).requires_grad_(), t(-1.0).requires_grad_()
    sigmoid_dpo_loss(pc, pr, t(-1.0), t(-1.0), beta=0.1).sum().backward()
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)

"""Router losses against values computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from lte_convert.converter.losses import (SEP_EPS, efficiency_loss, fraction_off, router_loss,
                              separability_loss)


def test_efficiency_loss_is_mean_over_experts_then_layers():
    a = torch.tensor([[0.1, 0.3], [0.5, 0.7]])          # mean 0.4
    b = torch.tensor([[0.9, 0.9, 0.9, 0.9]])            # mean 0.9
    assert efficiency_loss([a, b]).item() == pytest.approx((0.4 + 0.9) / 2)


def test_separability_loss_hand_values():
    g = torch.tensor([0.0, 1.0, 0.6, 0.5])
    eps = SEP_EPS
    want = (1 / (0.25 + eps) + 1 / (0.25 + eps) + 1 / (0.01 + eps) + 1 / eps) / 4
    assert separability_loss([g]).item() == pytest.approx(want, rel=1e-6)
    assert separability_loss([g], tau=0.0).item() == pytest.approx(
        (1 / eps + 1 / (1 + eps) + 1 / (0.36 + eps) + 1 / (0.25 + eps)) / 4, rel=1e-6)


def test_separability_loss_is_finite_and_bounded_at_tau():
    g = torch.full((3, 5), 0.5, requires_grad=True)
    loss = separability_loss([g])
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(1 / SEP_EPS)
    assert torch.isfinite(g.grad).all()


def test_separability_gradient_pushes_scores_away_from_tau():
    g = torch.tensor([0.4, 0.6], requires_grad=True)
    separability_loss([g]).backward()
    assert g.grad[0] > 0 and g.grad[1] < 0              # descent moves 0.4 down, 0.6 up


def test_router_loss_combines_with_eta_and_lambda():
    g = [torch.tensor([[0.2, 0.8]])]
    total, parts = router_loss(g, eta=2.0, lam=0.5)
    sep = 1 / (0.09 + SEP_EPS)
    assert parts["l_eff"] == pytest.approx(0.5)
    assert parts["l_sep"] == pytest.approx(sep, rel=1e-6)
    assert total.item() == pytest.approx(2.0 * 0.5 + 0.5 * sep, rel=1e-6)


def test_fraction_off_counts_scores_at_or_below_tau():
    assert fraction_off([torch.tensor([0.1, 0.5, 0.51, 0.9])]).item() == pytest.approx(0.5)


def test_distillation_loss_hand_value():
    from lte_convert.converter.losses import distillation_loss

    t = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)]])
    s = torch.tensor([[math.log(0.25), math.log(0.5), math.log(0.25)]])
    want = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5) + 0.25 * math.log(1.0)
    assert distillation_loss(s, t).item() == pytest.approx(want, rel=1e-6)
    assert distillation_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)
    both = torch.stack([s[0], t[0]])[None]                         # [1, 2, V]: KL want, 0
    assert distillation_loss(both, torch.stack([t[0], t[0]])[None]).item() == pytest.approx(
        want / 2, rel=1e-6)
    keep = torch.tensor([[True, False]])
    assert distillation_loss(both, torch.stack([t[0], t[0]])[None], keep).item() == \
        pytest.approx(want, rel=1e-6)

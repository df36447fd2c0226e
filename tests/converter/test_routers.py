"""The router start on a real pretrained model (glassllm): co-activation grouping keeps the
function, the fitted routers find the oracle's experts, allocation and per-layer calibration
hit their targets."""
from __future__ import annotations

import pytest
import torch

from lte_convert.converter.calibrate import calibrate_layers
from lte_convert.converter.data import pack, read_documents, spread
from lte_convert.converter.routers import (allocate, coactivation_permutation, expert_energy,
                                           ffn_inputs, fit_routers, oracle_mask,
                                           sensitivity, set_layer_sparsity)
from lte_convert.converter.evaluate import measure
from lte_convert.converter.surgery import convert_model, lte_modules, regroup
from lte_convert.loading import load_lm
from lte_convert.default import glassllm_model_dir, shakespeare_texts
from tests.tiny_models import random_ids, tiny_model


@pytest.fixture(scope="module")
def glass():
    model, tok, _ = load_lm(glassllm_model_dir())
    train, held = shakespeare_texts()
    fit = spread(pack(tok, read_documents(train[:1]), 64), 48)
    test = spread(pack(tok, read_documents(held[:1]), 64), 24)
    return model, fit, test


def _converted(model, grouping="none"):
    import copy

    m = convert_model(copy.deepcopy(model), expert_size=32, grouping=grouping)
    return m, [f for _, f in lte_modules(m)]


def test_coactivation_regroup_keeps_the_function_and_pads_nothing_new(glass):
    model, fit, test = glass
    m, lte = _converted(model)
    with torch.no_grad():
        before = m(input_ids=test[:4]).logits
    xs = ffn_inputs(m, lte, fit)
    for i, (f, x) in enumerate(zip(lte, xs)):
        perm = coactivation_permutation(f, x, seed=i)
        assert sorted(perm.tolist()) == list(range(f.shape.d_ff))
        regroup(f, perm)
    with torch.no_grad():
        after = m(input_ids=test[:4]).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_fitted_routers_find_the_oracle_experts_on_unseen_tokens(glass):
    model, fit, test = glass
    m, lte = _converted(model, grouping="weights")
    xs_fit, xs_test = ffn_inputs(m, lte, fit), ffn_inputs(m, lte, test)

    def recall(f, x):
        want = oracle_mask(expert_energy(f, x), 0.5)
        with torch.no_grad():
            z = f.router_logits(x)
        on = z > torch.quantile(z.flatten(), 0.5)               # same sparsity as the oracle
        return float((on & want).sum() / want.sum())

    start = [recall(f, x) for f, x in zip(lte, xs_test)]
    fits = fit_routers(lte, xs_fit, 0.5)
    fitted = [recall(f, x) for f, x in zip(lte, xs_test)]
    assert all(abs(r.sparsity - 0.5) < 0.01 for r in fits)
    # measured: mean-row start 0.72-0.80 per layer, fitted 0.78-0.87 (on another play)
    assert all(b > a + 0.02 for a, b in zip(start, fitted)), (start, fitted)
    assert sum(fitted) / len(fitted) > sum(start) / len(start) + 0.04, (start, fitted)


def test_allocation_gives_the_cheap_layer_more_and_meets_the_mean():
    costs = [[0.01, 0.02, 0.05], [0.2, 0.6, 1.5], [0.05, 0.1, 0.3]]
    targets = allocate(costs, 0.5)
    assert sum(targets) / 3 == pytest.approx(0.5)
    assert targets[0] > targets[2] > targets[1]
    assert max(targets) <= 0.9
    flat = allocate([[0.1, 0.2, 0.3]] * 4, 0.3)
    assert flat == pytest.approx([0.3] * 4, abs=0.05) and sum(flat) / 4 == pytest.approx(0.3)


def test_per_layer_calibration_hits_each_target(glass):
    model, fit, test = glass
    m, lte = _converted(model, grouping="weights")
    xs = ffn_inputs(m, lte, fit)
    targets = [0.3, 0.7, 0.5, 0.5]
    fit_routers(lte, xs, 0.5)
    for f, x, t in zip(lte, xs, targets):
        set_layer_sparsity(f, x, t)
        f.set_mode("hard")
    cal = calibrate_layers(m, test, targets)
    assert all(abs(s - t) <= 0.005 for s, t in zip(cal.layer_sparsity, targets)), cal
    assert cal.sparsity == pytest.approx(0.5, abs=0.005)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox", "phi", "bloom"])
def test_sensitivity_with_replayed_blocks_equals_full_forward_passes(family):
    model, _ = tiny_model(family, num_hidden_layers=3) if family not in ("gpt2", "bloom") \
        else tiny_model(family, n_layer=3)
    m = convert_model(model, expert_size=32, grouping="none")
    lte = [f for _, f in lte_modules(m)]
    blocks = random_ids(batch=3, seq=16)
    xs = ffn_inputs(m, lte, blocks)
    costs = sensitivity(m, lte, xs, blocks, batch_size=2)
    for f in lte:
        f.set_mode("dense")
    base = measure(m, blocks, batch_size=2).nll
    want = []
    for f, x in zip(lte, xs):
        bias = f.router.bias.clone()
        f.set_mode("hard")
        row = []
        for level in (0.25, 0.5, 0.75):
            set_layer_sparsity(f, x, level)
            row.append(measure(m, blocks, batch_size=2).nll - base)
            f.router.bias.data.copy_(bias)
        f.set_mode("dense")
        want.append(row)
    torch.testing.assert_close(torch.tensor(costs), torch.tensor(want), atol=1e-6, rtol=0)
    assert max(abs(c) for r in want for c in r) > 1e-5      # masking changed the loss

"""Calibration hits the requested sparsity; folding keeps the calibrated masks."""
from __future__ import annotations

import pytest
import torch

from lte_convert.converter.calibrate import calibrate, shift_routers
from lte_convert.converter.checkpoint import fold
from lte_convert.converter.data import pack, read_documents, spread
from lte_convert.converter.evaluate import measure
from lte_convert.converter.surgery import convert_model, lte_modules, set_mode
from lte_convert.default import glassllm_model_dir, shakespeare_texts


@pytest.fixture(scope="module")
def glass():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = glassllm_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    convert_model(model, expert_size=32, seed=0)
    _, heldout = shakespeare_texts()
    blocks = pack(tok, read_documents(heldout[:2]), 128)
    return model, blocks


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_calibration_hits_target_on_unseen_heldout_blocks(glass, target):
    model, blocks = glass
    set_mode(model, "hard")
    calib, unseen = spread(blocks[::2], 24), spread(blocks[1::2], 24)
    before = [m.router.bias.clone() for _, m in lte_modules(model)]
    cal = calibrate(model, calib, target, batch_size=8)
    assert all(torch.equal(b, m.router.bias) for b, (_, m) in zip(before, lte_modules(model)))
    assert abs(cal.sparsity - target) <= 0.002 and cal.passes <= 10
    shift_routers(model, cal.offset)
    try:
        got = measure(model, unseen, batch_size=8)
    finally:
        shift_routers(model, -cal.offset)
    assert abs(got.sparsity - target) <= 0.02, (got.sparsity, target)
    assert len(got.layer_sparsity) == 4 and len(set(round(s, 3) for s in got.layer_sparsity)) > 1


def test_fold_with_offset_gives_the_calibrated_masks(glass):
    from transformers import AutoModelForCausalLM

    model, blocks = glass
    set_mode(model, "hard")
    sample = spread(blocks, 8)
    cal = calibrate(model, sample, 0.6, batch_size=8)
    shift_routers(model, cal.offset)
    hard = measure(model, sample, batch_size=8)
    shift_routers(model, -cal.offset)
    folded = AutoModelForCausalLM.from_pretrained(glassllm_model_dir()).eval()
    convert_model(folded, expert_size=32, seed=0)
    folded.load_state_dict(model.state_dict())
    fold(folded, [cal.offset] * 4)
    got = measure(folded, sample, batch_size=8)
    assert got.layer_sparsity == pytest.approx(hard.layer_sparsity, abs=1e-4)
    assert got.nll == pytest.approx(hard.nll, rel=1e-4)


def test_measured_sparsity_counts_the_folded_mask(glass):
    model, blocks = glass
    set_mode(model, "hard")
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, i=i: inputs.setdefault(i, a[0]))
               for i, m in lte_modules(model)]
    try:
        got = measure(model, blocks[:2], batch_size=2)
    finally:
        for h in handles:
            h.remove()
    for i, m in lte_modules(model):
        want = 1 - m.mask(inputs[i]).float().mean().item()
        assert got.layer_sparsity[i] == pytest.approx(want, abs=1e-6)

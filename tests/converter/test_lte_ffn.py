import pytest
import torch

from lte_convert.converter.lte_ffn import LTEFFN
from lte_convert.plugins.reference import ACT_FNS, sparse_ffn_reference
from lte_convert.plugins.spec import FFNShape, gate_up_pair

D, FF, S = 24, 64, 16          # 4 experts


def _ffn(gated=True, bias=True, activation="silu", mode="dense"):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ffn = LTEFFN(FFNShape(D, FF, S, activation, gated), w_up=r(FF, D), w_down_t=r(FF, D),
                 w_gate=r(FF, D) if gated else None, b_gate=r(FF) if gated and bias else None,
                 b_up=r(FF) if bias else None, b_down=r(D) if bias else None, mode=mode)
    with torch.no_grad():
        ffn.router.weight.copy_(r(FF // S, D))
        ffn.router.bias.copy_(r(FF // S))
    return ffn


def _x():
    return torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1))


def _ref(ffn, x, mask):
    return sparse_ffn_reference(x, mask, ffn.w_gate, ffn.w_up, ffn.w_down_t, ffn.b_gate,
                                ffn.b_up, ffn.b_down, S, ffn.shape.activation)


@pytest.mark.parametrize("gated,bias,act", [(True, False, "silu"), (True, True, "gelu_tanh"),
                                            (False, True, "gelu"), (False, True, "relu")])
def test_dense_equals_reference_with_every_expert_on(gated, bias, act):
    ffn, x = _ffn(gated, bias, act), _x()
    y = ffn(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, _ref(ffn, x, torch.ones(3, 5, 4, dtype=torch.bool)),
                               rtol=1e-5, atol=1e-4)


def test_soft_scales_each_expert_by_its_score_and_keeps_them():
    ffn, x = _ffn(mode="soft"), _x()
    y = ffn(x)
    scores = torch.sigmoid(x @ ffn.router.weight.t() + ffn.router.bias)
    torch.testing.assert_close(ffn.last_scores, scores)
    up = x @ ffn.w_up.t() + ffn.b_up
    h = ACT_FNS["silu"](x @ ffn.w_gate.t() + ffn.b_gate) * up
    want = (h * scores.repeat_interleave(S, -1)) @ ffn.w_down_t + ffn.b_down
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
    y.sum().backward()                                   # stage 1 trains the router
    assert ffn.router.weight.grad is not None and ffn.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("tau", [0.5, 0.3, 0.8])
def test_hard_uses_the_sigmoid_threshold_mask_unscaled(tau):
    ffn, x = _ffn(), _x()
    ffn.tau = tau
    ffn.set_mode("hard")
    mask = torch.sigmoid(ffn.router_logits(x)) > tau
    assert torch.equal(ffn.mask(x), mask)
    assert 0 < int(mask.sum()) < mask.numel()             # the test data mixes on and off
    torch.testing.assert_close(ffn(x), _ref(ffn, x, mask), rtol=1e-5, atol=1e-4)
    assert not ffn.router.weight.requires_grad            # routers frozen in stage 2


@pytest.mark.parametrize("gated", [True, False])
def test_folded_calls_the_op_with_mask_z_positive(gated):
    ffn, x = _ffn(gated=gated, activation="gelu_tanh"), _x()
    ffn.fold_offset = 0.0
    ffn.set_mode("folded")
    mask = ffn.router_logits(x) > 0
    assert torch.equal(ffn.mask(x), mask) and 0 < int(mask.sum()) < mask.numel()
    torch.testing.assert_close(ffn(x), _ref(ffn, x, mask), rtol=1e-5, atol=1e-4)


def test_weights_are_held_in_kernel_layout():
    ffn = _ffn()
    names = {n for n, _ in ffn.named_parameters()}
    assert names == {"w_gate", "w_up", "w_down_t", "b_gate", "b_up", "b_down", "router.weight",
                     "router.bias"}
    assert all(p.is_contiguous() for p in ffn.parameters())
    assert ffn.router.out_features == 4 and ffn.w_down_t.shape == (FF, D)


def test_folding_pairs_gate_and_up_and_keeps_them_paired_across_casts():
    """Folded: W_gate and W_up share one [2, F, d] storage (the CPU kernel's one GEMM per
    block), stay two parameters with their values and names, and are paired again after
    .to(); the output is unchanged."""
    ffn, x = _ffn(), _x()
    before = {k: v.clone() for k, v in ffn.state_dict().items()}
    assert gate_up_pair(ffn.w_gate, ffn.w_up) is None
    ffn.fold_offset = 0.0
    ffn.set_mode("folded")
    pair = gate_up_pair(ffn.w_gate, ffn.w_up)
    assert pair is not None and torch.equal(pair[0], before["w_gate"])
    assert torch.equal(pair[1], before["w_up"])
    after = ffn.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    y = ffn(x)
    torch.testing.assert_close(y, _ref(ffn, x, ffn.router_logits(x) > 0), rtol=1e-5, atol=1e-4)
    ffn.to(torch.bfloat16)
    assert ffn.w_gate.dtype == torch.bfloat16 and gate_up_pair(ffn.w_gate, ffn.w_up) is not None
    ffn.float()
    assert gate_up_pair(ffn.w_gate, ffn.w_up) is not None
    assert isinstance(ffn.w_gate, torch.nn.Parameter) and ffn.w_gate.is_contiguous()
    ffn.load_state_dict(before)                           # copies into the paired storage
    assert gate_up_pair(ffn.w_gate, ffn.w_up) is not None
    torch.testing.assert_close(ffn(x), y)

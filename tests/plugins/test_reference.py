import pytest
import torch

from lte_convert.plugins.reference import sparse_ffn_reference
from lte_convert.plugins.spec import FFNShape, check_inputs


def _weights(d, F, gated, bias, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(w_gate=r(F, d) if gated else None, w_up=r(F, d), w_down_t=r(F, d),
                b_gate=r(F) if gated and bias else None, b_up=r(F) if bias else None,
                b_down=r(d) if bias else None)


@pytest.mark.parametrize("gated", [True, False])
def test_reference_matches_dense_mlp_when_all_on(gated):
    d, F, s = 24, 64, 16
    w = _weights(d, F, gated, bias=True)
    x = torch.randn(3, 5, d)
    mask = torch.ones(3, 5, F // s, dtype=torch.bool)
    y = sparse_ffn_reference(x, mask, **w, expert_size=s, activation="silu")
    up = x @ w["w_up"].t() + w["b_up"]
    h = torch.nn.functional.silu(x @ w["w_gate"].t() + w["b_gate"]) * up if gated else torch.nn.functional.silu(up)
    torch.testing.assert_close(y, h @ w["w_down_t"] + w["b_down"], rtol=1e-5, atol=1e-4)


def test_reference_skipped_expert_contributes_nothing():
    d, F, s = 8, 32, 8
    w = _weights(d, F, gated=True, bias=False)
    x = torch.randn(4, d)
    mask = torch.zeros(4, F // s, dtype=torch.bool)
    mask[:, 1] = True
    y = sparse_ffn_reference(x, mask, **w, expert_size=s, activation="relu")
    rows = slice(s, 2 * s)
    h = torch.relu(x @ w["w_gate"][rows].t()) * (x @ w["w_up"][rows].t())
    torch.testing.assert_close(y, h @ w["w_down_t"][rows], rtol=1e-5, atol=1e-5)


def test_check_inputs_names_expected_and_actual_shapes():
    d, F, s = 8, 32, 8
    w = _weights(d, F, gated=True, bias=False)
    x = torch.randn(2, d)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3\); expected \(2, 4\)"):
        check_inputs(x, torch.zeros(2, 3, dtype=torch.bool), **w, expert_size=s)
    with pytest.raises(ValueError, match=r"w_down_t has shape \(8, 32\); expected \(32, 8\)"):
        check_inputs(x, torch.zeros(2, 4, dtype=torch.bool), w["w_gate"], w["w_up"],
                     w["w_down_t"].t().contiguous(), None, None, None, expert_size=s)


def test_ffn_shape_attrs():
    shape = FFNShape(d=576, d_ff=1536, expert_size=32, activation="silu", gated=True)
    assert shape.n_experts == 48
    assert shape.up_attrs() == {"expert_size": 32, "activation": "silu", "gated": 1}

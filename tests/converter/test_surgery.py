import pytest
import torch

from lte_convert.converter.checkpoint import fold
from lte_convert.errors import UserError
from lte_convert.converter.lte_ffn import ROUTER_INIT_BIAS
from lte_convert.converter.surgery import convert_model, lte_modules, set_mode
from tests.tiny_models import random_ids, tiny_model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_router_init_is_mean_row_of_each_experts_real_neurons(family):
    kw = {"n_inner": 150} if family == "gpt2" else {"intermediate_size": 150}
    model, _ = tiny_model(family, **kw)
    convert_model(model, expert_size=32)
    for _, m in lte_modules(model):
        rows = (m.w_gate if m.shape.gated else m.w_up).view(5, 32, -1)
        bias = (m.b_gate if m.shape.gated else m.b_up)
        for e in range(5):
            real = rows[e].abs().sum(1) > 0                      # padded rows are all zero
            torch.testing.assert_close(m.router.weight[e], rows[e][real].mean(0))
            b = 0.0 if bias is None else bias.view(5, 32)[e][real].mean()
            torch.testing.assert_close(m.router.bias[e], torch.as_tensor(b + ROUTER_INIT_BIAS))
        assert int((rows.abs().sum(-1) == 0).sum()) == 10        # 160 − 150 padded neurons


def test_modes_switch_every_layer_and_freeze_routers_outside_stage_1():
    model, _ = tiny_model("llama")
    convert_model(model)
    set_mode(model, "soft")
    model(input_ids=random_ids())
    for _, m in lte_modules(model):
        assert m.mode == "soft" and m.router.weight.requires_grad
        assert m.last_scores.shape == (2, 12, 5)
    set_mode(model, "hard")
    assert all(m.mode == "hard" and not m.router.weight.requires_grad
               for _, m in lte_modules(model))


def test_converting_twice_is_refused():
    model, _ = tiny_model("llama")
    convert_model(model)
    with pytest.raises(UserError, match="already has LTE FFNs"):
        convert_model(model)


@pytest.mark.parametrize("bad", [0, -32, 16.0, True])
def test_bad_expert_size(bad):
    model, _ = tiny_model("llama")
    with pytest.raises(UserError, match=f"expert_size must be a positive integer, got {bad!r}"):
        convert_model(model, expert_size=bad)


def test_set_mode_errors():
    model, _ = tiny_model("llama")
    with pytest.raises(UserError, match="has no LTE FFNs; convert it first"):
        set_mode(model, "soft")
    convert_model(model)
    with pytest.raises(UserError, match="Unknown LTE mode 'sparse'; expected one of dense, soft, "
                                        "hard, folded"):
        set_mode(model, "sparse")
    with pytest.raises(UserError, match="needs folded routers"):
        set_mode(model, "folded")
    fold(model)
    with pytest.raises(UserError, match="routers are folded"):
        set_mode(model, "hard")
    set_mode(model, "dense")

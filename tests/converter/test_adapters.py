import pytest
import torch
import transformers
from torch import nn

from lte_convert.converter.adapters import HF_ACTIVATIONS, REGISTRY, get_adapter
from lte_convert.errors import UserError
from lte_convert.converter.lte_ffn import LTEFFN
from lte_convert.converter.surgery import convert_model, lte_modules
from tests.tiny_models import FAMILIES, LAYERS, random_ids, tiny_model

EXPECTED_ACT = {"llama": "silu", "mistral": "silu", "qwen2": "silu", "qwen3": "silu",
                "gemma": "gelu_tanh", "gpt2": "gelu_tanh", "bert": "gelu", "roberta": "gelu",
                "opt": "relu", "gpt_neox": "gelu"}
SIZE_FIELD = {"gpt2": "n_inner", "opt": "ffn_dim"}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_every_family_has_a_tiny_model_and_an_adapter():
    assert set(FAMILIES) == set(REGISTRY) == set(EXPECTED_ACT)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("d_ff", [160, 150])       # 150: not a multiple of 16 -> padded to 160
def test_convert_is_function_identical(family, d_ff):
    model, _ = tiny_model(family, **{SIZE_FIELD.get(family, "intermediate_size"): d_ff})
    ids = random_ids()
    ref = _logits(model, ids)
    convert_model(model, expert_size=16)
    modules = lte_modules(model)
    assert [i for i, _ in modules] == list(range(LAYERS))
    for _, m in modules:
        assert m.mode == "dense"
        assert m.shape.activation == EXPECTED_ACT[family]
        assert m.shape.d_ff == 160 and m.shape.n_experts == 10
        assert m.d_ff_original == d_ff
        assert m.shape.gated == (family in ("llama", "mistral", "qwen2", "qwen3", "gemma"))
    assert getattr(model.config, SIZE_FIELD.get(family, "intermediate_size")) == 160
    out = _logits(model, ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("family", ["gpt2", "bert", "opt"])
def test_inline_families_replace_act_and_down_by_identity(family):
    model, _ = tiny_model(family)
    convert_model(model, expert_size=32)
    adapter = get_adapter(model.config)
    block = next(iter(lte_modules(model)))
    layer = [b for name, b in model.named_modules() if name.endswith(f"{adapter.layers}.0")][0]
    ffn = layer.get_submodule(adapter.ffn)
    assert isinstance(ffn, LTEFFN) and block[1] is ffn
    for path in adapter.identity:
        assert isinstance(layer.get_submodule(path), nn.Identity), path


def test_gpt2_n_inner_none_means_4x_hidden():
    model, _ = tiny_model("gpt2", n_inner=None)
    ids = random_ids()
    ref = _logits(model, ids)
    convert_model(model, expert_size=32)
    assert lte_modules(model)[0][1].shape.d_ff == 4 * 64 == model.config.n_inner
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=2e-6)


def test_lookup_of_an_unknown_type_lists_the_registered_ones():
    """get_adapter only looks up; convert_model derives (tests/converter/test_derive.py)."""
    with pytest.raises(UserError) as e:
        get_adapter(transformers.BloomConfig())
    msg = str(e.value)
    assert "'bloom' has no lte-convert adapter" in msg and "derived when converted" in msg
    for t in ("bert", "gemma", "gpt2", "gpt_neox", "llama", "mistral", "opt", "qwen2", "qwen3",
              "roberta"):
        assert t in msg


def test_unsupported_activation_is_a_user_error():
    model, _ = tiny_model("llama", hidden_act="relu2")
    supported = ", ".join(HF_ACTIVATIONS)
    with pytest.raises(UserError, match=r"hidden_act='relu2'.*supported: " + supported):
        convert_model(model)

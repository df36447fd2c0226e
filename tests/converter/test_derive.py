"""Adapters derived for families the registry does not name: proven, printed, refused."""
import pytest
import torch
import transformers

from lte_convert.converter import adapters
from lte_convert.converter.adapters import REGISTRY, Adapter, get_adapter
from lte_convert.converter.checkpoint import hf_config, load_lte_model, save_lte_checkpoint
from lte_convert.converter.derive import resolve_adapter
from lte_convert.converter.lte_ffn import LTEFFN
from lte_convert.converter.surgery import convert_model, lte_modules, set_mode
from lte_convert.errors import UserError
from tiny_models import LAYERS, UNREGISTERED, random_ids, tiny_model

# what each family's derived adapter must say
EXPECTED = {
    "phi3": dict(fused="gate_up", ffn="mlp", act_field="hidden_act"),       # one gate_up_proj
    "falcon": dict(ffn="mlp", act_field="activation"),                       # parallel, MQA
    "gptj": dict(ffn="mlp.fc_in", identity=("mlp.act", "mlp.fc_out")),       # keeps dropout
    "stablelm": dict(gate="mlp.gate_proj", up="mlp.up_proj", ffn="mlp"),
    "phi": dict(ffn="mlp", up="mlp.fc1"),
    "starcoder2": dict(ffn="mlp", up="mlp.c_fc"),
    "olmo": dict(gate="mlp.gate_proj"),
    "cohere": dict(gate="mlp.gate_proj"),
    "persimmon": dict(ffn="mlp"),
    "codegen": dict(ffn="mlp.fc_in", size_field="n_inner"),
    "gpt_bigcode": dict(ffn="mlp.c_fc", size_field="n_inner"),
    "bloom": dict(act="gelu_tanh", size_field=None,              # no config field names either
                  identity=("mlp.gelu_impl", "mlp.dense_4h_to_h")),
}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _printed_adapter(text: str) -> Adapter:
    line = next(s.strip() for s in text.splitlines() if "Adapter(" in s)
    return eval("{" + line + "}", vars(adapters)).popitem()[1]


def test_expectations_cover_every_unregistered_family():
    assert set(EXPECTED) == set(UNREGISTERED) and not set(UNREGISTERED) & set(REGISTRY)


@pytest.mark.parametrize("family", sorted(UNREGISTERED))
def test_derived_adapter_is_proven_printed_and_function_identical(family, capsys):
    model, _ = tiny_model(family)
    ids = random_ids()
    ref = _logits(model, ids)
    convert_model(model, expert_size=32)
    err = capsys.readouterr().err
    assert "derived one and proved it" in err and "REGISTRY" in err
    adapter = get_adapter(model.config)                    # carried as config.lte_adapter
    assert _printed_adapter(err) == adapter                 # the line a user pastes works
    for field, value in EXPECTED[family].items():
        assert getattr(adapter, field) == value, (field, adapter)
    assert [i for i, _ in lte_modules(model)] == list(range(LAYERS))
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=2e-6)


def test_proof_tells_gelu_from_its_tanh_approximation():
    """BLOOM's config names no activation: each is tried, only gelu_tanh reproduces BloomGelu."""
    from lte_convert.converter import derive

    model, _ = tiny_model("bloom")
    _, blocks = derive.find_blocks(model)
    inputs = derive.block_inputs(model, blocks)
    inline = Adapter(**{**UNREGISTERED_ADAPTER_BLOOM, "act": "gelu"})
    assert derive.prove(model, blocks, inputs, inline) > 10 * derive.TOLERANCE[torch.float32]
    assert derive.prove(model, blocks, inputs,
                        Adapter(**{**UNREGISTERED_ADAPTER_BLOOM, "act": "gelu_tanh"})) < 1e-6


UNREGISTERED_ADAPTER_BLOOM = dict(
    family="bloom", layers="h", ffn="mlp.dense_h_to_4h", up="mlp.dense_h_to_4h",
    down="mlp.dense_4h_to_h", identity=("mlp.gelu_impl", "mlp.dense_4h_to_h"), size_field=None)


def test_fused_gate_up_is_written_back_fused(tmp_path):
    """phi3: split for grouping, saved as one gate_up_proj again (padded 150 -> 160), so the
    folder loads as a Phi3 model and as the LTE model."""
    model, _ = tiny_model("phi3", intermediate_size=150)
    ids = random_ids()
    ref = _logits(model, ids)
    convert_model(model, expert_size=16)
    m = lte_modules(model)[0][1]
    assert m.w_gate.shape == m.w_up.shape == (160, 64)
    set_mode(model, "hard")
    want = _logits(model, ids)
    save_lte_checkpoint(model, tmp_path / "ck", {})
    dense = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "ck",
                                                          config=hf_config(tmp_path / "ck"))
    assert dense.model.layers[0].mlp.gate_up_proj.weight.shape == (320, 64)
    assert dense.config.intermediate_size == 160
    torch.testing.assert_close(_logits(dense, ids), ref, rtol=1e-5, atol=2e-6)
    loaded, info = load_lte_model(tmp_path / "ck")
    assert info["adapter"]["fused"] == "gate_up"
    assert torch.equal(_logits(loaded, ids), want)


def test_no_dense_ffn_is_refused_with_what_was_found():
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4))
    with pytest.raises(UserError) as e:
        convert_model(model)
    msg = str(e.value)
    for needle in ("'mixtral' has no registry adapter", "found no dense FFN",
                   "self_attn.q_proj 64->64", "hidden_act='silu'", "REGISTRY in "
                   "converter/adapters.py", "fused = 'gate_up'"):
        assert needle in msg, needle


def test_unproven_adapter_is_refused_with_each_candidate():
    """An OLMo whose MLP applies tanh, though its config says silu: no candidate proves."""
    model, _ = tiny_model("olmo")
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.Tanh()
    with pytest.raises(UserError) as e:
        convert_model(model)
    msg = str(e.value)
    assert "none derived from its modules reproduces its FFN" in msg
    assert "'olmo': Adapter('olmo', layers='layers', ffn='mlp', up='mlp.up_proj'" in msg
    assert "relative error" in msg and "> 1e-05" in msg
    assert not any(isinstance(m, LTEFFN) for m in model.modules())
    assert getattr(model.config, "lte_adapter", None) is None


def test_registry_adapters_are_proven_too():
    model, _ = tiny_model("llama")
    model.model.layers[1].mlp.act_fn = torch.nn.Tanh()
    with pytest.raises(UserError, match="has a registry adapter that does not reproduce"):
        convert_model(model)


def test_remote_code_is_derived_not_taken_from_the_registry(capsys):
    """A built-in model type running its authors' code (auto_map) may differ from the
    registry's family: its adapter is derived and proven."""
    model, _ = tiny_model("llama")
    model.config.auto_map = {"AutoModelForCausalLM": "modeling_mine.MyLlama"}
    assert resolve_adapter(model) == Adapter(**model.config.lte_adapter)
    assert "'llama' (remote code) has no registry adapter" in capsys.readouterr().err

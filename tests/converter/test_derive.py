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
from tests.tiny_models import LAYERS, UNREGISTERED, random_ids, tiny_model

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


def _glassllm_as_phi3():
    """glassllm's trained Llama weights in Phi-3's layout (fused qkv_proj and gate_up_proj)."""
    from lte_convert.default import glassllm_model_dir

    llama = transformers.AutoModelForCausalLM.from_pretrained(glassllm_model_dir()).eval()
    c = llama.config
    phi3 = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters=c.rope_parameters, pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)).eval()
    src = llama.state_dict()
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    state = {}
    for key in phi3.state_dict():
        prefix, name = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        state[key] = (torch.cat([src[f"{prefix}.{p}.weight"] for p in fused[name]])
                      if name in fused else src[key])
    phi3.load_state_dict(state)
    return llama, phi3


def test_real_weights_in_a_fused_layout(tmp_path):
    """Trained weights (glassllm, d_ff 341 -> 352 padded) as a Phi-3: derived, proven, the same
    function after conversion, saved fused and loaded back as Phi-3 and as the LTE model."""
    llama, phi3 = _glassllm_as_phi3()
    ids = torch.randint(4, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    ref = _logits(llama, ids)
    torch.testing.assert_close(_logits(phi3, ids), ref, rtol=0, atol=2e-5)
    convert_model(phi3, expert_size=32)
    assert get_adapter(phi3.config).fused == "gate_up"
    torch.testing.assert_close(_logits(phi3, ids), ref, rtol=0, atol=5e-5)
    save_lte_checkpoint(phi3, tmp_path / "ck", {})
    dense = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "ck",
                                                          config=hf_config(tmp_path / "ck"))
    assert dense.model.layers[0].mlp.gate_up_proj.weight.shape == (704, 128)
    torch.testing.assert_close(_logits(dense, ids), ref, rtol=0, atol=5e-5)
    loaded, _ = load_lte_model(tmp_path / "ck")
    assert torch.equal(_logits(loaded, ids), _logits(phi3, ids))

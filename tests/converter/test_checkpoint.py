import json
import math

import pytest
import torch
import transformers

from lte_convert.converter.checkpoint import (FORMAT, MODEL_TYPE, VERSION, fold, hf_config,
                                             load_lte_model, read_lte_info, save_lte_checkpoint)
from lte_convert.errors import UserError
from lte_convert.loading import check_remote_code
from lte_convert.converter.surgery import convert_model, lte_modules, set_mode
from tests.tiny_models import random_ids, tiny_model



def _random_routers(model, seed=0):
    """Routers whose logits spread over ±3 for unit inputs: masks mix on and off experts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lte_modules(model):
            d = m.router.in_features
            m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=g) * 3 / d ** 0.5)
            m.router.bias.zero_()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _converted(family="llama", d_ff=150):
    field = {"gpt2": "n_inner", "opt": "ffn_dim"}.get(family, "intermediate_size")
    model, _ = tiny_model(family, **{field: d_ff})
    ids = random_ids()
    original = _logits(model, ids)
    return convert_model(model, expert_size=16), ids, original


# ---------------------------------------------------------------------------------------------
# Folding
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.5, 0.3, 0.75])
def test_fold_mask_equals_sigmoid_threshold_rule(tau):
    model, _, _ = _converted()
    x = torch.randn(64, 7, 64, generator=torch.Generator().manual_seed(3))
    before = {}
    _random_routers(model)
    for _, m in lte_modules(model):
        m.tau = tau
    set_mode(model, "hard")
    for i, m in lte_modules(model):
        before[i] = m.mask(x)
        assert torch.equal(before[i], torch.sigmoid(m.router_logits(x)) > tau)
        assert 0.05 < before[i].float().mean() < 0.95
    fold(model)
    for i, m in lte_modules(model):
        assert m.mode == "folded" and m.fold_offset == 0.0
        assert torch.equal(m.mask(x), m.router_logits(x) > 0)
        assert torch.equal(m.mask(x), before[i])


def test_fold_offsets_shift_each_layers_threshold():
    model, _, _ = _converted()
    x = torch.randn(64, 7, 64, generator=torch.Generator().manual_seed(4))
    z = {i: m.router_logits(x).detach() for i, m in lte_modules(model)}
    offsets = [0.7, -1.9]
    fold(model, offsets)
    for (i, m), off in zip(lte_modules(model), offsets):
        assert torch.equal(m.mask(x), z[i] + off > 0)     # tau 0.5: logit(tau) = 0
        assert m.fold_offset == off


def test_fold_errors():
    model, _, _ = _converted()
    with pytest.raises(UserError, match="got 3 offsets for 2 LTE layers"):
        fold(model, [0.0, 0.1, 0.2])
    with pytest.raises(UserError, match="non-finite offsets"):
        fold(model, [0.0, math.nan])
    fold(model)
    with pytest.raises(UserError, match="already folded"):
        fold(model)


# ---------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "opt"])
@pytest.mark.parametrize("folded", [False, True])
def test_round_trip_gives_identical_logits(tmp_path, family, folded):
    model, ids, original = _converted(family)
    _random_routers(model)
    if folded:
        fold(model, [0.0, -0.5])
    else:
        set_mode(model, "hard")
    want = _logits(model, ids)
    assert not torch.allclose(want, original, atol=1e-3)   # the routing does something
    save_lte_checkpoint(model, tmp_path / "ck", {"source_model": "tiny", "sparsity": [0.5, 0.6]})
    loaded, info = load_lte_model(tmp_path / "ck")
    assert torch.equal(_logits(loaded, ids), want)
    assert info["folded"] is folded and info["mode"] == ("folded" if folded else "hard")
    assert [m.mode for _, m in lte_modules(loaded)] == [info["mode"]] * 2
    assert info["sparsity"] == [0.5, 0.6] and info["source_model"] == "tiny"


def test_saved_folder_is_a_plain_hf_model_with_permuted_padded_weights(tmp_path):
    model, ids, original = _converted("llama", d_ff=150)
    save_lte_checkpoint(model, tmp_path / "ck", {})
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ck", use_safetensors=True,
                                                          config=hf_config(tmp_path / "ck"))
    assert plain.config.intermediate_size == 160
    torch.testing.assert_close(_logits(plain, ids), original, rtol=1e-5, atol=2e-6)
    info = json.loads((tmp_path / "ck" / "lte.json").read_text())
    assert (info["format"], info["version"]) == (FORMAT, VERSION)
    assert (info["expert_size"], info["n_experts"], info["d_ff"], info["d_ff_original"]) == \
        (16, 10, 160, 150)
    assert info["model_type"] == "llama" and info["architecture"] == "LlamaForCausalLM"
    assert info["folded"] is False and info["offsets"] is None and info["layers"] == [0, 1]


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    model, _, _ = _converted()
    out = tmp_path / "ck"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError) as e:
        save_lte_checkpoint(model, out, {})
    assert str(e.value) == (f"Output folder {out} exists and is not empty (1 entries: notes.txt). "
                            "Pass --overwrite (overwrite=True) to replace it, or choose another "
                            "folder.")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    save_lte_checkpoint(model, out, {}, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "lte.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]          # no temporary left behind


def test_unconverted_model_is_refused_and_nothing_written(tmp_path):
    model, _ = tiny_model("llama")
    with pytest.raises(UserError, match="has no LTE FFNs"):
        save_lte_checkpoint(model, tmp_path / "ck", {})
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_lte_model(tmp_path / "missing")
    tiny_model("llama")[0].save_pretrained(tmp_path / "plain")
    with pytest.raises(UserError, match="has no lte.json, so it is not an LTE checkpoint"):
        load_lte_model(tmp_path / "plain")
    (tmp_path / "plain" / "lte.json").write_text('{"format": "other", "version": 1}')
    with pytest.raises(UserError, match="has format 'other'"):
        read_lte_info(tmp_path / "plain")
    model, _, _ = _converted()
    save_lte_checkpoint(model, tmp_path / "ck", {})
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="has no model.safetensors; lte-convert reads weights from "
                                        "safetensors only"):
        load_lte_model(tmp_path / "ck")


def test_load_in_bf16_converts_lte_weights_and_routers(tmp_path):
    model, ids, _ = _converted()
    fold(model)
    save_lte_checkpoint(model, tmp_path / "ck", {})
    loaded, _ = load_lte_model(tmp_path / "ck", dtype=torch.bfloat16)
    for _, m in lte_modules(loaded):
        assert m.w_up.dtype == m.w_down_t.dtype == m.router.weight.dtype == torch.bfloat16
        assert m.mode == "folded"
    ref = _logits(model, ids)
    out = _logits(loaded, ids)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


# ---------------------------------------------------------------------------------------------
# Loading through transformers
# ---------------------------------------------------------------------------------------------
def test_auto_classes_give_the_lte_model_in_this_process(tmp_path):
    model, ids, _ = _converted()
    _random_routers(model)
    fold(model)
    save_lte_checkpoint(model, tmp_path / "ck", {})
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert (config["model_type"], config["lte_model_type"]) == (MODEL_TYPE, "llama")
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert lte_modules(auto) and torch.equal(_logits(auto, ids), _logits(model, ids))
    assert isinstance(hf_config(tmp_path / "ck"), transformers.LlamaConfig)


def test_auto_classes_fail_elsewhere_naming_the_loader(tmp_path):
    """A fresh process that never imported lte_convert: no silent dense model."""
    import subprocess
    import sys

    model, _, _ = _converted()
    save_lte_checkpoint(fold(model), tmp_path / "ck", {})
    code = ("import transformers, sys\n"
            "try:\n    transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "except ValueError as e:\n    print(e)\nelse:\n    print('LOADED')")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ck")], capture_output=True,
                         text=True, timeout=300).stdout
    assert "lte_convert.converter.checkpoint.load_lte_model" in out and "LOADED" not in out


def _remote_code_folder(path, tokenizer=False):
    """A tiny Llama whose config asks for its authors' code (a subclass in the folder)."""
    model, _ = tiny_model("llama", vocab_size=1024)
    model.save_pretrained(path)
    (path / "modeling_mine.py").write_text(
        "from transformers import LlamaForCausalLM\n\n\n"
        "class MyLlama(LlamaForCausalLM):\n    pass\n")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MyLlama"}
    (path / "config.json").write_text(json.dumps(config))
    if tokenizer:
        from lte_convert.default import glassllm_model_dir

        transformers.AutoTokenizer.from_pretrained(glassllm_model_dir()).save_pretrained(path)
    return path


def test_auto_map_is_refused_without_trust_remote_code(tmp_path):
    folder = _remote_code_folder(tmp_path / "m")
    with pytest.raises(UserError) as e:
        check_remote_code(folder, False)
    msg = str(e.value)
    assert "auto_map (AutoModelForCausalLM: modeling_mine.MyLlama)" in msg
    assert "--trust-remote-code" in msg and "built-in 'llama' classes" in msg
    assert "trust_remote_code" not in msg.replace("--trust-remote-code", "")
    assert check_remote_code(folder, True)["auto_map"]


def test_trusted_remote_code_runs_the_authors_class(tmp_path, capsys):
    from lte_convert.loading import load_lm

    folder = _remote_code_folder(tmp_path / "m", tokenizer=True)
    model, _, _ = load_lm(folder, trust_remote_code=True)
    assert type(model).__name__ == "MyLlama"
    convert_model(model, expert_size=32)
    assert "(remote code) has no registry adapter" in capsys.readouterr().err
    save_lte_checkpoint(fold(model), tmp_path / "ck", {})
    with pytest.raises(UserError, match="--trust-remote-code"):
        load_lte_model(tmp_path / "ck")
    loaded, _ = load_lte_model(tmp_path / "ck", trust_remote_code=True)
    assert type(loaded).__name__ == "MyLlama" and lte_modules(loaded)

"""Greedy decoding through ONNX Runtime with the KV cache = PyTorch generate(), real weights."""
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lte_convert.exporters.backends import OrtBackend
from lte_convert.exporters.generate import greedy_generate
from lte_convert.exporters.onnx_export import export_checkpoint
from lte_convert.exporters.validate import cache_layout
from tests.exporters.conftest import folded_checkpoint

PROMPTS = ["ROMEO. But soft, what light through yonder window breaks?",
           "To be, or not"]


def _generate_both(model_dir, tmp_path, new_tokens, dtype="fp32"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lte_convert.converter.checkpoint import load_lte_model

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    text = open(__import__("lte_convert.default", fromlist=["x"]).shakespeare_texts()[1][0]).read()
    ids = tok(text[:20000], return_tensors="pt").input_ids[:, :512].reshape(4, 128)
    ckpt = folded_checkpoint(model, tmp_path / "ckpt", tok, source=str(model_dir), ids=ids)
    out = export_checkpoint(ckpt, tmp_path / "model.onnx", dtype=dtype)["path"]
    proto = onnx.load(out, load_external_data=False)
    ort_backend = OrtBackend(out, proto, masks=False)
    lte, _ = load_lte_model(ckpt)

    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    results = []
    for rows in ([0], [0, 1]):                       # batch 1, and a left-padded batch of 2
        ids, mask = enc.input_ids[rows], enc.attention_mask[rows]
        if len(rows) == 1:
            keep = mask[0].bool()
            ids, mask = ids[:, keep], mask[:, keep]
        with torch.no_grad():
            ref = lte.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                               do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
        got = greedy_generate(ort_backend, cache_layout(proto), ids.numpy(), new_tokens,
                              attention_mask=mask.numpy())
        results.append((ref.numpy(), got))
    return results


def test_glassllm_greedy_matches_pytorch(tmp_path):
    from lte_convert.default import glassllm_model_dir

    for ref, got in _generate_both(glassllm_model_dir(), tmp_path, 24):
        np.testing.assert_array_equal(got, ref)
        assert ref.shape[1] >= 24


@pytest.mark.slow
def test_smollm2_greedy_matches_pytorch(tmp_path):
    from lte_convert.default import default_model_dir

    for ref, got in _generate_both(default_model_dir(), tmp_path, 16):
        np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------------------------------------
# generate_text (lte-convert generate) and sampling
# ---------------------------------------------------------------------------------------------
def test_sampler_top_k_and_seed():
    from lte_convert.exporters.generate import sampler

    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]))
    assert sampler(top_k=1)(logits).tolist() == [3, 0]
    draws = np.stack([sampler(top_k=2, seed=s)(logits) for s in range(200)])
    assert set(draws[:, 0]) == {2, 3} and set(draws[:, 1]) == {0, 1}
    assert (sampler(seed=7)(logits) == sampler(seed=7)(logits)).all()


@pytest.fixture(scope="module")
def tried(derived_chain):
    """phi3 from the chain test: checkpoint kv-lte/ (with tokenizer), kv.onnx, plain.onnx."""
    return Path(derived_chain("phi3")["result"]["checkpoint"]).parent


def test_generate_text_greedy_is_the_same_in_pytorch_and_onnx_runtime(tried):
    from lte_convert.exporters.generate import generate_text

    prompt = "To be, or not to be"
    ref = generate_text(tried / "kv-lte", prompt, max_new_tokens=12)
    assert ref and generate_text(tried / "kv.onnx", prompt, max_new_tokens=12) == ref
    assert generate_text(tried / "plain.onnx", prompt, max_new_tokens=12,
                         tokenizer=tried / "kv-lte") == ref
    assert generate_text(tried / "kv.onnx", prompt, max_new_tokens=12, sample=True,
                         top_k=1) == ref
    for source in (tried / "kv-lte", tried / "kv.onnx"):
        a, b = (generate_text(source, prompt, max_new_tokens=12, sample=True, temperature=2.0,
                              seed=s) for s in (1, 2))
        assert a != b and a == generate_text(source, prompt, max_new_tokens=12, sample=True,
                                             temperature=2.0, seed=1)


def test_generate_text_without_a_tokenizer_says_which_to_pass(tried):
    from lte_convert.errors import UserError
    from lte_convert.exporters.generate import generate_text

    with pytest.raises(UserError, match="Pass --tokenizer with the LTE checkpoint folder"):
        generate_text(tried / "plain.onnx", "hi")


def test_generate_command_pytorch_and_onnx_runtime(tried, capsys):
    """`lte-convert generate CKPT|model.onnx --prompt ...`: the same greedy text from both, a
    sampled one from --sample --seed."""
    from lte_convert.cli import main
    from lte_convert.exporters.generate import generate_text

    def run(*args):
        with pytest.raises(SystemExit) as e:
            main(["generate", *map(str, args)])
            raise SystemExit(0)
        out = capsys.readouterr()
        assert e.value.code == 0, out.err
        return out.out.rstrip("\n")

    prompt = "To be, or not to be"
    greedy = run(tried / "kv-lte", "--prompt", prompt, "-n", 8)
    assert greedy == generate_text(tried / "kv-lte", prompt, max_new_tokens=8)
    assert run(tried / "kv.onnx", "--prompt", prompt, "-n", 8) == greedy
    sampled = run(tried / "kv.onnx", "--prompt", prompt, "-n", 8, "--sample", "--temperature",
                  2.0, "--seed", 1)
    assert sampled == generate_text(tried / "kv.onnx", prompt, max_new_tokens=8, sample=True,
                                    temperature=2.0, seed=1)

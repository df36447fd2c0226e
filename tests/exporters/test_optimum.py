"""optimum's ORTModelForCausalLM on a file written by `lte-convert export`: PyTorch's tokens.

optimum-onnx (newest release 0.1.0) requires transformers<4.58 and lte-convert transformers 5,
so optimum runs in another Python, named by LTE_OPTIMUM_PYTHON (a venv made with
`pip install "transformers<4.58" "optimum-onnx[onnxruntime]"`); without it this test skips.
The I/O contract optimum relies on is tested here in any case: names and axes in
test_onnx_export.py, greedy tokens through ONNX Runtime in test_generate.py.
"""
import json
import os
import subprocess

import pytest
import torch

from lte_convert.converter.checkpoint import hf_config, load_lte_model
from lte_convert.exporters.onnx_export import export_checkpoint
from tests.exporters.conftest import tiny_checkpoint

PYTHON = os.environ.get("LTE_OPTIMUM_PYTHON")
IDS = [[5, 17, 33, 9, 100, 42], [7, 3, 64, 11, 90, 12]]
NEW = 10
SCRIPT = """
import json, sys, torch
from optimum.onnxruntime import ORTModelForCausalLM
model = ORTModelForCausalLM.from_pretrained(sys.argv[1], use_cache=True)
ids = torch.tensor(json.loads(sys.argv[2]))
out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                     max_new_tokens=int(sys.argv[3]), eos_token_id=None, pad_token_id=0)
print(json.dumps(out.tolist()))
"""


def _transformers4_config(ckpt) -> dict:
    """The base model's config.json as transformers 4 writes it (llama)."""
    c = hf_config(ckpt)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
            "rms_norm_eps", "hidden_act", "tie_word_embeddings", "bos_token_id", "eos_token_id")
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "rope_theta": c.rope_parameters["rope_theta"], **{k: getattr(c, k) for k in keys}}


@pytest.mark.skipif(not PYTHON, reason="optimum-onnx needs transformers<4.58: set "
                    "LTE_OPTIMUM_PYTHON to a Python with it (see the module doc)")
def test_optimum_generates_pytorchs_greedy_tokens(tmp_path):
    ckpt = tiny_checkpoint("llama", tmp_path / "ckpt")
    folder = tmp_path / "optimum"
    folder.mkdir()
    export_checkpoint(ckpt, folder / "model.onnx")
    (folder / "config.json").write_text(json.dumps(_transformers4_config(ckpt)))
    out = subprocess.run([PYTHON, "-c", SCRIPT, str(folder), json.dumps(IDS), str(NEW)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    model, _ = load_lte_model(ckpt)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    assert got == ref.tolist()

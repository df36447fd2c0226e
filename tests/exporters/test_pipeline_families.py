"""The whole chain on families the adapter registry does not name (adapters derived):
train -> fold -> export with KV cache -> validate (the one-shot job), then export without the
cache -> validate. Tiny random models with glassllm's tokenizer (vocab 1024), a few steps."""
import json

import onnx
import pytest
from transformers import AutoTokenizer

from lte_convert.converter.checkpoint import read_lte_info
from lte_convert.converter.train import TrainConfig
from lte_convert.default import glassllm_model_dir, shakespeare_texts
from lte_convert.exporters.onnx_export import export_checkpoint
from lte_convert.exporters.pipeline import run_pipeline
from lte_convert.exporters.validate import validate
from tiny_models import HIDDEN, HEADS, LAYERS, tiny_model

# family -> (layout it adds, KV heads of its cache)
FAMILIES = {
    "phi3": ("fused gate/up projection", 2),
    "falcon": ("parallel attention + MLP, multi-query attention, biases", 1),
    "gptj": ("parallel attention + MLP, rotary on 8 of 16 head dims, inline FFN", HEADS),
    "stablelm": ("rotary on a quarter of the head, gated", HEADS),
}
CFG = TrainConfig(block_size=32, batch_size=2, stage1_steps=2, stage2_steps=1, calib_blocks=4,
                  save_steps=100, log_steps=100)


def _hamlet():
    train, heldout = shakespeare_texts()
    return [p for p in train + heldout if p.name.startswith("hamlet")][0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chain(family, tmp_path):
    model, _ = tiny_model(family, vocab_size=1024)
    model.save_pretrained(tmp_path / "hf")
    AutoTokenizer.from_pretrained(glassllm_model_dir()).save_pretrained(tmp_path / "hf")

    r = run_pipeline(tmp_path / "hf", tmp_path / "kv.onnx", data=[_hamlet()], config=CFG,
                     echo=lambda *_: None)
    assert r["validation"]["passed"], r["validation"]["failures"]
    info = read_lte_info(r["checkpoint"])
    assert info["model_type"] == family and info["adapter"]["family"] == family

    m = onnx.load(r["export"]["path"])
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in m.graph.input}
    outputs = [o.name for o in m.graph.output]
    kv_heads = FAMILIES[family][1]
    for i in range(LAYERS):
        for k in ("key", "value"):
            assert inputs[f"past_key_values.{i}.{k}"] == ["batch", kv_heads, "past_seq",
                                                          HIDDEN // HEADS]
            assert f"present.{i}.{k}" in outputs

    plain = export_checkpoint(r["checkpoint"], tmp_path / "plain.onnx", kv_cache=False)
    rep = validate(plain["path"], r["checkpoint"], n=2, seq_len=12)
    assert rep["passed"], rep["failures"]
    assert [i.name for i in onnx.load(plain["path"]).graph.input] == ["input_ids",
                                                                      "attention_mask"]
    assert json.loads(plain["metadata"]["lte.layers"]) == list(range(LAYERS))

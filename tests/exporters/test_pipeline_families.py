"""The whole chain on families the adapter registry does not name (adapters derived):
train -> fold -> export with KV cache -> validate (the one-shot job), then export without the
cache -> validate. Tiny random models with glassllm's tokenizer, a few steps (conftest's
derived_chain, shared with the Polygraphy and generate tests)."""
import json

import onnx
import pytest

from lte_convert.converter.checkpoint import read_lte_info
from lte_convert.exporters.validate import validate
from tests.tiny_models import HEADS, HIDDEN, LAYERS

# family -> (layout it adds, KV heads of its cache)
FAMILIES = {
    "phi3": ("fused gate/up projection", 2),
    "falcon": ("parallel attention + MLP, multi-query attention, biases", 1),
    "gptj": ("parallel attention + MLP, rotary on 8 of 16 head dims, inline FFN", HEADS),
    "stablelm": ("rotary on a quarter of the head, gated", HEADS),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chain(family, derived_chain):
    chain = derived_chain(family)
    r = chain["result"]
    assert r["validation"]["passed"], r["validation"]["failures"]
    info = read_lte_info(r["checkpoint"])
    assert info["model_type"] == family and info["adapter"]["family"] == family

    m = onnx.load(r["export"]["path"])
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in m.graph.input}
    outputs = [o.name for o in m.graph.output]
    for i in range(LAYERS):
        for k in ("key", "value"):
            assert inputs[f"past_key_values.{i}.{k}"] == ["batch", FAMILIES[family][1],
                                                          "past_seq", HIDDEN // HEADS]
            assert f"present.{i}.{k}" in outputs

    plain = chain["plain"]
    rep = validate(plain["path"], r["checkpoint"], n=2, seq_len=12)
    assert rep["passed"], rep["failures"]
    assert [i.name for i in onnx.load(plain["path"]).graph.input] == ["input_ids",
                                                                      "attention_mask"]
    assert json.loads(plain["metadata"]["lte.layers"]) == list(range(LAYERS))

"""Broken exports must fail `validate`, each with a message naming the step and the layer.

Deliberately wrong ONNX files are made from a good export of glassllm (a real pretrained
model, its FFNs converted and routed to about half, folded) in fp32 and fp16: one layer's
b_down changed, one expert's rows permuted inside W_down_t, the LM head scaled by 1.01, two
present.* outputs swapped, one layer's router bias shifted, and a decode-only error (the
position of a decoded token off by one). The good file passes.
"""
import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from lte_convert.exporters.onnx_export import export_checkpoint
from lte_convert.exporters.validate import validate
from lte_convert.plugins import spec
from tests.exporters.conftest import folded_checkpoint

LAYER = 2                         # the layer each per-layer mutation breaks
KW = dict(n=2, seq_len=16, decode_steps=2)


@pytest.fixture(scope="module")
def glassllm(tmp_path_factory):
    import transformers

    from lte_convert.default import glassllm_model_dir

    model = transformers.LlamaForCausalLM.from_pretrained(glassllm_model_dir()).eval()
    ids = torch.randint(4, 1024, (4, 32), generator=torch.Generator().manual_seed(0))
    return folded_checkpoint(model, tmp_path_factory.mktemp("glass") / "ckpt", ids=ids,
                             source="glassllm")


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def exported(request, glassllm, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "good.onnx"
    export_checkpoint(glassllm, path, dtype=request.param)
    return glassllm, path


# ---------------------------------------------------------------------------------------------
# Mutations of a ModelProto (each returns nothing, edits in place)
# ---------------------------------------------------------------------------------------------
def _nodes(m, op):
    return [n for n in m.graph.node if n.domain == spec.NAMESPACE and n.op_type == op]


def _replace_input(m, node, slot, array, name):
    """Give node's input `slot` its own new initializer (inputs such as b_down are shared)."""
    m.graph.initializer.append(numpy_helper.from_array(array, name))
    node.input[slot] = name


def _initializer(m, name):
    return numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == name))


def b_down_changed(m):
    down = _nodes(m, spec.OP_DOWN)[LAYER]
    b = _initializer(m, down.input[3]).copy()
    b[:8] += 0.25
    _replace_input(m, down, 3, b, "broken_b_down")


def expert_rows_permuted(m):
    """Expert 0's 32 rows of W_down_t reversed (the expert's neurons no longer match its
    W_gate/W_up rows)."""
    down = _nodes(m, spec.OP_DOWN)[LAYER]
    w = _initializer(m, down.input[2]).copy()
    w[:32] = w[:32][::-1]
    _replace_input(m, down, 2, w, "broken_w_down_t")


def lm_head_scaled(m):
    """logits = 1.01 · (the LM head's output): as if the LM head weight were scaled."""
    producer = next(n for n in m.graph.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "logits_unscaled"
    elem = next(o for o in m.graph.output if o.name == "logits").type.tensor_type.elem_type
    m.graph.initializer.append(helper.make_tensor("lm_scale", elem, [], [1.01]))
    m.graph.node.append(helper.make_node("Mul", ["logits_unscaled", "lm_scale"], ["logits"]))


def presents_swapped(m):
    """The graph outputs present.0.value and present.1.value carry each other's tensor."""
    a, b = "present.0.value", "present.1.value"
    for n in m.graph.node:
        for seq in (n.input, n.output):
            for i, name in enumerate(seq):
                if name in (a, b):
                    seq[i] = "swap_" + name
    m.graph.node.extend([helper.make_node("Identity", ["swap_" + a], [b]),
                         helper.make_node("Identity", ["swap_" + b], [a])])


def router_bias_shifted(m):
    """The router bias of one layer + 1.5: the ONNX file routes differently from the
    checkpoint."""
    up = _nodes(m, spec.OP_UP)[LAYER]
    producer = {o: n for n in m.graph.node for o in n.output}
    add = producer[producer[up.input[1]].input[0]]          # mask = Greater([Cast](z), 0)
    while not any(x.endswith("router.bias") for x in add.input):
        add = producer[add.input[0]]
    slot, name = next((i, x) for i, x in enumerate(add.input) if x.endswith("router.bias"))
    bias = _initializer(m, name)
    _replace_input(m, add, slot, bias + np.asarray(1.5, bias.dtype), "broken_router_bias")


def decode_position_off_by_one(m):
    """position_ids + min(past length, 1): prefill is right, every decoded token is placed
    one position too far."""
    for n in m.graph.node:
        for i, name in enumerate(n.input):
            if name == "position_ids":
                n.input[i] = "broken_position_ids"
    m.graph.initializer.extend([numpy_helper.from_array(np.asarray(2, np.int64), "ax2"),
                                numpy_helper.from_array(np.asarray(1, np.int64), "one")])
    for node in reversed([                      # first in the graph: they read inputs only
            helper.make_node("Shape", ["past_key_values.0.key"], ["past_shape"]),
            helper.make_node("Gather", ["past_shape", "ax2"], ["past_len"], axis=0),
            helper.make_node("Min", ["past_len", "one"], ["has_past"]),
            helper.make_node("Add", ["position_ids", "has_past"], ["broken_position_ids"])]):
        m.graph.node.insert(0, node)


# mutation -> (step its failure names, where it points)
MUTATIONS = {
    b_down_changed: ("prefill (mask-forced)", f"first divergence: layer {LAYER} FFN output"),
    expert_rows_permuted: ("prefill (mask-forced)",
                           f"first divergence: layer {LAYER} FFN output"),
    lm_head_scaled: ("prefill (mask-forced)", "the error is after the last layer"),
    presents_swapped: ("prefill (mask-forced)",
                       "first divergence: layer 0 cache (present.0.value)"),
    router_bias_shifted: ("prefill", f"layer {LAYER} (lte node pair {LAYER}) flipped"),
    decode_position_off_by_one: ("decode 1 (mask-forced)",
                                 "first divergence: layer 0 cache (present.0.key)"),
}


def test_good_file_passes(exported):
    ckpt, path = exported
    r = validate(path, ckpt, **KW)
    assert r["passed"], r["failures"]
    assert r["verdict"] == "mask-forced" and list(r["forced"]) == ["prefill", "decode 1",
                                                                     "decode 2"]


@pytest.mark.parametrize("mutate", list(MUTATIONS), ids=lambda f: f.__name__)
def test_broken_file_fails(exported, mutate, tmp_path):
    ckpt, path = exported
    m = onnx.load(str(path))
    mutate(m)
    bad = tmp_path / f"{mutate.__name__}.onnx"
    onnx.save(m, str(bad))
    r = validate(bad, ckpt, **KW)
    assert not r["passed"]
    step, where = MUTATIONS[mutate]
    first = r["failures"][0]
    assert first.startswith(step) and where in first, r["failures"]
    if mutate is decode_position_off_by_one:          # prefill is right: only decode fails
        assert not r["forced"]["prefill"]["logits_outside"], r["failures"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prefill_and_decode_paths_route_alike(glassllm, dtype):
    """The same tokens through the op's prefill path (many tokens at once) and its decode path
    (one token at a time, KV cache) route to the same experts: one numerics rule (spec.py).
    Measured on this model: fp32 0, fp16 0, bf16 1 of 5104 decisions (bf16's coarse hidden
    state, summed in another order, moves one router logit across 0)."""
    from lte_convert.converter.checkpoint import load_lte_model
    from lte_convert.exporters.backends import TorchBackend
    from lte_convert.exporters.validate import _masks, make_inputs, run_steps

    model, _ = load_lte_model(glassllm, dtype=dtype)
    cfg = model.config
    layout = [(cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads)] * \
        cfg.num_hidden_layers
    torch_side = TorchBackend(model, True)
    ids, _ = make_inputs(cfg.vocab_size, 4, 32, seed=0)
    prefill = _masks(run_steps(torch_side, ids, layout, 1)[0][2])        # 31 tokens at once
    steps = run_steps(torch_side, ids, layout, 30)                        # 2, then 30 × 1
    differ = decisions = 0
    for j, (_, _, out) in enumerate(steps[1:-1]):                         # positions 2 … 30
        for one, many in zip(_masks(out), prefill):
            many = many.reshape(4, 31, -1)[:, 2 + j]
            differ += int((one.reshape(many.shape) != many).sum())
            decisions += many.size
    assert decisions == 4 * 29 * 11 * cfg.num_hidden_layers
    assert differ == 0 if dtype == torch.float32 else differ <= 0.005 * decisions, differ

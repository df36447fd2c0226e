"""The ONNX function bodies against plugins/reference.py, through stock ONNX Runtime."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from lte_convert.exporters.functions import OPSET, functions
from lte_convert.plugins import spec
from lte_convert.plugins.reference import sparse_ffn_down_reference, sparse_ffn_up_reference

D, E, S = 16, 6, 4
F = E * S
_ONNX_TYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}


def _pair_model(activation, gated, dtype):
    """x, mask and weights as graph inputs -> Up -> Down, attributes as the exporter sets them."""
    t = _ONNX_TYPE[dtype]
    up = helper.make_node(spec.OP_UP, list(spec.UP_INPUTS), ["h"], domain=spec.NAMESPACE,
                          expert_size=S, activation=activation, gated=int(gated),
                          plugin_namespace=spec.NAMESPACE)
    down = helper.make_node(spec.OP_DOWN, ["h", "mask", "w_down_t", "b_down"], ["y"],
                            domain=spec.NAMESPACE, expert_size=S, plugin_namespace=spec.NAMESPACE)
    shapes = {"x": ["b", "n", D], "w_gate": [F, D], "w_up": [F, D], "b_gate": [F], "b_up": [F],
              "w_down_t": [F, D], "b_down": [D]}
    inputs = [helper.make_tensor_value_info(k, t, v) for k, v in shapes.items()]
    inputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, ["b", "n", E]))
    outputs = [helper.make_tensor_value_info("h", t, ["b", "n", F]),
               helper.make_tensor_value_info("y", t, ["b", "n", D])]
    graph = helper.make_graph([up, down], "pair", inputs, outputs)
    model = helper.make_model(graph, functions=functions(), opset_imports=[
        helper.make_opsetid("", OPSET), helper.make_opsetid(spec.NAMESPACE, spec.OP_VERSION)])
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", spec.ACTIVATIONS)
def test_body_matches_reference(activation, gated, dtype):
    g = torch.Generator().manual_seed(2 * spec.ACTIVATIONS.index(activation) + gated)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(dtype)
    x, mask = r(2, 3, D), torch.rand(2, 3, E, generator=g) > 0.5
    w_gate, w_up, w_down_t = r(F, D), r(F, D), r(F, D)
    b_gate, b_up, b_down = r(F), r(F), r(D)
    if not gated:   # what the emitter passes for a non-gated FFN
        w_gate, b_gate = w_up, b_up
    sess = _pair_model(activation, gated, dtype)
    feed = {k: v.numpy() for k, v in dict(x=x, mask=mask, w_gate=w_gate, w_up=w_up, b_gate=b_gate,
                                          b_up=b_up, w_down_t=w_down_t, b_down=b_down).items()}
    h, y = sess.run(["h", "y"], feed)
    h_ref = sparse_ffn_up_reference(x, mask, w_gate, w_up, b_gate, b_up, S, activation, gated)
    y_ref = sparse_ffn_down_reference(h_ref, mask, w_down_t, b_down, S)
    # one numerics rule (spec.py): fp32 math, h rounded once on each side -> within one
    # rounding (2u relative) in fp16; fp32 differs by summation order only
    tol = 1e-5 if dtype == torch.float32 else 2 * 2.0 ** -11
    np.testing.assert_allclose(h.astype(np.float32), h_ref.float().numpy(), atol=tol, rtol=tol)
    np.testing.assert_allclose(y.astype(np.float32), y_ref.float().numpy(), atol=tol * 10, rtol=tol)
    assert (h.reshape(2, 3, E, S)[~mask.numpy()] == 0).all()


def test_activations_are_distinguished():
    """A body that ignored `activation` would give the same h for every activation."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, D, generator=g)
    feed = dict(x=x, mask=torch.ones(1, 2, E, dtype=torch.bool),
                w_gate=torch.randn(F, D, generator=g), w_up=torch.randn(F, D, generator=g),
                b_gate=torch.zeros(F), b_up=torch.zeros(F),
                w_down_t=torch.randn(F, D, generator=g), b_down=torch.zeros(D))
    feed = {k: v.numpy() for k, v in feed.items()}
    hs = [_pair_model(a, True, torch.float32).run(["h"], feed)[0] for a in spec.ACTIVATIONS]
    for i in range(len(hs)):
        for j in range(i + 1, len(hs)):
            assert not np.allclose(hs[i], hs[j]), (spec.ACTIVATIONS[i], spec.ACTIVATIONS[j])

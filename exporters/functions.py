"""Model-local ONNX functions: the reference semantics of the custom nodes in standard ops.

With these bodies in `model.functions`, stock ONNX Runtime and `polygraphy run --onnxrt`
run an exported file with no extra library (they inline the body); a registered kernel or
TensorRT plugin of the same name replaces it for speed.

One function per op type: ONNX identifies a function by (domain, name), while activation,
gating and expert size differ between nodes. The bodies therefore read the node's
attributes by reference (`ref_attr_name`) and select with `Where`:

    SparseFFNUp(x, mask, w_gate, w_up, b_gate, b_up; expert_size, activation, gated):
        g  = x·W_gateᵀ + b_gate                       # fp32 (Cast), [..., F]
        u  = x·W_upᵀ + b_up
        a  = Where(activation == "silu", silu(g), Where(== "gelu", gelu(g), ...))
        h  = a ⊙ Where(gated, u, 1)                   # non-gated nodes pass W_up as W_gate
        h  = Where(mask[..., E, 1], h[..., E, s], 0)  # skipped experts give 0
        h  = CastLike(h, x)                           # rounded to the model dtype

    SparseFFNDown(h, mask, w_down_t, b_down; expert_size):
        y  = Where(mask, h, 0)·W_down_t + b_down      # fp32, then CastLike(y, h)

All four activations are computed and one is selected: the body is a correctness path
(reference and fallback), not the fast one. String comparison needs opset 19 (`Equal` on
strings), so exported models use opset 19. Activations are written in opset-19 ops:
gelu = 0.5·x·(1 + erf(x/√2)), gelu_tanh = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
"""
from __future__ import annotations

import math

import onnx
from onnx import AttributeProto, TensorProto, helper

from lte_convert.plugins import spec

OPSET = 19


def _ref(node: onnx.NodeProto, attr: str, ref: str, kind: int) -> onnx.NodeProto:
    """Give `node` an attribute `attr` whose value is the calling node's attribute `ref`."""
    a = AttributeProto()
    a.name, a.ref_attr_name, a.type = attr, ref, kind
    node.attribute.append(a)
    return node


class _Body:
    """Tiny builder: each call appends one node and returns its (unique) output name."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []

    def __call__(self, op, *inputs, out=None, **attrs):
        out = out or f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def const(self, value):
        if isinstance(value, str):
            return self("Constant", value_string=value)
        if isinstance(value, int):
            return self("Constant", value_ints=[value])
        return self("Constant", value_float=value)

    def attr_const(self, ref: str, kind: int):
        """A Constant holding the calling node's attribute `ref` (INT -> int64[1], STRING -> str)."""
        out = f"t{len(self.nodes)}"
        value_attr = {AttributeProto.INT: "value_int", AttributeProto.STRING: "value_string"}[kind]
        self.nodes.append(_ref(helper.make_node("Constant", [], [out]), value_attr, ref, kind))
        if kind == AttributeProto.INT:
            return self("Unsqueeze", out, self.const(0))
        return out

    def linear(self, xf, w, b):
        """xf [..., d] fp32 · w[F, d]ᵀ + b[F] -> [..., F] fp32."""
        wt = self("Transpose", self("Cast", w, to=TensorProto.FLOAT))
        return self("Add", self("MatMul", xf, wt), self("Cast", b, to=TensorProto.FLOAT))

    def mask_experts(self, h, mask, s):
        """Zero the skipped experts of h [..., F] (fp32): view as [..., E, s], Where on mask."""
        lead = self("Shape", h, end=-1)
        h3 = self("Reshape", h, self("Concat", lead, self.const(-1), s, axis=0))
        m3 = self("Unsqueeze", mask, self.const(-1))
        return self("Reshape", self("Where", m3, h3, self.const(0.0)), self("Shape", h))


def _activation(b: _Body, g: str, name: str) -> str:
    """One activation of g (fp32) in standard ops."""
    if name == "silu":
        return b("Mul", g, b("Sigmoid", g))
    if name == "relu":
        return b("Relu", g)
    half_g = b("Mul", g, b.const(0.5))
    if name == "gelu":
        inner = b("Erf", b("Mul", g, b.const(1.0 / math.sqrt(2.0))))
    else:
        assert name == "gelu_tanh", name
        cube = b("Mul", b("Mul", g, g), g)
        poly = b("Add", g, b("Mul", cube, b.const(0.044715)))
        inner = b("Tanh", b("Mul", poly, b.const(math.sqrt(2.0 / math.pi))))
    return b("Mul", half_g, b("Add", inner, b.const(1.0)))


def up_function() -> onnx.FunctionProto:
    """lte::SparseFFNUp as a function of standard ops (reads its attributes by reference)."""
    b = _Body()
    x, mask, w_gate, w_up, b_gate, b_up = spec.UP_INPUTS
    xf = b("Cast", x, to=TensorProto.FLOAT)
    g = b.linear(xf, w_gate, b_gate)
    u = b.linear(xf, w_up, b_up)
    act_name = b.attr_const("activation", AttributeProto.STRING)
    a = _activation(b, g, spec.ACTIVATIONS[-1])
    for name in reversed(spec.ACTIVATIONS[:-1]):
        a = b("Where", b("Equal", act_name, b.const(name)), _activation(b, g, name), a)
    gated = b("Cast", b.attr_const("gated", AttributeProto.INT), to=TensorProto.BOOL)
    h = b("Mul", a, b("Where", gated, u, b.const(1.0)))
    h = b.mask_experts(h, mask, b.attr_const("expert_size", AttributeProto.INT))
    b("CastLike", h, x, out=spec.UP_OUTPUTS[0])
    return helper.make_function(
        spec.NAMESPACE, spec.OP_UP, list(spec.UP_INPUTS), list(spec.UP_OUTPUTS), b.nodes,
        [helper.make_opsetid("", OPSET)],
        attributes=[*spec.UP_ATTRS, spec.PLUGIN_NAMESPACE_ATTR],
        doc_string="Reference semantics of lte.SparseFFNUp (plugins/spec.py), fp32 math.")


def down_function() -> onnx.FunctionProto:
    """lte::SparseFFNDown as a function of standard ops."""
    b = _Body()
    h, mask, w_down_t, b_down = spec.DOWN_INPUTS
    hf = b.mask_experts(b("Cast", h, to=TensorProto.FLOAT), mask,
                        b.attr_const("expert_size", AttributeProto.INT))
    y = b("Add", b("MatMul", hf, b("Cast", w_down_t, to=TensorProto.FLOAT)),
          b("Cast", b_down, to=TensorProto.FLOAT))
    b("CastLike", y, h, out=spec.DOWN_OUTPUTS[0])
    return helper.make_function(
        spec.NAMESPACE, spec.OP_DOWN, list(spec.DOWN_INPUTS), list(spec.DOWN_OUTPUTS), b.nodes,
        [helper.make_opsetid("", OPSET)],
        attributes=[*spec.DOWN_ATTRS, spec.PLUGIN_NAMESPACE_ATTR],
        doc_string="Reference semantics of lte.SparseFFNDown (plugins/spec.py), fp32 math.")


def functions() -> list[onnx.FunctionProto]:
    return [up_function(), down_function()]

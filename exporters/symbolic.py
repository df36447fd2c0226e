"""ONNX translation of `torch.ops.lte.sparse_ffn`: the `lte::SparseFFNUp` + `lte::SparseFFNDown`
node pair.

A folded LTE model calls `torch.ops.lte.sparse_ffn` in every mode (plugins/ops.py), so
`torch.export` keeps the op in its program (its fake kernel gives the shapes). The ONNX
exporter maps it through the standard route, `torch.onnx.export(..., dynamo=True,
custom_translation_table=translation_table())`: each call becomes two custom nodes.

    x [..., d], mask [..., E] (bool)
      │
      ├─► lte::SparseFFNUp(x, mask, w_gate, w_up, b_gate, b_up)  ─► h [..., F]   (model dtype)
      └─► lte::SparseFFNDown(h, mask, w_down_t, b_down)          ─► y [..., d]

Inputs follow plugins/spec.py (UP_INPUTS, DOWN_INPUTS) exactly: a non-gated FFN passes
W_up/b_up again in the gate slots with gated=0, and an absent bias becomes a zero vector
(a constant, which the exporter stores as an initializer), so every node has the same fixed
input list (what a TensorRT plugin needs). The nodes carry the spec's attributes plus
plugin_namespace="lte" (how TensorRT's ONNX parser finds the plugin). Their model-local
function bodies are attached after export (exporters/functions.py). The exporter needs an
ONNX schema for each custom op to accept the nodes: `with onnx_schemas():` registers them for
the export only (registered for good, they would make the ONNX checker reject attributes the
schema does not list, such as the `aot` flag trt_plugins adds).
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript
import torch
from onnx.defs import OpSchema
from onnxscript import opset19 as op

from lte_convert.plugins import spec

_LTE = onnxscript.values.Opset(spec.NAMESPACE, spec.OP_VERSION)
_ATTR_TYPES = {int: OpSchema.AttrType.INT, str: OpSchema.AttrType.STRING}


@contextmanager
def onnx_schemas():
    """ONNX schemas of lte::SparseFFNUp / SparseFFNDown while the block runs."""
    param = OpSchema.FormalParameter
    added = []
    for name, inputs, outputs, attrs in (
            (spec.OP_UP, spec.UP_INPUTS, spec.UP_OUTPUTS, spec.UP_ATTRS),
            (spec.OP_DOWN, spec.DOWN_INPUTS, spec.DOWN_OUTPUTS, spec.DOWN_ATTRS)):
        if onnx.defs.has(name, spec.NAMESPACE):
            continue
        added.append(name)
        onnx.defs.register_schema(OpSchema(
            name, spec.NAMESPACE, spec.OP_VERSION,
            inputs=[param(n, "M" if n == "mask" else "T") for n in inputs],
            outputs=[param(n, "T") for n in outputs],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
                               "model dtype"), ("M", ["tensor(bool)"], "expert mask")],
            attributes=[OpSchema.Attribute(a, _ATTR_TYPES[t], "") for a, t in attrs.items()]
            + [OpSchema.Attribute(spec.PLUGIN_NAMESPACE_ATTR, OpSchema.AttrType.STRING, "")]))
    try:
        yield
    finally:
        for name in added:
            onnx.defs.deregister_schema(name, spec.OP_VERSION, spec.NAMESPACE)


def _zeros(like, axis: int, x):
    """A zero vector as long as `like`'s dimension `axis`, in x's dtype (a constant)."""
    return op.Constant(value=ir.tensor(np.zeros(int(like.shape[axis]), x.dtype.numpy())))


def sparse_ffn_to_onnx(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, expert_size,
                       activation):
    """Translation of torch.ops.lte.sparse_ffn (same arguments) into the node pair."""
    gated = w_gate is not None
    if b_up is None:
        b_up = _zeros(w_up, 0, x)
    if not gated:
        w_gate, b_gate = w_up, b_up
    elif b_gate is None:
        b_gate = _zeros(w_up, 0, x)
    if b_down is None:
        b_down = _zeros(w_down_t, 1, x)
    h = _LTE.SparseFFNUp(x, mask, w_gate, w_up, b_gate, b_up, expert_size=expert_size,
                         activation=activation, gated=int(gated),
                         plugin_namespace=spec.NAMESPACE)
    return _LTE.SparseFFNDown(h, mask, w_down_t, b_down, expert_size=expert_size,
                              plugin_namespace=spec.NAMESPACE)


def translation_table() -> dict:
    """`custom_translation_table` for torch.onnx.export(dynamo=True), used inside
    `with onnx_schemas():`."""
    return {torch.ops.lte.sparse_ffn.default: sparse_ffn_to_onnx}

"""ONNX emitter of the sparse FFN: the `lte::SparseFFNUp` + `lte::SparseFFNDown` node pair.

`plugins.ops.sparse_ffn` calls `emit_sparse_ffn` while `torch.onnx.export(..., dynamo=True)`
traces a folded LTE model. Each call becomes two custom nodes in the graph:

    x [..., d], mask [..., E] (bool)
      │
      ├─► lte::SparseFFNUp(x, mask, w_gate, w_up, b_gate, b_up)  ─► h [..., F]   (model dtype)
      └─► lte::SparseFFNDown(h, mask, w_down_t, b_down)          ─► y [..., d]

Inputs follow plugins/spec.py (UP_INPUTS, DOWN_INPUTS) exactly: a non-gated FFN passes
W_up/b_up again in the gate slots with gated=0, and an absent bias becomes a zero vector,
so every node has the same fixed input list (what a TensorRT plugin needs). The nodes carry
the spec's attributes plus plugin_namespace="lte" (how TensorRT's ONNX parser finds the
plugin). Their model-local function bodies are attached after export (exporters/functions.py).
"""
from __future__ import annotations

import torch

from lte_convert.plugins import spec


def _attrs(base: dict) -> dict:
    return {**base, spec.PLUGIN_NAMESPACE_ATTR: spec.NAMESPACE}


def emit_sparse_ffn(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down,
                    shape: spec.FFNShape) -> torch.Tensor:
    """Emit the node pair for one FFN; returns y [..., d] (a symbolic tensor while exporting).

    x [..., d] (model dtype), mask [..., E] bool, w_* [F, d], b_gate/b_up [F] or None,
    b_down [d] or None. `shape` must describe these tensors (attributes come from it, never
    from tensor values, so nothing is read back from the device during tracing).
    """
    F_, d = shape.d_ff, shape.d
    if b_up is None:
        b_up = torch.zeros(F_, dtype=x.dtype, device=x.device)
    if shape.gated:
        if b_gate is None:
            b_gate = torch.zeros(F_, dtype=x.dtype, device=x.device)
    else:
        w_gate, b_gate = w_up, b_up
    if b_down is None:
        b_down = torch.zeros(d, dtype=x.dtype, device=x.device)

    lead = list(x.shape[:-1])
    h = torch.onnx.ops.symbolic(
        spec.qualified(spec.OP_UP), (x, mask, w_gate, w_up, b_gate, b_up),
        _attrs(shape.up_attrs()), dtype=x.dtype, shape=[*lead, F_], version=spec.OP_VERSION)
    return torch.onnx.ops.symbolic(
        spec.qualified(spec.OP_DOWN), (h, mask, w_down_t, b_down),
        _attrs(shape.down_attrs()), dtype=x.dtype, shape=[*lead, d], version=spec.OP_VERSION)

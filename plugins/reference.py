"""Plain PyTorch reference of lte.SparseFFN: the semantics of plugins/spec.py, literally.

Masked dense: it computes every expert and zeroes the skipped ones. Every other
implementation (CPU, Triton, ONNX function bodies, TensorRT) is tested against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACT_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


def sparse_ffn_up_reference(x, mask, w_gate, w_up, b_gate, b_up, expert_size, activation, gated):
    """h [..., F] in x.dtype: act(gate) * up (or act(up)), skipped experts zeroed. fp32 math."""
    xf = x.float()
    up = xf @ w_up.float().t()
    if b_up is not None:
        up = up + b_up.float()
    if gated:
        gate = xf @ w_gate.float().t()
        if b_gate is not None:
            gate = gate + b_gate.float()
        h = ACT_FNS[activation](gate) * up
    else:
        h = ACT_FNS[activation](up)
    h = h * mask.repeat_interleave(expert_size, dim=-1).to(h.dtype)
    return h.to(x.dtype)


def sparse_ffn_down_reference(h, mask, w_down_t, b_down, expert_size):
    """y [..., d] in h.dtype from h [..., F]; skipped experts' columns contribute nothing."""
    hf = h.float() * mask.repeat_interleave(expert_size, dim=-1).float()
    y = hf @ w_down_t.float()
    if b_down is not None:
        y = y + b_down.float()
    return y.to(h.dtype)


def sparse_ffn_reference(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down,
                         expert_size, activation):
    """The whole op. Gated when w_gate is not None. x [..., d], mask [..., E] -> y [..., d]."""
    h = sparse_ffn_up_reference(x, mask, w_gate, w_up, b_gate, b_up, expert_size, activation,
                                gated=w_gate is not None)
    return sparse_ffn_down_reference(h, mask, w_down_t, b_down, expert_size)

"""CPU kernels of lte.SparseFFN (first version: the reference; replaced by a skipping one)."""
from __future__ import annotations

from plugins.reference import (sparse_ffn_down_reference, sparse_ffn_reference,
                               sparse_ffn_up_reference)


def sparse_ffn(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, expert_size, activation):
    return sparse_ffn_reference(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down,
                                expert_size, activation).contiguous()


def sparse_ffn_up(x, mask, w_gate, w_up, b_gate, b_up, expert_size, activation):
    return sparse_ffn_up_reference(x, mask, w_gate, w_up, b_gate, b_up, expert_size, activation,
                                   gated=w_gate is not None).contiguous()


def sparse_ffn_down(h, mask, w_down_t, b_down, expert_size):
    return sparse_ffn_down_reference(h, mask, w_down_t, b_down, expert_size).contiguous()

"""The `lte` custom ops for PyTorch, and the entry point LTE modules call.

    torch.ops.lte.sparse_ffn(x, mask, w_gate?, w_up, w_down_t, b_gate?, b_up?, b_down?,
                             expert_size, activation) -> y            # the whole FFN
    torch.ops.lte.sparse_ffn_up(x, mask, w_gate?, w_up, b_gate?, b_up?,
                                expert_size, activation) -> h          # masked h [..., F]
    torch.ops.lte.sparse_ffn_down(h, mask, w_down_t, b_down?, expert_size) -> y

Semantics and layout: plugins/spec.py (reference: plugins/reference.py). Gated when w_gate
is given. Each op has a fake (meta) kernel for torch.compile / export, a CPU kernel
(plugins/cpu.py, which skips the inactive experts' weights) and a CUDA kernel
(plugins/triton_dispatch.py, imported only when a CUDA tensor arrives, so a CPU-only install
without Triton imports this module fine). Every kernel validates its inputs with
spec.check_inputs first, so a bad input is a ValueError naming the expected and actual
values, never a wrong answer or a crash inside a kernel.

`sparse_ffn(..., shape)` is what converter.lte_ffn.LTEFFN calls in "folded" mode: it runs
torch.ops.lte.sparse_ffn in every mode, so `torch.export` keeps the op in the exported program
(AOTInductor, ExecuTorch and pt2e see the real op, and run its kernels), and the ONNX
exporter maps it to the lte::SparseFFNUp/Down node pair through its translation table
(exporters/symbolic.py). plugins/ imports nothing from exporters/.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lte_convert.plugins import cpu
from lte_convert.plugins.reference import (sparse_ffn_down_reference, sparse_ffn_reference,
                               sparse_ffn_up_reference)
from lte_convert.plugins.spec import ACTIVATIONS, DTYPES, NAMESPACE, FFNShape, check_inputs, check_weights


def _check_attrs(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"lte.SparseFFN: activation {activation!r} is not supported; "
                         f"expected one of {', '.join(ACTIVATIONS)}.")


def _check_up(x, mask, w_gate, w_up, b_gate, b_up, expert_size, activation):
    """check_inputs for the up half: W_up stands in for W_down_t (same [F, d] shape)."""
    _check_attrs(activation)
    check_inputs(x, mask, w_gate, w_up, w_up, b_gate, b_up, None, expert_size)


def _check_down(h, mask, w_down_t, b_down, expert_size):
    """Validate the down half: h [..., F], mask [..., F/expert_size], W_down_t [F, d]."""
    def fail(what):
        raise ValueError(f"lte.SparseFFNDown: {what}")

    if w_down_t.dim() != 2:
        fail(f"w_down_t must be 2-D [F, d], got shape {tuple(w_down_t.shape)}.")
    F, d = w_down_t.shape
    if h.shape[-1] != F:
        fail(f"h has shape {tuple(h.shape)}; expected [..., {F}] (w_down_t is [{F}, {d}]; "
             "W_down must be stored transposed, [F, d]).")
    if h.dtype not in DTYPES:
        fail(f"h has dtype {h.dtype}; expected one of {', '.join(map(str, DTYPES))}.")
    if not isinstance(expert_size, int) or expert_size <= 0 or F % expert_size:
        fail(f"expert_size={expert_size!r} must be a positive int dividing F={F}.")
    E = F // expert_size
    if mask.dtype != torch.bool:
        fail(f"mask has dtype {mask.dtype}; expected torch.bool.")
    if tuple(mask.shape) != tuple(h.shape[:-1]) + (E,):
        fail(f"mask has shape {tuple(mask.shape)}; expected {tuple(h.shape[:-1]) + (E,)}.")
    check_weights({"w_down_t": w_down_t, "b_down": b_down}, {"w_down_t": (F, d), "b_down": (d,)},
                  mask, h, "h", fail)


def _check(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, expert_size, activation):
    _check_attrs(activation)
    check_inputs(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, expert_size)


def _triton():
    """plugins.triton_dispatch, imported on the first CUDA call only."""
    try:
        from lte_convert.plugins import triton_dispatch
    except ImportError as e:
        raise RuntimeError(f"lte.SparseFFN on CUDA needs Triton, which failed to import ({e}); "
                           "install it with `pip install 'lte-convert[gpu]'`.") from e
    return triton_dispatch


# ---------------------------------------------------------------------------------------------
# lte::sparse_ffn — the whole FFN
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{NAMESPACE}::sparse_ffn", mutates_args=())
def sparse_ffn_op(x: Tensor, mask: Tensor, w_gate: Optional[Tensor], w_up: Tensor,
                  w_down_t: Tensor, b_gate: Optional[Tensor], b_up: Optional[Tensor],
                  b_down: Optional[Tensor], expert_size: int, activation: str) -> Tensor:
    """x [..., d], mask [..., E] -> y [..., d]. Devices without their own kernel: reference."""
    _check(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, expert_size, activation)
    return sparse_ffn_reference(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down,
                                expert_size, activation).contiguous()


@sparse_ffn_op.register_kernel("cpu")
def _sparse_ffn_cpu(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, expert_size,
                    activation):
    _check(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, expert_size, activation)
    return cpu.sparse_ffn(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, expert_size,
                          activation)


@sparse_ffn_op.register_kernel("cuda")
def _sparse_ffn_cuda(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, expert_size,
                     activation):
    _check(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, expert_size, activation)
    d, E = x.shape[-1], mask.shape[-1]
    y = _triton().sparse_ffn(x.reshape(-1, d).contiguous(), mask.reshape(-1, E).contiguous(),
                             w_gate, w_up, w_down_t, b_gate, b_up, b_down,
                             expert_size=expert_size, activation=activation)
    return y.reshape(x.shape)


@sparse_ffn_op.register_fake
def _sparse_ffn_fake(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, expert_size,
                     activation):
    _check(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, expert_size, activation)
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    *tensors, ctx.expert_size, ctx.activation = inputs
    ctx.save_for_backward(*tensors)


def _backward(ctx, grad_y):
    """Gradients through the reference (masked dense): for fine-tuning a folded model; the
    sparse kernels are for inference."""
    tensors = ctx.saved_tensors
    need = ctx.needs_input_grad[:len(tensors)]
    leaves = [t.detach().requires_grad_(n) if t is not None else None
              for t, n in zip(tensors, need)]
    with torch.enable_grad():
        y = sparse_ffn_reference(*leaves, ctx.expert_size, ctx.activation)
        wanted = [t for t, n in zip(leaves, need) if n]
        grads = iter(torch.autograd.grad(y, wanted, grad_y, allow_unused=True))
    return (*(next(grads) if n else None for n in need), None, None)


sparse_ffn_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# lte::sparse_ffn_up / lte::sparse_ffn_down — the pair ONNX and TensorRT use
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{NAMESPACE}::sparse_ffn_up", mutates_args=())
def sparse_ffn_up_op(x: Tensor, mask: Tensor, w_gate: Optional[Tensor], w_up: Tensor,
                     b_gate: Optional[Tensor], b_up: Optional[Tensor], expert_size: int,
                     activation: str) -> Tensor:
    """x [..., d], mask [..., E] -> masked h [..., F] in x.dtype. Default: reference."""
    _check_up(x, mask, w_gate, w_up, b_gate, b_up, expert_size, activation)
    return sparse_ffn_up_reference(x, mask, w_gate, w_up, b_gate, b_up, expert_size,
                                   activation, gated=w_gate is not None).contiguous()


@sparse_ffn_up_op.register_kernel("cpu")
def _sparse_ffn_up_cpu(x, mask, w_gate, w_up, b_gate, b_up, expert_size, activation):
    _check_up(x, mask, w_gate, w_up, b_gate, b_up, expert_size, activation)
    return cpu.sparse_ffn_up(x, mask, w_gate, w_up, b_gate, b_up, expert_size, activation)


@sparse_ffn_up_op.register_kernel("cuda")
def _sparse_ffn_up_cuda(x, mask, w_gate, w_up, b_gate, b_up, expert_size, activation):
    _check_up(x, mask, w_gate, w_up, b_gate, b_up, expert_size, activation)
    d, E = x.shape[-1], mask.shape[-1]
    h = _triton().sparse_ffn_up(x.reshape(-1, d).contiguous(), mask.reshape(-1, E).contiguous(),
                                w_gate, w_up, b_gate, b_up, expert_size=expert_size,
                                activation=activation, gated=w_gate is not None)
    return h.reshape(*x.shape[:-1], w_up.shape[0])


@sparse_ffn_up_op.register_fake
def _sparse_ffn_up_fake(x, mask, w_gate, w_up, b_gate, b_up, expert_size, activation):
    _check_up(x, mask, w_gate, w_up, b_gate, b_up, expert_size, activation)
    return x.new_empty(*x.shape[:-1], w_up.shape[0])


@torch.library.custom_op(f"{NAMESPACE}::sparse_ffn_down", mutates_args=())
def sparse_ffn_down_op(h: Tensor, mask: Tensor, w_down_t: Tensor, b_down: Optional[Tensor],
                       expert_size: int) -> Tensor:
    """h [..., F], mask [..., E] -> y [..., d]; skipped experts' rows of W_down_t unread."""
    _check_down(h, mask, w_down_t, b_down, expert_size)
    return sparse_ffn_down_reference(h, mask, w_down_t, b_down, expert_size).contiguous()


@sparse_ffn_down_op.register_kernel("cpu")
def _sparse_ffn_down_cpu(h, mask, w_down_t, b_down, expert_size):
    _check_down(h, mask, w_down_t, b_down, expert_size)
    return cpu.sparse_ffn_down(h, mask, w_down_t, b_down, expert_size)


@sparse_ffn_down_op.register_kernel("cuda")
def _sparse_ffn_down_cuda(h, mask, w_down_t, b_down, expert_size):
    _check_down(h, mask, w_down_t, b_down, expert_size)
    F, E = h.shape[-1], mask.shape[-1]
    y = _triton().sparse_ffn_down(h.reshape(-1, F).contiguous(), mask.reshape(-1, E).contiguous(),
                                  w_down_t, b_down, expert_size=expert_size)
    return y.reshape(*h.shape[:-1], w_down_t.shape[1])


@sparse_ffn_down_op.register_fake
def _sparse_ffn_down_fake(h, mask, w_down_t, b_down, expert_size):
    _check_down(h, mask, w_down_t, b_down, expert_size)
    return h.new_empty(*h.shape[:-1], w_down_t.shape[1])


# ---------------------------------------------------------------------------------------------
# Entry point for LTE modules
# ---------------------------------------------------------------------------------------------
def sparse_ffn(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, shape: FFNShape):
    """y = lte.SparseFFN(x, mask) for one FFN described by `shape`: torch.ops.lte.sparse_ffn
    (CPU or Triton kernel; kept as one op by torch.export)."""
    if shape.gated != (w_gate is not None):
        raise ValueError(f"lte.SparseFFN: shape says gated={shape.gated} but w_gate is "
                         f"{'missing' if w_gate is None else 'given'}; pass W_gate exactly "
                         "for gated FFNs.")
    return torch.ops.lte.sparse_ffn(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down,
                                    shape.expert_size, shape.activation)

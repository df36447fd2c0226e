"""PyTorch launchers of the Triton kernels and the whole op's dispatch by token count.

`sparse_ffn_up`, `sparse_ffn_down` (always the kernels, plugins/triton_kernels.py, with
plugins/triton_configs.py's launch configuration) and `sparse_ffn` (the whole op,
dispatched by token count to what measured fastest: both kernels for one token, the up
kernel + cuBLAS for a few, cuBLAS + one fused act·up·mask kernel from
`tuning().dense_min_tokens` on; the machine it was measured on: triton_configs.H200).
Nothing here syncs with the host, so a decode step can be captured in a CUDA graph.
Imports Triton: plugins/ops.py imports this module on the first CUDA call only.
"""
from __future__ import annotations

import torch
import triton

from lte_convert.plugins.spec import ACTIVATION_CODES, gate_up_pair
from lte_convert.plugins.triton_configs import LaunchConfig, compact_piece, launch_config, tuning
from lte_convert.plugins.triton_kernels import (act_mul_mask_kernel, sparse_ffn_down_kernel,
                                                sparse_ffn_up_kernel)

def _mask_bytes(mask2d, T, E):
    if mask2d.dtype != torch.bool or tuple(mask2d.shape) != (T, E) or not mask2d.is_contiguous():
        raise ValueError(f"lte.SparseFFN (triton): mask must be a contiguous bool tensor of shape "
                         f"{(T, E)}, got {mask2d.dtype} {tuple(mask2d.shape)}.")
    return mask2d.view(torch.uint8)


def _check_2d(name, t, shape, dtype):
    if t is not None and (tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous()):
        raise ValueError(f"lte.SparseFFN (triton): {name} must be a contiguous {dtype} tensor of "
                         f"shape {shape}, got {t.dtype} {tuple(t.shape)} "
                         f"(contiguous={t.is_contiguous()}).")


def sparse_ffn_up(x2d, mask2d, w_gate, w_up, b_gate, b_up, *, expert_size, activation, gated,
                  config: LaunchConfig | None = None, out=None):
    """h [T, F] (x.dtype) = masked act(x·W_gateᵀ + b_gate)·(x·W_upᵀ + b_up); one launch.

    `config` overrides launch_config's choice; `out` is an optional preallocated h.
    """
    T, d = x2d.shape
    F = w_up.shape[0]
    for name, t, shape in (("x", x2d, (T, d)), ("w_up", w_up, (F, d)), ("b_up", b_up, (F,)),
                           ("w_gate", w_gate if gated else None, (F, d)),
                           ("b_gate", b_gate if gated else None, (F,))):
        _check_2d(name, t, shape, w_up.dtype)
    mask_u8 = _mask_bytes(mask2d, T, F // expert_size)
    has_bias = b_up is not None or (gated and b_gate is not None)
    if has_bias and b_up is None:
        b_up = torch.zeros(F, dtype=x2d.dtype, device=x2d.device)
    if not gated:
        w_gate, b_gate = w_up, b_up
    elif has_bias and b_gate is None:
        b_gate = torch.zeros(F, dtype=x2d.dtype, device=x2d.device)
    h = out if out is not None else torch.empty((T, F), dtype=x2d.dtype, device=x2d.device)
    _check_2d("out", h, (T, F), w_up.dtype)
    if T == 0:
        return h
    cfg = config or launch_config("up", T, d, F, expert_size, x2d.dtype)
    sparse_ffn_up_kernel[cfg.grid(T, d, F)](
        x2d, mask_u8, w_gate, w_up, b_gate if has_bias else w_up, b_up if has_bias else w_up,
        T, d, F, h,
        EXPERT_SIZE=expert_size, ACTIVATION=ACTIVATION_CODES[activation], GATED=int(gated),
        HAS_BIAS=int(has_bias), **cfg.constexprs(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return h


def sparse_ffn_down(h2d, mask2d, w_down_t, b_down, *, expert_size,
                    config: LaunchConfig | None = None, out=None):
    """y [T, d] (h.dtype) = (h ⊙ mask)·W_down_t + b_down; one kernel launch.

    `config` overrides launch_config's choice; `out` is an optional preallocated y.
    """
    T, F = h2d.shape
    d = w_down_t.shape[1]
    for name, t, shape in (("h", h2d, (T, F)), ("w_down_t", w_down_t, (F, d)),
                           ("b_down", b_down, (d,))):
        _check_2d(name, t, shape, w_down_t.dtype)
    mask_u8 = _mask_bytes(mask2d, T, F // expert_size)
    y = out if out is not None else torch.empty((T, d), dtype=h2d.dtype, device=h2d.device)
    _check_2d("out", y, (T, d), w_down_t.dtype)
    if T == 0:
        return y
    cfg = config or launch_config("down", T, d, F, expert_size, h2d.dtype)
    c = cfg.compact
    if cfg.block_t == 1 and c and (c & (c - 1) or c * expert_size < cfg.block_f
                                   or compact_piece(F, expert_size, cfg.block_f) == 0):
        raise ValueError(f"lte.SparseFFN (triton): config {cfg} asks for the compact down path, "
                         f"which needs compact a power of two >= block_f / expert_size (got "
                         f"{c}) and a power-of-two expert_size dividing block_f (got "
                         f"{expert_size}, {cfg.block_f}); use compact=0 or "
                         f"compact_piece(F, expert_size, block_f).")
    sparse_ffn_down_kernel[cfg.grid(T, d, F)](
        h2d, mask_u8, w_down_t, b_down if b_down is not None else w_down_t,
        T, d, F, y,
        EXPERT_SIZE=expert_size, HAS_BIAS=int(b_down is not None), **cfg.constexprs(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def _mm_f32(a, b):
    """a @ b accumulated in fp32 and returned in fp32 (never rounded to a's dtype): cuBLAS's
    fp16/bf16-in, fp32-out GEMM (`out_dtype`) on CUDA; fp32 copies elsewhere (the
    interpreter's CPU tensors)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _dense_gate_up(x2d, w_gate, w_up, b_gate, b_up):
    """cuBLAS gate, up [T, F] in fp32 (gate None when not gated). One GEMM for both when W_gate
    and W_up are one contiguous [2F, d] block (spec.gate_up_pair, as a folded LTEFFN holds
    them): gate and up are then the column halves of its [T, 2F] output."""
    F_ = w_up.shape[0]
    pair = gate_up_pair(w_gate, w_up)
    if pair is not None and pair.stride(0) == w_up.numel():
        gu = _mm_f32(x2d, pair.view(2 * F_, -1).t())            # [T, 2F]
        gate, up = gu[:, :F_], gu[:, F_:]
    else:
        up = _mm_f32(x2d, w_up.t())
        gate = _mm_f32(x2d, w_gate.t()) if w_gate is not None else None
    if b_up is not None:
        up = up + b_up.float()
    if gate is not None and b_gate is not None:
        gate = gate + b_gate.float()
    return gate, up


def _act_mul_mask(gate, up, mask2d, expert_size, activation, dtype):
    """h = act(gate)·up·mask in `dtype` (gate None: act(up)·mask), one fused elementwise
    launch; gate and up (fp32) may be column slices with a common row stride."""
    T, F = up.shape
    assert up.stride(1) == 1 and (gate is None or gate.stride() == up.stride()), up.stride()
    mask_u8 = _mask_bytes(mask2d, T, F // expert_size)
    h = torch.empty((T, F), dtype=dtype, device=up.device)
    BLOCK = min(1024, triton.next_power_of_2(F))
    act_mul_mask_kernel[(T, triton.cdiv(F, BLOCK))](
        gate if gate is not None else up, up, mask_u8, F, up.stride(0), h,
        EXPERT_SIZE=expert_size, ACTIVATION=ACTIVATION_CODES[activation],
        GATED=int(gate is not None), BLOCK=BLOCK, num_warps=4)
    return h


def _masked_down(h, w_down_t, b_down):
    """cuBLAS y = h·W_down_t + b_down, accumulated in fp32 and rounded once to h's dtype, for
    an h whose skipped experts are already 0."""
    y = _mm_f32(h, w_down_t)
    if b_down is not None:
        y = y + b_down.float()
    return y.to(h.dtype)


def sparse_ffn(x2d, mask2d, w_gate, w_up, w_down_t, b_gate, b_up, b_down, *,
               expert_size, activation):
    """The whole op on 2-D inputs: y [T, d]. Gated when w_gate is not None.

    Dispatch by token count (N = tuning().dense_min_tokens, 17 on the H200 of results/gpu.md):
      T == 1:                      up kernel + down kernel (each reads only active rows);
      1 < T < N:                   up kernel (union of the tokens' experts) + cuBLAS on the
                                   masked h for down (the down kernel has too few programs
                                   to stream for several tokens);
      T >= N:                      cuBLAS for all three projections (gate and up as one GEMM
                                   when paired, _dense_gate_up), one fused kernel for
                                   act(gate)·up·mask (the union is nearly every expert).
    Every path follows plugins/spec.py's numerics: gate, up and y accumulate in fp32 and are
    not rounded (cuBLAS returns fp32, `_mm_f32`); h is rounded once, y once.
    """
    T = x2d.shape[0]
    gated = w_gate is not None
    if T >= tuning().dense_min_tokens:
        gate, up = _dense_gate_up(x2d, w_gate, w_up, b_gate, b_up)
        return _masked_down(_act_mul_mask(gate, up, mask2d, expert_size, activation, x2d.dtype),
                            w_down_t, b_down)
    h = sparse_ffn_up(x2d, mask2d, w_gate, w_up, b_gate, b_up, expert_size=expert_size,
                      activation=activation, gated=gated)
    if T > 1:
        return _masked_down(h, w_down_t, b_down)
    return sparse_ffn_down(h, mask2d, w_down_t, b_down, expert_size=expert_size)

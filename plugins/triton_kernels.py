"""Triton GPU kernels for lte.SparseFFN: the one kernel source for PyTorch and TensorRT.

Semantics are those of plugins/spec.py (x [T, d], mask [T, E] bool, expert size s, F = E·s):

    up:    h[t, f] = act(x[t]·W_gate[f] + b_gate[f]) · (x[t]·W_up[f] + b_up[f]) · mask[t, f//s]
           (non-gated: act(x[t]·W_up[f] + b_up[f]) · mask[t, f // s]); h in x.dtype
    down:  y[t, c] = Σ_f h[t, f] · mask[t, f // s] · W_down_t[f, c] + b_down[c]; y in h.dtype

Every product accumulates in fp32. Expert e owns rows e·s … e·s+s−1 of W_gate, W_up and
W_down_t ([F, d], row-major), so a skipped expert is a skipped contiguous block.

Two op kernels (what TensorRT runs too), one launch each, no workspace, no atomics, no
host-side preprocessing; every program owns a disjoint block of the output and writes all
of it (zeros where masked).

up kernel — `sparse_ffn_up_kernel`, grid (cdiv(F, BLOCK_F), cdiv(T, BLOCK_T)):
    (x_ptr, mask_ptr, w_gate_ptr, w_up_ptr, b_gate_ptr, b_up_ptr,      # inputs
     T, D, F,                                                           # int32 scalars
     h_ptr,                                                             # output
     EXPERT_SIZE, ACTIVATION, GATED, HAS_BIAS, BLOCK_T, BLOCK_F, BLOCK_D)  # constexprs
  A program owns rows [pid0·BLOCK_F, +BLOCK_F) of h for tokens [pid1·BLOCK_T, +BLOCK_T). It
  reads the mask of those (token, row) pairs first; when none is active its loop has zero
  trips (it only writes zeros), so an inactive expert costs one tiny program. Otherwise it
  streams its rows of W_gate/W_up once, BLOCK_D columns at a time (16-byte vector loads;
  rows of inactive experts are predicated off), and multiplies them with x:
    BLOCK_T == 1: elementwise fp32 products in a [BLOCK_F, BLOCK_D] register accumulator,
                  summed once at the end (GEMV; rows split across programs, d is not split,
                  so act(gate)·up needs no cross-program reduction);
    BLOCK_T >= 16: tl.dot on [BLOCK_T, BLOCK_D] × [BLOCK_D, BLOCK_F] tiles (tokens padded).

down kernel — `sparse_ffn_down_kernel`, grid (cdiv(D, BLOCK_D), cdiv(T, BLOCK_T)):
    (h_ptr, mask_ptr, w_down_t_ptr, b_down_ptr,                        # inputs
     T, D, F,                                                           # int32 scalars
     y_ptr,                                                             # output
     EXPERT_SIZE, HAS_BIAS, BLOCK_T, BLOCK_D, BLOCK_F, COMPACT)         # constexprs
  A program owns columns [pid0·BLOCK_D, +BLOCK_D) of y for tokens [pid1·BLOCK_T, +BLOCK_T)
  and reads only rows of W_down_t whose expert is active for some token of its block
  (contiguous BLOCK_D-column row segments). Each program owns a disjoint slice of y, so no
  atomics and no zero-initialised buffer.
    BLOCK_T == 1, COMPACT > 0: walks the token's ACTIVE experts only. It reads the mask
                  COMPACT experts at a time (a power of two), sorts the keys (e if active
                  else E) so the active experts come first, and loops cdiv(active, EPC)
                  times over chunks of EPC = BLOCK_F / EXPERT_SIZE active experts: BLOCK_F
                  rows, all useful, one chunk prefetched. The trip count falls with sparsity.
    BLOCK_T == 1, COMPACT == 0: walks all F rows in chunks of BLOCK_F (inactive rows
                  predicated off), two chunks of weights prefetched in registers;
                  both: fp32 products in a [BLOCK_F, BLOCK_D] register accumulator, summed
                  over rows at the end;
    BLOCK_T >= 16: tl.dot on [BLOCK_T, BLOCK_F] × [BLOCK_F, BLOCK_D] tiles (COMPACT unused).

Pointer dtypes: x/w/b/h/y share one dtype (fp16, bf16 or fp32); the mask is any integer type
(PyTorch passes its bool tensor as `*u8`, TensorRT an INT32 tensor): 0 = skip, else compute.
ACTIVATION is an int code (`spec.ACTIVATION_CODES`). Offsets along tokens are 64-bit; inside a
weight matrix 32-bit (F·d < 2³¹). For d % 16 == 0 (every real model) an AOT compiler may declare
`tt.divisibility=16` on the pointers and on D and F; the JIT launcher gets that by
specialisation.

The kernels' block sizes, warps and stages come from plugins/triton_configs.py
(`launch_config`, shared by both launchers); Triton's scratch sizes are 0. The PyTorch
launchers and the whole op's dispatch by token count are in plugins/triton_dispatch.py
(`act_mul_mask_kernel` is its prefill helper, PyTorch only); `ast_source` below gives
trt_plugins/ the kernels to compile ahead of time.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lte_convert.plugins.spec import ACTIVATION_CODES, SHORT_NAMES
from lte_convert.plugins.triton_configs import LaunchConfig


@triton.jit
def _act(z, ACTIVATION: tl.constexpr):
    """act(z) for fp32 z; codes as in spec.ACTIVATION_CODES."""
    if ACTIVATION == 0:
        return z * tl.sigmoid(z)
    elif ACTIVATION == 1:
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == 2:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return z * tl.sigmoid(2.0 * inner)       # 0.5·(1 + tanh(u)) == sigmoid(2u)
    else:
        return tl.maximum(z, 0.0)


@triton.jit
def sparse_ffn_up_kernel(x_ptr, mask_ptr, w_gate_ptr, w_up_ptr, b_gate_ptr, b_up_ptr,
                         T, D, F,
                         h_ptr,
                         EXPERT_SIZE: tl.constexpr, ACTIVATION: tl.constexpr,
                         GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    """h[t, f] for a [BLOCK_T, BLOCK_F] block of (tokens, rows); see the module docstring."""
    pid_f = tl.program_id(0)
    pid_t = tl.program_id(1)
    n_experts = F // EXPERT_SIZE
    rows = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)                          # [BLOCK_F]
    row_ok = rows < F
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)                          # [BLOCK_T]
    tok_ok = toks < T
    toks64 = toks.to(tl.int64)
    w_rows = rows * D                                                       # row offsets

    # -- which (token, row) pairs are active: [BLOCK_T, BLOCK_F] ------------------------
    m = tl.load(mask_ptr + toks64[:, None] * n_experts + (rows // EXPERT_SIZE)[None, :],
                mask=tok_ok[:, None] & row_ok[None, :], other=0) != 0
    row_on = tl.max(m.to(tl.int32), axis=0) > 0                             # [BLOCK_F] union
    n_steps = tl.where(tl.max(row_on.to(tl.int32), axis=0) > 0, tl.cdiv(D, BLOCK_D), 0)

    # -- stream the rows of W_gate / W_up once ------------------------------------------
    if BLOCK_T == 1:
        # Software-prefetched GEMV: chunk k+1's loads are issued before chunk k's products,
        # so two chunks of weights are in flight per program (plain loads are not pipelined
        # by num_stages). The last trip loads past D: all predicated off, no traffic.
        acc_u = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
        x_row = x_ptr + toks64 * D                                          # [1]
        cols = tl.arange(0, BLOCK_D)
        w_mask = row_on[:, None] & (cols < D)[None, :]
        xk = tl.load(x_row + (cols[None, :] + 0 * rows[:, None]), mask=w_mask, other=0.0)
        wu = tl.load(w_up_ptr + w_rows[:, None] + cols[None, :], mask=w_mask, other=0.0)
        wg = wu
        if GATED:
            wg = tl.load(w_gate_ptr + w_rows[:, None] + cols[None, :], mask=w_mask, other=0.0)
        for k in range(1, n_steps + 1):
            cols = k * BLOCK_D + tl.arange(0, BLOCK_D)
            w_mask = row_on[:, None] & (cols < D)[None, :]
            xk_next = tl.load(x_row + (cols[None, :] + 0 * rows[:, None]), mask=w_mask, other=0.0)
            wu_next = tl.load(w_up_ptr + w_rows[:, None] + cols[None, :], mask=w_mask, other=0.0)
            wg_next = wu_next
            if GATED:
                wg_next = tl.load(w_gate_ptr + w_rows[:, None] + cols[None, :], mask=w_mask,
                                  other=0.0)
            xf = xk.to(tl.float32)
            acc_u += wu.to(tl.float32) * xf
            if GATED:
                acc_g += wg.to(tl.float32) * xf
            xk, wu, wg = xk_next, wu_next, wg_next
        up = tl.sum(acc_u, axis=1)[None, :]                                 # [1, BLOCK_F]
        gate = tl.sum(acc_g, axis=1)[None, :]
    else:
        up = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
        gate = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
        for k in range(0, n_steps):
            cols = k * BLOCK_D + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            xk = tl.load(x_ptr + toks64[:, None] * D + cols[None, :],
                         mask=tok_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_T, BLOCK_D]
            w_off = w_rows[None, :] + cols[:, None]                         # [BLOCK_D, BLOCK_F]
            w_mask = row_on[None, :] & col_ok[:, None]
            wu = tl.load(w_up_ptr + w_off, mask=w_mask, other=0.0)
            up = tl.dot(xk, wu, up, input_precision="ieee")
            if GATED:
                wg = tl.load(w_gate_ptr + w_off, mask=w_mask, other=0.0)
                gate = tl.dot(xk, wg, gate, input_precision="ieee")

    # -- epilogue: bias, activation, per-token mask, store ------------------------------
    if HAS_BIAS:
        up += tl.load(b_up_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            gate += tl.load(b_gate_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        h = _act(gate, ACTIVATION) * up
    else:
        h = _act(up, ACTIVATION)
    h = tl.where(m, h, 0.0)
    tl.store(h_ptr + toks64[:, None] * F + rows[None, :], h.to(h_ptr.dtype.element_ty),
             mask=tok_ok[:, None] & row_ok[None, :])


@triton.jit
def _active_chunk(h_row, w_ptr, active, n_act, c, cols, col_ok, D,
                  EXPERT_SIZE: tl.constexpr, EPC: tl.constexpr, BLOCK_F: tl.constexpr):
    """h [BLOCK_F] and W_down_t rows [BLOCK_F, BLOCK_D] of the active experts c·EPC …
    c·EPC+EPC−1 (active: [chunks, EPC] expert ids, active ones first)."""
    pick = (tl.arange(0, active.shape[0]) == c)[:, None]
    ex = tl.sum(tl.where(pick, active, 0), axis=0)                          # [EPC] expert ids
    rows = tl.reshape(ex[:, None] * EXPERT_SIZE + tl.arange(0, EXPERT_SIZE)[None, :],
                      (BLOCK_F,))                                           # [BLOCK_F]
    on = c * EPC + tl.arange(0, BLOCK_F) // EXPERT_SIZE < n_act             # [BLOCK_F]
    hv = tl.load(h_row + rows, mask=on, other=0.0)
    w = tl.load(w_ptr + rows[:, None] * D + cols[None, :], mask=on[:, None] & col_ok[None, :],
                other=0.0)
    return hv, w


@triton.jit
def sparse_ffn_down_kernel(h_ptr, mask_ptr, w_down_t_ptr, b_down_ptr,
                           T, D, F,
                           y_ptr,
                           EXPERT_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
                           COMPACT: tl.constexpr):
    """y[t, c] for a [BLOCK_T, BLOCK_D] block of (tokens, columns); see the module docstring."""
    pid_d = tl.program_id(0)
    pid_t = tl.program_id(1)
    n_experts = F // EXPERT_SIZE
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)                          # [BLOCK_D]
    col_ok = cols < D
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)                          # [BLOCK_T]
    tok_ok = toks < T
    toks64 = toks.to(tl.int64)

    if BLOCK_T == 1 and COMPACT > 0:
        # Active experts only. The token's mask is read COMPACT experts at a time and sorted
        # (keys: expert id if active, else n_experts), so the piece's active experts come
        # first; chunk c is active experts c·EPC … c·EPC+EPC−1 (EPC = BLOCK_F / EXPERT_SIZE),
        # BLOCK_F rows that are all useful. The trip count is cdiv(active, EPC): it falls
        # with sparsity. Rule: the default 8-warp config stays at <= 128 registers per thread
        # (two programs per SM), so only one chunk is prefetched and the register
        # accumulator is allocated after the sort (register counts: results/gpu.md).
        EPC: tl.constexpr = BLOCK_F // EXPERT_SIZE
        tl.static_assert(EPC * EXPERT_SIZE == BLOCK_F, "COMPACT needs BLOCK_F % EXPERT_SIZE == 0")
        y = tl.zeros((BLOCK_D,), dtype=tl.float32)
        mask_row = mask_ptr + toks64 * n_experts
        h_row = h_ptr + toks64 * F
        for e0 in range(0, n_experts, COMPACT):
            e = e0 + tl.arange(0, COMPACT)                                  # [COMPACT]
            m = tl.load(mask_row + e, mask=(e < n_experts) & tok_ok, other=0) != 0
            n_act = tl.sum(m.to(tl.int32), axis=0)
            active = tl.reshape(tl.sort(tl.where(m, e, n_experts)), (COMPACT // EPC, EPC))
            acc = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)            # after the sort
            hv, w = _active_chunk(h_row, w_down_t_ptr, active, n_act, 0, cols, col_ok, D,
                                  EXPERT_SIZE, EPC, BLOCK_F)
            for c in range(1, tl.cdiv(n_act, EPC) + 1):
                hv1, w1 = _active_chunk(h_row, w_down_t_ptr, active, n_act, c, cols, col_ok, D,
                                        EXPERT_SIZE, EPC, BLOCK_F)
                acc += hv.to(tl.float32)[:, None] * w.to(tl.float32)        # chunk c − 1
                hv, w = hv1, w1
            y += tl.sum(acc, axis=0)
        y = y[None, :]                                                      # [1, BLOCK_D]
    elif BLOCK_T == 1:
        # Software-pipelined two chunks deep: while chunk i is multiplied, the rows of
        # chunks i+1 and i+2 (active experts only) are in flight and the mask of chunk i+3
        # is loaded, so a weight load never waits for its mask. Rule: keep the bytes in
        # flight per SM high, the loop's bound (results/gpu.md run 1); trips past F load
        # nothing.
        acc = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
        mask_row = mask_ptr + toks64 * n_experts
        h_row = h_ptr + toks64 * F
        rows = tl.arange(0, BLOCK_F)
        on = tl.load(mask_row + rows // EXPERT_SIZE, mask=(rows < F) & tok_ok, other=0) != 0
        hv = tl.load(h_row + rows, mask=on, other=0.0)
        w = tl.load(w_down_t_ptr + rows[:, None] * D + cols[None, :],
                    mask=on[:, None] & col_ok[None, :], other=0.0)
        rows = BLOCK_F + tl.arange(0, BLOCK_F)
        on = tl.load(mask_row + rows // EXPERT_SIZE, mask=(rows < F) & tok_ok, other=0) != 0
        hv1 = tl.load(h_row + rows, mask=on, other=0.0)
        w1 = tl.load(w_down_t_ptr + rows[:, None] * D + cols[None, :],
                     mask=on[:, None] & col_ok[None, :], other=0.0)
        rows = 2 * BLOCK_F + tl.arange(0, BLOCK_F)
        on = tl.load(mask_row + rows // EXPERT_SIZE, mask=(rows < F) & tok_ok, other=0) != 0
        for f0 in range(2 * BLOCK_F, F + 2 * BLOCK_F, BLOCK_F):
            rows = f0 + tl.arange(0, BLOCK_F)                               # chunk i+2
            rows3 = rows + BLOCK_F
            on3 = tl.load(mask_row + rows3 // EXPERT_SIZE, mask=(rows3 < F) & tok_ok,
                          other=0) != 0
            hv2 = tl.load(h_row + rows, mask=on, other=0.0)
            w2 = tl.load(w_down_t_ptr + rows[:, None] * D + cols[None, :],
                         mask=on[:, None] & col_ok[None, :], other=0.0)
            acc += hv.to(tl.float32)[:, None] * w.to(tl.float32)            # chunk i
            hv, w, hv1, w1, on = hv1, w1, hv2, w2, on3
        y = tl.sum(acc, axis=0)[None, :]                                    # [1, BLOCK_D]
    else:
        y = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            rows = f0 + tl.arange(0, BLOCK_F)
            m = tl.load(mask_ptr + toks64[:, None] * n_experts + (rows // EXPERT_SIZE)[None, :],
                        mask=tok_ok[:, None] & (rows < F)[None, :], other=0) != 0
            row_on = tl.max(m.to(tl.int32), axis=0) > 0                     # [BLOCK_F] union
            hv = tl.load(h_ptr + toks64[:, None] * F + rows[None, :], mask=m, other=0.0)
            w = tl.load(w_down_t_ptr + rows[:, None] * D + cols[None, :],
                        mask=row_on[:, None] & col_ok[None, :], other=0.0)
            y = tl.dot(hv, w, y, input_precision="ieee")

    if HAS_BIAS:
        y += tl.load(b_down_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + toks64[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=tok_ok[:, None] & col_ok[None, :])


@triton.jit
def act_mul_mask_kernel(gate_ptr, up_ptr, mask_ptr,
                        F, LD,
                        h_ptr,
                        EXPERT_SIZE: tl.constexpr, ACTIVATION: tl.constexpr,
                        GATED: tl.constexpr, BLOCK: tl.constexpr):
    """h[t, f] = act(gate[t, f])·up[t, f]·mask[t, f // s] (PyTorch prefill path only).

    gate and up are fp32 [T, F] (unrounded GEMM outputs) with row stride LD (F, or 2F for
    the column halves of one [T, 2F] GEMM output); h is [T, F] contiguous in the model dtype.
    Grid: (T, cdiv(F, BLOCK)).
    """
    t = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = f < F
    on = tl.load(mask_ptr + t * (F // EXPERT_SIZE) + f // EXPERT_SIZE, mask=ok, other=0) != 0
    up = tl.load(up_ptr + t * LD + f, mask=ok, other=0.0).to(tl.float32)  # 16-byte vectors
    if GATED:
        gate = tl.load(gate_ptr + t * LD + f, mask=ok, other=0.0).to(tl.float32)
        h = _act(gate, ACTIVATION) * up
    else:
        h = _act(up, ACTIVATION)
    tl.store(h_ptr + t * F + f, tl.where(on, h, 0.0).to(h_ptr.dtype.element_ty), mask=ok)


KERNELS = {"up": sparse_ffn_up_kernel, "down": sparse_ffn_down_kernel}


def ast_source(op: str, dtype: torch.dtype, cfg: LaunchConfig, *, expert_size: int,
               activation: str = "silu", gated: bool = True, has_bias: bool = True,
               aligned: bool = True, mask_pointer: str = "*u8"):
    """`triton.compiler.ASTSource` of one kernel specialisation, for ahead-of-time compiles.

    aligned=True promises 16-byte aligned pointers and D, F multiples of 16 (lets the
    compiler emit 16-byte vector loads, as the JIT does by specialisation). mask_pointer may
    be any integer pointer type ("*u8" for a bool tensor, "*i32" for TensorRT's INT32 mask):
    the kernels test `mask != 0`.
    Compile with `triton.compile(src, target=GPUTarget("cuda", 90, 32),
    options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})`.
    """
    from triton.compiler import ASTSource

    kernel = KERNELS[op]
    names = kernel.arg_names
    consts = dict(cfg.constexprs(), EXPERT_SIZE=expert_size, HAS_BIAS=int(has_bias))
    if op == "up":
        consts.update(ACTIVATION=ACTIVATION_CODES[activation], GATED=int(gated))
    pointer = {n: mask_pointer if n == "mask_ptr" else f"*{SHORT_NAMES[dtype]}" for n in names}
    sig = {n: pointer[n] if n.endswith("_ptr") else "i32" if n in ("T", "D", "F") else "constexpr"
           for n in names}
    assert set(consts) == {n for n in names if sig[n] == "constexpr"}, (consts, names)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if aligned and (n.endswith("_ptr") or n in ("D", "F"))}
    return ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in consts.items()},
                     attrs=attrs)

"""CPU kernels of lte.SparseFFN that read only the active experts' weights.

Semantics: plugins/spec.py. Inputs are validated by plugins/ops.py before they get here.
Which blocks to compute with which kernels, or the dense computation, is chosen per call by
plugins/cpu_plan.py with numbers measured on this host (plugins/cpu_tuning.py); this module
does the arithmetic of the plan it is given.

Plan of one call, for x [n, d] and mask [n, E] (leading dims flattened):

    union   = mask.any(0)                        experts any token selected      [E]
    blocks  = runs of adjacent experts of the union (cpu_plan.Plan); block r covers rows
              [b_r, b_r + runs_r) of W_gate, W_up and W_down_t: a contiguous slice, never
              copied (gathering rows with index_select copies more bytes than the FFN reads)
    gate, up= one GEMM call per block (W_block @ xᵀ) into a packed buffer [2, A, n]
              (A = active rows, block after block; transposed so every block's output is
              contiguous whatever n is), with the plan's kernel:
                pair    one torch.bmm over the block of W_gate and W_up when they lie in one
                        [2, F, d] storage (a folded LTEFFN pairs them)
                halves  one torch.bmm per matrix over the block's two halves
                mm      one torch.mm per matrix
    h       = act(gate + b_gate) ⊙ (up + b_up) in fp32, rounded to x's dtype; for n > 1 (or a
              plan that covers skipped experts) each token's h is zeroed on the experts it did
              not select (the reference's masking, exactly)
    y       = n = 1 and plan.bag (fp32 only): embedding_bag(active rows, W_down_t,
                     per_sample_weights=h, mode="sum") = Σ_f h_f · W_down_t[f], one call
              else: one GEMM per block, accumulated into an fp32 y
    dense   = (no plan) F.linear per matrix, h masked per token, F.linear over W_down_t

Numerics (plugins/spec.py, the rule every implementation follows): gate, up and y accumulate
in fp32 and are never rounded; h is rounded to the model dtype once, y once at the end. CPU
GEMMs have no fp16/bf16-in, fp32-out form, so in fp16/bf16 each GEMM reads an fp32 copy of the
block of weights it needs (`.float()`, a no-op in fp32): the active blocks only, which costs
the copy but keeps the rule (results/cpu_bench.md).

Rules: the per-call work besides the GEMMs is a handful of ops (Python-level calls cost
microseconds); outputs of the block GEMMs are fresh tensors joined by one cat (bmm with out=
a slice of a buffer was slower); x enters the GEMMs as x₂ᵀ of a [n, d] row block (a [d, 1]
tensor of strides (1, 1) falls off MKL's batched path). Only torch's own intra-op threads
are used. The measurements behind these rules are in results/cpu_bench.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lte_convert.plugins import cpu_plan, cpu_tuning
from lte_convert.plugins.reference import ACT_FNS
from lte_convert.plugins.spec import gate_up_pair

_OFFSET0 = torch.zeros(1, dtype=torch.long)


def _activate(gate, up, b_gate, b_up, rows, activation):
    """fp32 act(gate + b_gate) ⊙ (up + b_up), or act(up + b_up) when gate is None; [A, n]."""
    up = up.float()
    if b_up is not None:
        up = up + b_up.index_select(0, rows).float()[:, None]
    if gate is None:
        return ACT_FNS[activation](up)
    gate = gate.float()
    if b_gate is not None:
        gate = gate + b_gate.index_select(0, rows).float()[:, None]
    return ACT_FNS[activation](gate).mul_(up)


def _stacks(w_gate, w_up, pair, up):
    """The up-projection weights as [k, F, d] views, each computed with one call per block
    (_gemms): the [2, F, d] pair for the plan's `pair` kernel, else one [1, F, d] view per
    matrix."""
    if up == "pair":
        return [pair]
    return [w[None] for w in (w_gate, w_up) if w is not None]


def _gemms(w, starts, runs, xt, halves):
    """w[:, b:b+r] @ xt for every block -> [k, A, n], one call per block.

    A [2, F, d] pair is one torch.bmm per block; with `halves` a single matrix's block is cut
    into two halves so it too goes through the batched GEMM (a block of odd length, and any
    block without `halves`, is one torch.mm)."""
    k, _, d = w.shape
    xt = xt.float()
    if k == 2:
        xt2 = xt.expand(2, -1, -1)
        outs = [torch.bmm(w[:, b:b + r].float(), xt2) for b, r in zip(starts, runs)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    w0, n, xt2 = w[0], xt.shape[1], xt.expand(2, -1, -1)
    outs = [torch.bmm(w0[b:b + r].view(2, -1, d).float(), xt2).view(r, n)
            if halves and r % 2 == 0 else torch.mm(w0[b:b + r].float(), xt)
            for b, r in zip(starts, runs)]
    return (outs[0] if len(outs) == 1 else torch.cat(outs))[None]


def _up_packed(x2, mask2, stacks, gated, b_gate, b_up, s, activation, plan):
    """h packed [A, n] in x's dtype for the plan's blocks (cpu_plan.Plan); stacks: _stacks()."""
    n = x2.shape[0]
    starts, runs, rows, experts, merged = plan[:5]
    xt = x2.t()                                                  # [d, n]
    outs = [_gemms(w, starts, runs, xt, plan.up == "halves") for w in stacks]
    buf = outs[0] if len(outs) == 1 else torch.cat(outs)         # [2|1, A, n]: gate^T, up^T
    h = _activate(buf[0] if gated else None, buf[-1], b_gate, b_up, rows, activation)
    if n > 1 or merged:                                          # zero what a token skipped
        h.mul_(mask2.index_select(1, experts).t().repeat_interleave(s, dim=0))   # [A, n]
    return h.to(x2.dtype)


def _down_packed(h, starts, runs, rows, w_down_t, b_down, bag=True):
    """y [n, d] in h's dtype = Σ over the packed rows f of h[f] · W_down_t[rows[f]] (+ b_down),
    accumulated in fp32: one embedding_bag for one fp32 token with `bag`, else one GEMM per
    block into an fp32 y."""
    if h.shape[1] == 1 and bag and h.dtype == torch.float32:
        y = F.embedding_bag(rows, w_down_t, _OFFSET0, per_sample_weights=h.view(-1),
                            mode="sum")
    elif len(runs) == 1:
        y = torch.mm(h.float().t(), w_down_t[starts[0]:starts[0] + runs[0]].float())
    else:
        y = torch.zeros(h.shape[1], w_down_t.shape[1])
        for b, r, h_run in zip(starts, runs, h.float().split(runs)):
            y.addmm_(h_run.t(), w_down_t[b:b + r].float())
    if b_down is not None:
        y += b_down.float()
    return y.to(h.dtype)


def _f32(t):
    return None if t is None else t.float()


def _dense_h(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation):
    """h [n, F] in x's dtype with one fp32 GEMM per matrix, masked per token."""
    xf = x2.float()
    up = F.linear(xf, w_up.float(), _f32(b_up))
    if w_gate is None:
        h = ACT_FNS[activation](up)
    else:
        h = ACT_FNS[activation](F.linear(xf, w_gate.float(), _f32(b_gate))).mul_(up)
    h = h.view(h.shape[0], -1, s).mul_(mask2[:, :, None]).view(h.shape[0], -1)
    return h.to(x2.dtype)


def _union(mask2):
    """Experts any token selected [E]; the token's own mask for one token."""
    return mask2[0] if mask2.shape[0] == 1 else mask2.any(0)


def _bias_only(n, d, b_down, like):
    """y when no expert is active anywhere: b_down (or zeros) for every token."""
    y = like.new_zeros(n, d)
    return y + b_down if b_down is not None else y


def _prepare(x, mask, w_gate, w_up, s):
    """x [n, d] and mask [n, E] (leading dims flattened), the up weights' stacks (_stacks)
    and the plan (cpu_plan.choose, None for dense) of one call of the op or its up half."""
    F_, d = w_up.shape
    x2, mask2 = x.reshape(-1, d), mask.reshape(-1, F_ // s)
    pair = gate_up_pair(w_gate, w_up)
    tuning = cpu_tuning.get(d, F_, w_up.dtype)
    plan = cpu_plan.choose(_union(mask2), x2.shape[0], F_, d, s, w_gate is not None,
                           pair is not None, w_up.dtype == torch.float32, tuning)
    stacks = None if plan is None else _stacks(w_gate, w_up, pair, plan.up)
    return x2, mask2, stacks, plan


def sparse_ffn_up(x, mask, w_gate, w_up, b_gate, b_up, expert_size, activation):
    """Masked h [..., F] (zeros outside each token's experts); reads the union's rows only."""
    F_, s, gated = w_up.shape[0], expert_size, w_gate is not None
    x2, mask2, stacks, plan = _prepare(x, mask, w_gate, w_up, s)
    if plan is None:
        h = _dense_h(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation)
    else:
        h = x2.new_zeros(x2.shape[0], F_)
        if plan[1]:
            rows = plan[2]
            h[:, rows] = _up_packed(x2, mask2, stacks, gated, b_gate, b_up, s, activation,
                                    plan).t()
    return h.view(*x.shape[:-1], F_)


def sparse_ffn_down(h, mask, w_down_t, b_down, expert_size):
    """y [..., d] from h [..., F]: each token's h masked by its experts, then only the union's
    rows of W_down_t are read."""
    F_, d, s = h.shape[-1], w_down_t.shape[1], expert_size
    h2, mask2 = h.reshape(-1, F_), mask.reshape(-1, F_ // s)
    union = _union(mask2)
    if not union.any():
        return _bias_only(h2.shape[0], d, b_down, h2).view(*h.shape[:-1], d)
    starts, runs, experts, _ = cpu_plan.blocks(union, s)[0]
    rows = cpu_plan.rows_of(experts, s)
    keep = mask2.index_select(1, experts).repeat_interleave(s, dim=1)       # [n, A]
    hp = (h2[:, rows] * keep).t()                                             # [A, n]
    return _down_packed(hp, starts, runs, rows, w_down_t, b_down).view(*h.shape[:-1], d)


def sparse_ffn(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, expert_size, activation):
    """y [..., d]: the whole FFN, reading only the weights of the union's active experts."""
    d, s, gated = x.shape[-1], expert_size, w_gate is not None
    x2, mask2, stacks, plan = _prepare(x, mask, w_gate, w_up, s)
    if plan is None:
        h = _dense_h(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation)
        return F.linear(h.float(), w_down_t.float().t(), _f32(b_down)).to(x.dtype).view(x.shape)
    starts, runs, rows = plan[:3]
    if not runs:                                              # no expert active anywhere
        return _bias_only(x2.shape[0], d, b_down, x2).view(x.shape)
    h = _up_packed(x2, mask2, stacks, gated, b_gate, b_up, s, activation, plan)
    return _down_packed(h, starts, runs, rows, w_down_t, b_down, plan.bag).view(x.shape)

"""CPU kernels of lte.SparseFFN that read only the active experts' weights.

Semantics: plugins/spec.py. Inputs are validated by plugins/ops.py before they get here.

Why it looks like this (measured on a 2-core AMD EPYC, torch 2.13 with MKL; see
results/cpu_bench.md):
- Gathering the active experts' rows (`index_select`) copies more bytes than the FFN reads,
  and is slower than dense. Instead, the active experts of the token batch (the union of the
  tokens' masks) are merged into *runs* of adjacent experts; each run is one contiguous block
  of rows in W_gate, W_up and W_down_t, used as a view, without a copy.
- Up projection: one GEMM per run and matrix, written straight into a packed buffer
  ("packed" = only the active rows, run after run). It is kept transposed, h^T [A, n], so
  every run's output is a contiguous slice for any token count n.
- Down projection: `embedding_bag(mode="sum", per_sample_weights=h)` over the active rows of
  W_down_t computes y = Σ_f h_f · W_down_t[f] in one call, whatever the number of runs: no
  per-run call overhead, and it streams rows faster than MKL's GEMV does on this machine.
  One bag per token (per half of the rows for a single token, so both cores work), fp32
  accumulation inside.
- Per-token masking: a token's h is zeroed on the experts of the union that it did not select,
  which is exactly the reference's masking.
- When the union covers most experts (large batches, prefill), the per-run calls buy nothing:
  one dense GEMM per matrix, then the per-token mask, then one dense GEMM.
- fp32 and bf16 (and fp16) weights. The activation is computed in fp32 and h is rounded to the
  model dtype before the down projection, as the spec says.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from plugins.reference import ACT_FNS

# Above this fraction of active experts in the union, one dense GEMM per matrix is used.
DENSE_UNION = 0.9
_ZERO = torch.zeros(1, dtype=torch.int8)


def expert_runs(active: torch.Tensor) -> tuple[list[int], list[int]]:
    """Bool [E] -> (starts, ends): the maximal runs [start, end) of adjacent active experts."""
    edges = torch.diff(active.to(torch.int8), prepend=_ZERO, append=_ZERO).nonzero().flatten()
    edges = edges.tolist()
    return edges[0::2], edges[1::2]


def _active_rows(experts: torch.Tensor, s: int) -> torch.Tensor:
    """Active expert ids [Ea] -> their weight rows [Ea·s], in order."""
    return (experts[:, None] * s + torch.arange(s)).flatten()


def _up_packed(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation, union):
    """(h^T [A, n] in x's dtype, rows [A]) for the union's active rows, packed run after run,
    each token's h zeroed on the union's experts that the token did not select.

    x2 [n, d], mask2 [n, E], union [E]. A = s · number of active experts.
    """
    n = x2.shape[0]
    starts, ends = expert_runs(union)
    experts = union.nonzero().flatten()
    rows = _active_rows(experts, s)
    gated = w_gate is not None
    buf = x2.new_empty(2 if gated else 1, rows.numel(), n)      # gate^T, up^T: [2|1, A, n]
    xt = x2.t()                                                  # [d, n]
    o = 0
    for b, e in zip(starts, ends):
        r0, r1 = b * s, e * s
        if gated:
            torch.mm(w_gate[r0:r1], xt, out=buf[0, o:o + r1 - r0])
        torch.mm(w_up[r0:r1], xt, out=buf[-1, o:o + r1 - r0])
        o += r1 - r0
    h = _activate(buf, b_gate, b_up, rows, activation, gated)    # [A, n] fp32
    if n > 1:
        keep = mask2.index_select(1, experts).t().repeat_interleave(s, dim=0)  # [A, n]
        h.mul_(keep)
    return h.to(x2.dtype), rows


def _activate(buf, b_gate, b_up, rows, activation, gated):
    """fp32 act(gate + b_gate) * (up + b_up), or act(up + b_up), from the packed buffer."""
    up = buf[-1].float()
    if b_up is not None:
        up += b_up.index_select(0, rows).float()[:, None]
    if not gated:
        return ACT_FNS[activation](up)
    gate = buf[0].float()
    if b_gate is not None:
        gate += b_gate.index_select(0, rows).float()[:, None]
    return ACT_FNS[activation](gate).mul_(up)


def _down_packed(ht, rows, w_down_t, b_down):
    """y [n, d] = Σ over the packed rows f of h^T[f] · W_down_t[rows[f]] (+ b_down)."""
    A, n = ht.shape
    if n == 1 and A >= 64:                                     # two bags: both cores stream
        y = F.embedding_bag(rows, w_down_t, torch.tensor([0, A // 2]),
                            per_sample_weights=ht[:, 0], mode="sum").sum(0, keepdim=True)
    else:
        y = F.embedding_bag(rows.repeat(n), w_down_t, torch.arange(n) * A,
                            per_sample_weights=ht.t().reshape(-1), mode="sum")
    if b_down is not None:
        y += b_down
    return y


def _dense_h(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation):
    """h [n, F] in x's dtype with one GEMM per matrix, masked per token (most experts on)."""
    up = F.linear(x2, w_up, b_up).float()
    if w_gate is None:
        h = ACT_FNS[activation](up)
    else:
        h = ACT_FNS[activation](F.linear(x2, w_gate, b_gate).float()).mul_(up)
    h = h.view(h.shape[0], -1, s).mul_(mask2[:, :, None]).view(h.shape[0], -1)
    return h.to(x2.dtype)


def _bias_only(n, d, b_down, like):
    """y when no expert is active anywhere: b_down (or zeros) for every token."""
    y = like.new_zeros(n, d)
    return y + b_down if b_down is not None else y


def sparse_ffn_up(x, mask, w_gate, w_up, b_gate, b_up, expert_size, activation):
    """Masked h [..., F] (zeros outside each token's experts); reads the union's rows only."""
    d, F_, s = x.shape[-1], w_up.shape[0], expert_size
    x2, mask2 = x.reshape(-1, d), mask.reshape(-1, F_ // s)
    union = mask2.any(0)
    n_active = int(union.sum())
    if n_active > DENSE_UNION * union.numel():
        h = _dense_h(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation)
    else:
        h = x2.new_zeros(x2.shape[0], F_)
        if n_active:
            ht, rows = _up_packed(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation, union)
            h[:, rows] = ht.t()
    return h.view(*x.shape[:-1], F_)


def sparse_ffn_down(h, mask, w_down_t, b_down, expert_size):
    """y [..., d] from h [..., F]: each token's h masked by its experts, then only the union's
    rows of W_down_t are read."""
    F_, d, s = h.shape[-1], w_down_t.shape[1], expert_size
    h2, mask2 = h.reshape(-1, F_), mask.reshape(-1, F_ // s)
    union = mask2.any(0)
    if not union.any():
        return _bias_only(h2.shape[0], d, b_down, h2).view(*h.shape[:-1], d)
    experts = union.nonzero().flatten()
    rows = _active_rows(experts, s)
    keep = mask2.index_select(1, experts).repeat_interleave(s, dim=1)       # [n, A]
    ht = (h2.index_select(1, rows) * keep).t()                                # [A, n]
    return _down_packed(ht, rows, w_down_t, b_down).view(*h.shape[:-1], d)


def sparse_ffn(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, expert_size, activation):
    """y [..., d]: the whole FFN, reading only the weights of the union's active experts."""
    d, F_, s = x.shape[-1], w_up.shape[0], expert_size
    x2, mask2 = x.reshape(-1, d), mask.reshape(-1, F_ // s)
    union = mask2.any(0)
    n_active = int(union.sum())
    if n_active > DENSE_UNION * union.numel():
        h = _dense_h(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation)
        return F.linear(h, w_down_t.t(), b_down).view(x.shape)
    if not n_active:
        return _bias_only(x2.shape[0], d, b_down, x2).view(x.shape)
    ht, rows = _up_packed(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation, union)
    return _down_packed(ht, rows, w_down_t, b_down).view(x.shape)

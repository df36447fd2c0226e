"""CPU kernels of lte.SparseFFN that read only the active experts' weights.

Semantics: plugins/spec.py. Inputs are validated by plugins/ops.py before they get here.

Plan of one call, for x [n, d] and mask [n, E] (leading dims flattened):

    union   = mask.any(0)                        experts any token selected      [E]
    runs    = maximal runs of adjacent experts of the union; run r covers rows
              [b_r·s, e_r·s) of W_gate, W_up and W_down_t: a contiguous block, used as a
              view (torch.split), never copied
    gate, up= one GEMV/GEMM per run and matrix, written into a packed buffer [A, n]
              (A = active rows, run after run; kept transposed so every run's output is a
              contiguous slice, whatever n is)
    h       = act(gate + b_gate) ⊙ (up + b_up) in fp32, rounded to x's dtype; for n > 1 each
              token's h is zeroed on the union's experts it did not select (the reference's
              masking, exactly)
    y       = n = 1: embedding_bag(active rows, W_down_t, per_sample_weights=h, mode="sum")
                     = Σ_f h_f · W_down_t[f], one call whatever the number of runs
              n > 1: one GEMM per run, accumulated into y

Why (measured on the 2-core AMD EPYC development machine, torch 2.13 with MKL; numbers in
results/cpu_bench.md): gathering the active rows with index_select copies more bytes than the
FFN reads and is slower than dense (FACTS.md); MKL's GEMV streams ≈25 GB/s there while
embedding_bag streams ≈37 GB/s, so the down projection of a single token goes through
embedding_bag; a Python-level call costs ≈1–2 µs, so views are made with one split call per
matrix rather than one slice per run. When the union covers most experts of a batch
(prefill), the runs buy nothing: one dense GEMM per matrix, the per-token mask, one GEMM.

Threads: only torch's own intra-op threads. (Splitting one token's rows into two bags so both
cores work was slower on a 2-core machine shared with other jobs: a 2-thread parallel region
waits for a descheduled thread, often for milliseconds.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from plugins.reference import ACT_FNS

# Above this fraction of active experts in a multi-token batch's union, one dense GEMM per
# matrix is used instead of one per run.
DENSE_UNION = 0.9
_OFFSET0 = torch.zeros(1, dtype=torch.long)


_ARANGE: dict[int, torch.Tensor] = {}


def _plan(union: torch.Tensor, s: int):
    """union bool [E] -> (sizes, runs, rows).

    sizes: row counts alternating gap, run, gap, …, run, gap (splits an [F, d] weight into
           blocks; the runs of adjacent active experts are at odd positions);
    runs:  the run lengths in rows (sizes[1::2]);
    rows:  the active rows' indices [A], in order (int64).
    """
    experts = union.nonzero().view(-1)                           # [Ea]
    if s not in _ARANGE:
        _ARANGE[s] = torch.arange(s)
    rows = torch.add(_ARANGE[s], experts[:, None], alpha=s).view(-1)
    sizes, end = [], 0                                           # end: last run's end expert
    for e in experts.tolist():
        if sizes and e == end:                                   # extends the current run
            sizes[-1] += s
        else:
            sizes += [(e - end) * s, s]
        end = e + 1
    sizes.append((union.shape[0] - end) * s)
    return sizes, sizes[1::2], rows


def _activate(gate, up, b_gate, b_up, rows, activation):
    """fp32 act(gate + b_gate) ⊙ (up + b_up), or act(up + b_up) when gate is None; [A, n]."""
    up = up.float()
    if b_up is not None:
        up = up + b_up.index_select(0, rows).float().view(-1, *([1] * (up.dim() - 1)))
    if gate is None:
        return ACT_FNS[activation](up)
    gate = gate.float()
    if b_gate is not None:
        gate = gate + b_gate.index_select(0, rows).float().view(-1, *([1] * (gate.dim() - 1)))
    return ACT_FNS[activation](gate).mul_(up)


def _up_packed(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation, union):
    """(h packed [A] for one token or [A, n], in x's dtype; sizes; runs; active rows)."""
    n = x2.shape[0]
    sizes, runs, rows = _plan(union, s)
    A = rows.shape[0]
    gated = w_gate is not None
    buf = x2.new_empty((2 if gated else 1, A) + ((n,) if n > 1 else ()))
    xin = x2[0] if n == 1 else x2.t()                           # [d] or [d, n]
    matmul = torch.mv if n == 1 else torch.mm
    for w, out in ((w_gate, buf[0]), (w_up, buf[-1])) if gated else ((w_up, buf[0]),):
        for w_run, o in zip(w.split(sizes)[1::2], out.split(runs)):
            matmul(w_run, xin, out=o)
    h = _activate(buf[0] if gated else None, buf[-1], b_gate, b_up, rows, activation)
    if n > 1:
        keep = mask2[:, union].t().repeat_interleave(s, dim=0)      # [A, n]
        h.mul_(keep)
    return h.to(x2.dtype), sizes, runs, rows


def _down_packed(h, sizes, runs, rows, w_down_t, b_down):
    """y [n, d] = Σ over the packed rows f of h[f] · W_down_t[rows[f]] (+ b_down)."""
    if h.dim() == 1:
        y = F.embedding_bag(rows, w_down_t, _OFFSET0, per_sample_weights=h, mode="sum")
    else:
        y = h.new_zeros(h.shape[1], w_down_t.shape[1])
        for w_run, h_run in zip(w_down_t.split(sizes)[1::2], h.split(runs)):
            y.addmm_(h_run.t(), w_run)
    if b_down is not None:
        y += b_down
    return y


def _dense_h(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation):
    """h [n, F] in x's dtype with one GEMM per matrix, masked per token."""
    up = F.linear(x2, w_up, b_up).float()
    if w_gate is None:
        h = ACT_FNS[activation](up)
    else:
        h = ACT_FNS[activation](F.linear(x2, w_gate, b_gate).float()).mul_(up)
    h = h.view(h.shape[0], -1, s).mul_(mask2[:, :, None]).view(h.shape[0], -1)
    return h.to(x2.dtype)


def _union(mask2):
    """Experts any token selected [E]; the token's own mask for one token."""
    return mask2[0] if mask2.shape[0] == 1 else mask2.any(0)


def _use_dense(mask2, union):
    return mask2.shape[0] > 1 and int(union.sum()) > DENSE_UNION * union.numel()


def _bias_only(n, d, b_down, like):
    """y when no expert is active anywhere: b_down (or zeros) for every token."""
    y = like.new_zeros(n, d)
    return y + b_down if b_down is not None else y


def sparse_ffn_up(x, mask, w_gate, w_up, b_gate, b_up, expert_size, activation):
    """Masked h [..., F] (zeros outside each token's experts); reads the union's rows only."""
    d, F_, s = x.shape[-1], w_up.shape[0], expert_size
    x2, mask2 = x.reshape(-1, d), mask.reshape(-1, F_ // s)
    union = _union(mask2)
    if _use_dense(mask2, union):
        h = _dense_h(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation)
    else:
        h = x2.new_zeros(x2.shape[0], F_)
        if union.any():
            hp, _, _, rows = _up_packed(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation,
                                        union)
            h[:, rows] = hp.view(len(rows), -1).t()
    return h.view(*x.shape[:-1], F_)


def sparse_ffn_down(h, mask, w_down_t, b_down, expert_size):
    """y [..., d] from h [..., F]: each token's h masked by its experts, then only the union's
    rows of W_down_t are read."""
    F_, d, s = h.shape[-1], w_down_t.shape[1], expert_size
    h2, mask2 = h.reshape(-1, F_), mask.reshape(-1, F_ // s)
    union = _union(mask2)
    if not union.any():
        return _bias_only(h2.shape[0], d, b_down, h2).view(*h.shape[:-1], d)
    sizes, runs, rows = _plan(union, s)
    keep = mask2[:, union].repeat_interleave(s, dim=1)                       # [n, A]
    hp = (h2[:, rows] * keep).t()                                             # [A, n]
    if hp.shape[1] == 1:
        hp = hp[:, 0]
    return _down_packed(hp, sizes, runs, rows, w_down_t, b_down).view(*h.shape[:-1], d)


def sparse_ffn(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, expert_size, activation):
    """y [..., d]: the whole FFN, reading only the weights of the union's active experts."""
    d, F_, s = x.shape[-1], w_up.shape[0], expert_size
    x2, mask2 = x.reshape(-1, d), mask.reshape(-1, F_ // s)
    union = _union(mask2)
    if _use_dense(mask2, union):
        h = _dense_h(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation)
        return F.linear(h, w_down_t.t(), b_down).view(x.shape)
    h, sizes, runs, rows = _up_packed(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation,
                                      union)
    if not runs:                                              # no expert active anywhere
        return _bias_only(x2.shape[0], d, b_down, x2).view(x.shape)
    return _down_packed(h, sizes, runs, rows, w_down_t, b_down).view(x.shape)

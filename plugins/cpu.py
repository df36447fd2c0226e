"""CPU kernels of lte.SparseFFN that read only the active experts' weights.

Semantics: plugins/spec.py. Inputs are validated by plugins/ops.py before they get here.

Plan of one call, for x [n, d] and mask [n, E] (leading dims flattened):

    union   = mask.any(0)                        experts any token selected      [E]
    runs    = maximal runs of adjacent experts of the union; run r covers rows
              [b_r·s, e_r·s) of W_gate, W_up and W_down_t: a contiguous block, used as a
              view (torch.split), never copied
    gate, up= one GEMM per run and matrix (W_run @ xᵀ), written into a packed buffer [A, n]
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
embedding_bag (fp32 and bf16); torch.mv in bf16 is half as fast as torch.mm, so one token
is a [d, 1] GEMM too; a Python-level call costs ≈1–2 µs, so the per-call planning is a
handful of ops (one nonzero; runs grouped in Python). When the union covers most experts of a batch
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
# Cost model for merging runs across short gaps (measured on the development machine): a
# GEMM call on a run costs about CALL_US µs besides its bytes (bf16/fp16 matmuls of a few
# dozen rows go through a oneDNN primitive that costs ≈12 µs per call; fp32 MKL ≈2 µs), and
# weights stream at about STREAM_GBPS. Computing a skipped expert (then masking it to 0) is
# cheaper than two extra calls when its rows are small: bf16 at SmolLM2's shape merges gaps
# of up to 3 experts; fp32, or any dtype at LLaMA2-7B's shape, merges none.
CALL_US = {torch.float32: 2.0}
CALL_US_DEFAULT = 12.0
STREAM_GBPS = 16.0
_OFFSET0 = torch.zeros(1, dtype=torch.long)
_ARANGE: dict[int, torch.Tensor] = {}


def max_gap(w_up, gated: bool, s: int, tokens: int) -> int:
    """Longest run of skipped experts (in experts) worth computing to save the calls."""
    matrices = 3 if gated else 2
    gap_us = matrices * s * w_up.shape[1] * w_up.element_size() / (STREAM_GBPS * 1e3)
    calls = (2 if gated else 1) + (tokens > 1)           # up GEMMs (+ the down GEMM, n > 1)
    return int(calls * CALL_US.get(w_up.dtype, CALL_US_DEFAULT) // gap_us)


def _plan(union: torch.Tensor, s: int, gap: int = 0):
    """union bool [E] -> (sizes, runs, rows, experts, merged).

    Blocks: maximal runs of adjacent active experts, merged across gaps of at most `gap`
    skipped experts.
    sizes:   row counts alternating gap, block, gap, …, block, gap (splits an [F, d] weight
             into views; the blocks are at odd positions);
    runs:    the block lengths in rows (sizes[1::2]);
    rows:    the blocks' row indices [A], in order (int64);
    experts: the experts the blocks cover [A / s] (int64);
    merged:  whether the blocks cover skipped experts (to be masked to 0).
    """
    experts = union.nonzero().view(-1)                           # [Ea]
    sizes, end, ids, merged = [], 0, experts.tolist(), False
    for e in ids:
        if sizes and e - end <= gap:                             # extends the current block
            sizes[-1] += (e + 1 - end) * s
            merged |= e > end
        else:
            sizes += [(e - end) * s, s]
        end = e + 1
    sizes.append((union.shape[0] - end) * s)
    if merged:
        starts = [sum(sizes[:k]) // s for k in range(1, len(sizes), 2)]
        experts = torch.cat([torch.arange(b, b + n // s) for b, n in zip(starts, sizes[1::2])])
    if s not in _ARANGE:
        _ARANGE[s] = torch.arange(s)
    rows = torch.add(_ARANGE[s], experts[:, None], alpha=s).view(-1)
    return sizes, sizes[1::2], rows, experts, merged


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


def _sparse_plan(mask2, union, w_up, gated, s):
    """The plan of the blocks to compute, or None when one dense GEMM per matrix is cheaper:
    by the cost model; or for a batch whose union covers more than DENSE_UNION; or for a
    bf16/fp16 batch (their small per-block GEMMs measured slower than dense at every
    sparsity up to 0.9, see results/cpu_bench.md)."""
    n = mask2.shape[0]
    if n > 1 and (w_up.dtype != torch.float32
                  or int(union.sum()) > DENSE_UNION * union.numel()):
        return None
    plan = _plan(union, s, max_gap(w_up, gated, s, n))
    runs = plan[1]
    call = CALL_US.get(w_up.dtype, CALL_US_DEFAULT)
    row_us = w_up.shape[1] * w_up.element_size() / (STREAM_GBPS * 1e3)   # one row, one matrix
    A, F_, up = sum(runs), w_up.shape[0], 2 if gated else 1
    sparse = up * (len(runs) * call + A * row_us)                 # up: a GEMM per block
    if n == 1:
        sparse += call + A * row_us / 2                           # embedding_bag: ≈2x stream
    else:
        sparse += len(runs) * call + A * row_us                   # down: a GEMM per block
    dense = (up + 1) * (call + F_ * row_us)
    return plan if sparse < dense else None


def _up_packed(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation, plan):
    """h packed [A, n] in x's dtype for the plan's blocks (see _plan)."""
    n = x2.shape[0]
    gated = w_gate is not None
    sizes, runs, rows, experts, merged = plan
    buf = x2.new_empty(2 if gated else 1, rows.shape[0], n)     # gate^T, up^T
    xt = x2.t()                                                  # [d, n]
    for w, out in ((w_gate, buf[0]), (w_up, buf[-1])) if gated else ((w_up, buf[0]),):
        for w_run, o in zip(w.split(sizes)[1::2], out.split(runs)):
            torch.mm(w_run, xt, out=o)                           # [run, d] @ [d, n]
    h = _activate(buf[0] if gated else None, buf[-1], b_gate, b_up, rows, activation)
    if n > 1 or merged:                                          # zero what a token skipped
        h.mul_(mask2.index_select(1, experts).t().repeat_interleave(s, dim=0))   # [A, n]
    return h.to(x2.dtype)


def _down_packed(h, sizes, runs, rows, w_down_t, b_down):
    """y [n, d] = Σ over the packed rows f of h[f] · W_down_t[rows[f]] (+ b_down)."""
    if h.shape[1] == 1:
        y = F.embedding_bag(rows, w_down_t, _OFFSET0, per_sample_weights=h.view(-1),
                            mode="sum")
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


def _bias_only(n, d, b_down, like):
    """y when no expert is active anywhere: b_down (or zeros) for every token."""
    y = like.new_zeros(n, d)
    return y + b_down if b_down is not None else y


def sparse_ffn_up(x, mask, w_gate, w_up, b_gate, b_up, expert_size, activation):
    """Masked h [..., F] (zeros outside each token's experts); reads the union's rows only."""
    d, F_, s = x.shape[-1], w_up.shape[0], expert_size
    x2, mask2 = x.reshape(-1, d), mask.reshape(-1, F_ // s)
    plan = _sparse_plan(mask2, _union(mask2), w_up, w_gate is not None, s)
    if plan is None:
        h = _dense_h(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation)
    else:
        h = x2.new_zeros(x2.shape[0], F_)
        if plan[1]:
            rows = plan[2]
            h[:, rows] = _up_packed(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation,
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
    sizes, runs, rows, experts, _ = _plan(union, s)
    keep = mask2.index_select(1, experts).repeat_interleave(s, dim=1)       # [n, A]
    hp = (h2[:, rows] * keep).t()                                             # [A, n]
    return _down_packed(hp, sizes, runs, rows, w_down_t, b_down).view(*h.shape[:-1], d)


def sparse_ffn(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, expert_size, activation):
    """y [..., d]: the whole FFN, reading only the weights of the union's active experts."""
    d, F_, s = x.shape[-1], w_up.shape[0], expert_size
    x2, mask2 = x.reshape(-1, d), mask.reshape(-1, F_ // s)
    plan = _sparse_plan(mask2, _union(mask2), w_up, w_gate is not None, s)
    if plan is None:
        h = _dense_h(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation)
        return F.linear(h, w_down_t.t(), b_down).view(x.shape)
    sizes, runs, rows, _, _ = plan
    if not runs:                                              # no expert active anywhere
        return _bias_only(x2.shape[0], d, b_down, x2).view(x.shape)
    h = _up_packed(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation, plan)
    return _down_packed(h, sizes, runs, rows, w_down_t, b_down).view(x.shape)

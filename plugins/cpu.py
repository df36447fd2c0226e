"""CPU kernels of lte.SparseFFN that read only the active experts' weights.

Semantics: plugins/spec.py. Inputs are validated by plugins/ops.py before they get here.

Plan of one call, for x [n, d] and mask [n, E] (leading dims flattened):

    union   = mask.any(0)                        experts any token selected      [E]
    blocks  = maximal runs of adjacent experts of the union; block r covers rows
              [b_r·s, e_r·s) of W_gate, W_up and W_down_t: a contiguous slice, never copied
    gate, up= one batched GEMM per block (W_block @ xᵀ) into a packed buffer [2, A, n]
              (A = active rows, block after block; transposed so every block's output is
              contiguous whatever n is). When W_gate and W_up lie in one [2, F, d] storage
              (a folded LTEFFN pairs them) one torch.bmm covers both matrices' block;
              otherwise each matrix's block is one bmm over its two halves
    h       = act(gate + b_gate) ⊙ (up + b_up) in fp32, rounded to x's dtype; for n > 1 each
              token's h is zeroed on the union's experts it did not select (the reference's
              masking, exactly)
    y       = n = 1: embedding_bag(active rows, W_down_t, per_sample_weights=h, mode="sum")
                     = Σ_f h_f · W_down_t[f], one call whatever the number of runs
              n > 1: one GEMM per run, accumulated into y

Why (measured on the 2-core AMD EPYC development machine, torch 2.13 with MKL; numbers in
results/cpu_bench.md): gathering the active rows with index_select copies more bytes than the
FFN reads and is slower than dense (FACTS.md); for one fp32 token torch.mm / F.linear run
MKL's GEMV at ≈17 GB/s while torch.bmm with a batch of 2 (MKL's batched GEMM) streams
≈35 GB/s, so every up-projection block is a bmm, and pairing W_gate with W_up halves the
calls (SmolLM2 layer at 0.5: 0.40 ms unpaired, 0.31 ms paired, dense 0.60 ms); the down
projection of a single token goes through embedding_bag, which streams faster than the GEMV
(fp32 and bf16); a Python-level call costs ≈2–3 µs, so the per-call planning is a handful of
ops (one nonzero; blocks grouped in Python). For small fp32 batches (_bmm_batch), W @ xᵀ as a
bmm is up to 2x faster than F.linear even over every row, so a full union is one block there;
past that,
or in bf16/fp16, a batch whose union covers most experts (prefill) gets one dense F.linear
per matrix, the per-token mask, one F.linear.

Threads: only torch's own intra-op threads. (Splitting one token's rows into two bags so both
cores work was slower on a 2-core machine shared with other jobs: a 2-thread parallel region
waits for a descheduled thread, often for milliseconds.)
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lte_convert.plugins.reference import ACT_FNS
from lte_convert.plugins.spec import gate_up_pair

# Above this fraction of active experts in a multi-token batch's union, one dense GEMM per
# matrix is used instead of one per run.
DENSE_UNION = 0.9
# W @ xᵀ as a batched GEMM (_gemms) beats F.linear's x @ Wᵀ over every row of W_gate and W_up
# for fp32 batches of up to 2 tokens, or while tokens × d ≤ SMALL_ND (measured, gate+up,
# results/cpu_bench.md: d = 576, 1536, 2048, 3072, 4096 at 1–8 tokens; e.g. 2.0x at 576 and
# 1.6x at 1536 for 4 tokens, 0.79x at 2048 for 4 and 0.71x at 1536 for 8, where MKL's GEMM
# for x @ Wᵀ wins).
SMALL_ND = 6144
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


def _cost(blocks: int, rows: int, stacks: int, matrices: int, tokens: int, call: float,
          row_us: float) -> float:
    """Predicted µs of a plan with `blocks` blocks covering `rows` rows: per block one GEMM
    call per stack (see _stacks) on the up side; on the down side one embedding_bag for one
    token (≈2x the GEMM stream) or one GEMM per block."""
    up = blocks * stacks * call + matrices * rows * row_us
    down = call + rows * row_us / 2 if tokens == 1 else blocks * call + rows * row_us
    return up + down


def max_gap(w_up, stacks: int, gated: bool, s: int, tokens: int) -> int:
    """Longest run of skipped experts (in experts) worth computing to save the calls."""
    matrices = 3 if gated else 2
    gap_us = matrices * s * w_up.shape[1] * w_up.element_size() / (STREAM_GBPS * 1e3)
    calls = stacks + (tokens > 1)                        # up GEMMs (+ the down GEMM, n > 1)
    return int(calls * CALL_US.get(w_up.dtype, CALL_US_DEFAULT) // gap_us)


def _plan(union: torch.Tensor, s: int, gap: int = 0):
    """union bool [E] -> (starts, runs, rows, experts, merged).

    Blocks: maximal runs of adjacent active experts, merged across gaps of at most `gap`
    skipped experts.
    starts:  the blocks' first rows (a block is rows [start, start + run) of an [F, d] weight);
    runs:    the block lengths in rows;
    rows:    the blocks' row indices [A], in order (int64);
    experts: the experts the blocks cover [A / s] (int64);
    merged:  whether the blocks cover skipped experts (to be masked to 0).
    """
    experts = union.nonzero().view(-1)                           # [Ea]
    starts, runs, end, merged = [], [], None, False
    for e in experts.tolist():
        if runs and e - end <= gap:                              # extends the current block
            runs[-1] += (e + 1 - end) * s
            merged |= e > end
        else:
            starts.append(e * s)
            runs.append(s)
        end = e + 1
    if merged:
        experts = torch.cat([torch.arange(b // s, (b + n) // s) for b, n in zip(starts, runs)])
    return starts, runs, _rows(experts, s), experts, merged


@functools.lru_cache(maxsize=64)
def _full_plan(E: int, s: int):
    """The plan of one block over all experts, masked per token (a dense GEMM per matrix)."""
    experts = torch.arange(E)
    return [0], [E * s], _rows(experts, s), experts, True


def _rows(experts, s):
    """Row indices [len(experts)·s] of the experts' rows."""
    if s not in _ARANGE:
        _ARANGE[s] = torch.arange(s)
    return torch.add(_ARANGE[s], experts[:, None], alpha=s).view(-1)


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


def _bmm_batch(n: int, d: int) -> bool:
    """Whether n fp32 tokens of width d are faster as W @ xᵀ (bmm) than as F.linear."""
    return n <= 2 or n * d <= SMALL_ND


def _sparse_plan(mask2, union, w_up, gated: bool, stacks: int, s):
    """The plan of the blocks to compute, or None for the dense path (F.linear per matrix,
    then the per-token mask). stacks: how many GEMM calls a block costs (len(_stacks)).

    The blocks of the union's runs when the cost model prefers them to one block of every
    row, else that one block (_full_plan) for one token (its down projection is one
    embedding_bag, in bf16 4x faster than F.linear over W_down_t's layout at LLaMA2-7B's
    shape) and for small fp32 batches (_bmm_batch: W @ xᵀ as a batched GEMM streams the
    weights up to 2x faster there than F.linear's x @ Wᵀ), else None. A batch whose union
    covers more than DENSE_UNION, or a bf16/fp16 batch (their small per-block GEMMs measured
    slower than dense at every sparsity up to 0.9, results/cpu_bench.md), skips the runs."""
    n, E = mask2.shape[0], union.numel()
    small = n == 1 or (w_up.dtype == torch.float32 and _bmm_batch(n, w_up.shape[1]))
    if n > 1 and (w_up.dtype != torch.float32 or int(union.sum()) > DENSE_UNION * E):
        return _full_plan(E, s) if small else None
    plan = _plan(union, s, max_gap(w_up, stacks, gated, s, n))
    runs = plan[1]
    call = CALL_US.get(w_up.dtype, CALL_US_DEFAULT)
    row_us = w_up.shape[1] * w_up.element_size() / (STREAM_GBPS * 1e3)   # one row, one matrix
    costs = (stacks, 2 if gated else 1, n, call, row_us)
    sparse = _cost(len(runs), sum(runs), *costs)
    if sparse < _cost(1, w_up.shape[0], *costs):
        return plan
    return _full_plan(E, s) if small else None


def _stacks(w_gate, w_up):
    """The up-projection weights as [k, F, d] views, each computed with one call per block
    (_gemms): in fp32 the pair when W_gate and W_up are paired, else one [1, F, d] view per
    matrix (a bf16 bmm streams half as fast as bf16 torch.mm at LLaMA2-7B's shape)."""
    pair = gate_up_pair(w_gate, w_up) if w_up.dtype == torch.float32 else None
    if pair is not None:
        return [pair]
    return [w[None] for w in (w_gate, w_up) if w is not None]


def _gemms(w, starts, runs, xt):
    """w[:, b:b+r] @ xt for every block -> [k, A, n], one call per block.

    A [2, F, d] pair is one torch.bmm per block. In fp32 a single matrix's block is cut into
    two halves so it too goes through MKL's batched GEMM, which streams the weights ≈1.7x
    faster than the GEMV torch.mm uses for one token. Outputs are fresh tensors, then one
    cat: bmm with out= a slice of a buffer measured slower (≈2x for a strided slice; SmolLM2
    unpaired, one token at 0.5: 0.40 ms with out= a contiguous slice, 0.36–0.38 ms without)."""
    k, _, d = w.shape
    if k == 2:
        xt2 = xt.expand(2, -1, -1)
        return torch.cat([torch.bmm(w[:, b:b + r], xt2) for b, r in zip(starts, runs)], 1)
    w0, n, xt2 = w[0], xt.shape[1], xt.expand(2, -1, -1)
    halves = w.dtype == torch.float32
    outs = [torch.bmm(w0[b:b + r].view(2, -1, d), xt2).view(r, n) if halves and r % 2 == 0
            else torch.mm(w0[b:b + r], xt) for b, r in zip(starts, runs)]
    return torch.cat(outs)[None]


def _up_packed(x2, mask2, stacks, gated, b_gate, b_up, s, activation, plan):
    """h packed [A, n] in x's dtype for the plan's blocks (see _plan); stacks: _stacks()."""
    n = x2.shape[0]
    starts, runs, rows, experts, merged = plan
    xt = x2.t()                                                  # [d, n]
    outs = [_gemms(w, starts, runs, xt) for w in stacks]
    buf = outs[0] if len(outs) == 1 else torch.cat(outs)         # [2|1, A, n]: gate^T, up^T
    h = _activate(buf[0] if gated else None, buf[-1], b_gate, b_up, rows, activation)
    if n > 1 or merged:                                          # zero what a token skipped
        h.mul_(mask2.index_select(1, experts).t().repeat_interleave(s, dim=0))   # [A, n]
    return h.to(x2.dtype)


def _down_packed(h, starts, runs, rows, w_down_t, b_down):
    """y [n, d] = Σ over the packed rows f of h[f] · W_down_t[rows[f]] (+ b_down)."""
    if h.shape[1] == 1:
        y = F.embedding_bag(rows, w_down_t, _OFFSET0, per_sample_weights=h.view(-1),
                            mode="sum")
    else:
        y = h.new_zeros(h.shape[1], w_down_t.shape[1])
        for b, r, h_run in zip(starts, runs, h.split(runs)):
            y.addmm_(h_run.t(), w_down_t[b:b + r])
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


def _prepare(x, mask, w_gate, w_up, s):
    """x [n, d] and mask [n, E] (leading dims flattened), the up weights' stacks (_stacks)
    and the plan (_sparse_plan) of one call of the op or its up half."""
    x2, mask2 = x.reshape(-1, x.shape[-1]), mask.reshape(-1, w_up.shape[0] // s)
    stacks = _stacks(w_gate, w_up)
    plan = _sparse_plan(mask2, _union(mask2), w_up, w_gate is not None, len(stacks), s)
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
    starts, runs, rows, experts, _ = _plan(union, s)
    keep = mask2.index_select(1, experts).repeat_interleave(s, dim=1)       # [n, A]
    hp = (h2[:, rows] * keep).t()                                             # [A, n]
    return _down_packed(hp, starts, runs, rows, w_down_t, b_down).view(*h.shape[:-1], d)


def sparse_ffn(x, mask, w_gate, w_up, w_down_t, b_gate, b_up, b_down, expert_size, activation):
    """y [..., d]: the whole FFN, reading only the weights of the union's active experts."""
    d, s, gated = x.shape[-1], expert_size, w_gate is not None
    x2, mask2, stacks, plan = _prepare(x, mask, w_gate, w_up, s)
    if plan is None:
        h = _dense_h(x2, mask2, w_gate, w_up, b_gate, b_up, s, activation)
        return F.linear(h, w_down_t.t(), b_down).view(x.shape)
    starts, runs, rows, _, _ = plan
    if not runs:                                              # no expert active anywhere
        return _bias_only(x2.shape[0], d, b_down, x2).view(x.shape)
    h = _up_packed(x2, mask2, stacks, gated, b_gate, b_up, s, activation, plan)
    return _down_packed(h, starts, runs, rows, w_down_t, b_down).view(x.shape)

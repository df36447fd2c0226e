"""Plan selection of the CPU op (plugins/cpu.py): which rows to compute, with which kernels,
or the dense computation — chosen by a cost model whose numbers are measured on the host
where the op runs (plugins/cpu_tuning.py).

A plan, for the union of the experts the call's tokens selected (bool [E], experts of s rows):

    blocks  maximal runs of adjacent active experts, merged across gaps of at most `gap`
            skipped experts (computed, then masked to 0, when the calls saved cost more than
            the gap's rows); or one block over every row (the "full" plan, masked per token)
    up      the kernel of the gate/up projection, one call per block:
              pair    torch.bmm over W_gate and W_up of the block at once ([2, F, d] storage,
                      as a folded LTEFFN holds them)
              halves  torch.bmm per matrix over the block's two halves (MKL's batched GEMM)
              mm      torch.mm per matrix (the GEMV that F.linear also runs for one token)
    bag     the down projection of one token as one embedding_bag over the active rows
            (else one GEMM per block)
    None    the dense computation: F.linear per matrix, then the per-token mask

Cost of a plan in µs, from the measured numbers of a Tuning (one Kernel per way to call):

    block of r rows      kernel.call_us + r · kernel.row_ns / 1e3   (per matrix; pair: 2r rows)
    all F rows at once   kernel.full_us                             (measured, not fitted)
    sparse plan          plan_us + Σ_blocks up calls + down (bag: one call; else one per block)
    full plan            plan_us + the up kernel's full_us (× m unless pair) + the down's
    dense                m · linear.full_us + mm_down.full_us      (m = 2 gated, else 1)

The op runs the cheapest of the sparse plan, the full plan and dense; the dense computation
is what PyTorch would run anyway. The costs leave out the op's per-call Python and dispatch,
so on some hosts the op is still slower than dense at sparsity 0 (results/cpu_bench.md, run 7).
When even one block holding every active expert is predicted slower than dense, or every
expert is active (sparsity 0: the blocks would be the full plan, planned in a Python loop over
the experts), the blocks are not planned at all.

Batches (n > 1) are planned with the one-token numbers (a GEMM of a few tokens reads the same
weight bytes); bf16/fp16 batches and fp32 batches whose union covers more than `dense_union`
of the experts skip the blocks; W @ xᵀ over every row (the full plan) is considered for fp32
batches while n ≤ 2 or n · d ≤ small_nd (a machine-tuned rule, see cpu_tuning.FALLBACK).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

UP_KERNELS = ("pair", "halves", "mm")


@dataclass(frozen=True)
class Kernel:
    """Measured cost of one call: call_us + rows · row_ns / 1e3 µs on a block of `rows` rows
    of width d (per matrix), full_us on all F rows of one matrix (both, for pair)."""
    call_us: float
    row_ns: float
    full_us: float

    def block(self, rows: int) -> float:
        return self.call_us + rows * self.row_ns * 1e-3


@dataclass(frozen=True)
class Tuning:
    """The numbers the plan of one FFN shape (d, F), dtype and thread count depends on."""
    pair: Kernel            # torch.bmm of a [2, r, d] block (W_gate and W_up paired)
    halves: Kernel          # torch.bmm of one matrix's [r, d] block as [2, r/2, d]
    mm: Kernel              # torch.mm of one matrix's [r, d] block (GEMV)
    linear: Kernel          # F.linear(x, W) (the dense path's GEMV)
    bag: Kernel             # embedding_bag over r rows of W_down_t (one token)
    mm_down: Kernel         # h [1, r] @ W_down_t block (also F.linear over W_down_t, dense)
    plan_us: float          # the planning itself (nonzero, blocks, row indices)
    small_nd: int = 6144    # fp32 batches with n · d ≤ this may run W @ xᵀ over every row
    dense_union: float = 0.9   # batches with a union above this fraction skip the blocks
    source: str = ""        # where the numbers come from (host and date, or the fallback)

    def up(self, name: str) -> Kernel:
        return getattr(self, name)


class Plan(NamedTuple):
    """The blocks to compute (immutable: plans may be shared between calls and threads)."""
    starts: tuple[int, ...]        # the blocks' first rows
    runs: tuple[int, ...]          # the blocks' lengths in rows
    rows: torch.Tensor             # the blocks' row indices [A] (int64), fresh per call
    experts: torch.Tensor          # the experts the blocks cover [A / s] (int64)
    merged: bool                   # whether the blocks cover experts to be masked to 0
    up: str                        # one of UP_KERNELS
    bag: bool                      # one token's down projection as one embedding_bag


_ARANGE: dict[int, torch.Tensor] = {}          # arange(s), read only (never handed out)


def rows_of(experts: torch.Tensor, s: int) -> torch.Tensor:
    """Row indices [len(experts)·s] of the experts' rows (a fresh tensor)."""
    if s not in _ARANGE:
        _ARANGE[s] = torch.arange(s)
    return torch.add(_ARANGE[s], experts[:, None], alpha=s).view(-1)


def blocks(union: torch.Tensor, s: int, gaps=(0,)):
    """union bool [E] -> {gap: (starts, runs, experts, merged)} for each gap in `gaps`:
    maximal runs of adjacent active experts, merged across gaps of at most `gap` skipped
    experts (see Plan)."""
    return _blocks(union.nonzero().view(-1), s, gaps)


def _blocks(active: torch.Tensor, s: int, gaps):
    """blocks() of the active experts' indices [Ea] (int64, ascending)."""
    listed = active.tolist()
    out = {}
    for gap in gaps:
        starts, runs, end, merged = [], [], None, False
        for e in listed:
            if runs and e - end <= gap:                          # extends the current block
                runs[-1] += (e + 1 - end) * s
                merged |= e > end
            else:
                starts.append(e * s)
                runs.append(s)
            end = e + 1
        experts = active
        if merged:
            experts = torch.cat([torch.arange(b // s, (b + n) // s)
                                 for b, n in zip(starts, runs)])
        out[gap] = tuple(starts), tuple(runs), experts, merged
    return out


def _calls(up: str, matrices: int) -> int:
    """GEMM calls per block of the up projection."""
    return 1 if up == "pair" else matrices


def _up_cost(t: Tuning, up: str, n_blocks: int, rows: int, matrices: int) -> float:
    k = t.up(up)
    return n_blocks * _calls(up, matrices) * k.call_us + matrices * rows * k.row_ns * 1e-3


def _down_cost(t: Tuning, bag: bool, n_blocks: int, rows: int) -> float:
    if bag:
        return t.bag.block(rows)
    return n_blocks * t.mm_down.call_us + rows * t.mm_down.row_ns * 1e-3


def _full_cost(t: Tuning, up: str, matrices: int, bag: bool) -> float:
    """All rows as one block: the measured full-matrix calls, and plan_us for its row indices
    and per-token mask (the dense path has neither)."""
    k = t.up(up)
    up_us = k.full_us * (1 if up == "pair" else matrices)
    return t.plan_us + up_us + (t.bag.full_us if bag else t.mm_down.full_us)


def dense_cost(t: Tuning, matrices: int) -> float:
    return matrices * t.linear.full_us + t.mm_down.full_us


def max_gap(t: Tuning, up: str, bag: bool, matrices: int, s: int) -> int:
    """Longest run of skipped experts (in experts) worth computing to save one block's calls:
    the up calls (and the down GEMM when the down projection is one GEMM per block)."""
    saved = _calls(up, matrices) * t.up(up).call_us + (0.0 if bag else t.mm_down.call_us)
    per_expert = s * (matrices * t.up(up).row_ns + (t.bag if bag else t.mm_down).row_ns) * 1e-3
    return int(saved // per_expert) if per_expert > 0 else 0


def up_kernels(gated: bool, paired: bool, s: int) -> tuple[str, ...]:
    """The up kernels that apply: pair needs paired storage; halves an even expert size."""
    return tuple(k for k in UP_KERNELS
                 if (k != "pair" or (gated and paired)) and (k != "halves" or s % 2 == 0))


class _Shape(NamedTuple):
    """What a call's plan depends on besides its union (cached per shape and tuning)."""
    options: tuple[tuple, ...]      # (µs fixed, µs per block, µs per row, up, bag, gap)
    gaps: frozenset                              # their gaps
    full: tuple[float, str, bool] | None         # (µs, up, bag) of the best full plan
    dense: float                                 # µs of the dense computation
    best: float                                  # µs of the better of full and dense
    most: int                                    # blocks only while count < most


_SHAPES: dict[int, tuple] = {}          # id(tuning) -> (weakref to it, {args: _Shape})


def _shape(t: Tuning, *args) -> _Shape:
    """_shape_of(t, *args), remembered per Tuning object (hashing one costs microseconds)."""
    entry = _SHAPES.get(id(t))
    if entry is None or entry[0]() is not t:
        entry = _SHAPES[id(t)] = (weakref.ref(t), {})
    shape = entry[1].get(args)
    if shape is None:
        shape = entry[1][args] = _shape_of(t, *args)
    return shape


def _shape_of(t: Tuning, E: int, s: int, gated: bool, paired: bool, fp32: bool, one: bool,
              full_ok: bool) -> _Shape:
    matrices, ups = 2 if gated else 1, up_kernels(gated, paired, s)
    bags = (False, True) if one else (False,)
    full = None
    if full_ok:
        full = min((_full_cost(t, up, matrices, bag), up, bag) for up in ups for bag in bags)
    dense = dense_cost(t, matrices)
    best = min(dense, full[0]) if full else dense
    most = 0
    if one or fp32:                 # bf16/fp16 batches: their small GEMMs lose to dense
        most = 1 + min(int(t.dense_union * E), E) if not one else E + 1
        for count in range(1, most):         # one block of every active expert, no gaps
            rows = count * s
            lower = t.plan_us + min(_up_cost(t, up, 1, rows, matrices) for up in ups) + \
                min(_down_cost(t, bag, 1, rows) for bag in bags)
            if lower >= best:
                most = count
                break
    options = []
    for up in ups:
        for bag in bags:
            base = _up_cost(t, up, 0, 0, matrices) + _down_cost(t, bag, 0, 0)
            options.append((t.plan_us + base,
                            _up_cost(t, up, 1, 0, matrices) + _down_cost(t, bag, 1, 0) - base,
                            _up_cost(t, up, 0, 1, matrices) + _down_cost(t, bag, 0, 1) - base,
                            up, bag, max_gap(t, up, bag, matrices, s)))
    kept = []                    # without the options another (same gap) is never slower than
    for o in sorted(options, key=lambda o: o[:3]):
        if not any(p[5] == o[5] and all(a <= b for a, b in zip(p[:3], o[:3])) for p in kept):
            kept.append(o)
    return _Shape(tuple(kept), frozenset(o[5] for o in kept), full, dense, best, most)


def choose(union: torch.Tensor, n: int, F_: int, d: int, s: int, gated: bool, paired: bool,
           fp32: bool, t: Tuning) -> Optional[Plan]:
    """The cheapest plan of one call (see the module docstring), or None for dense.

    union bool [E]: the experts any of the n tokens selected."""
    E, one = F_ // s, n == 1
    shape = _shape(t, E, s, gated, paired, fp32, one,
                   one or (fp32 and (n <= 2 or n * d <= t.small_nd)))
    active = union.nonzero().view(-1)
    count = active.numel()
    if count == 0:
        return Plan((), (), active, active, False, shape.options[0][3], one)
    if count < min(shape.most, E):             # a full union is the full plan or dense
        planned = _blocks(active, s, shape.gaps)
        sizes = {gap: (len(p[1]), sum(p[1])) for gap, p in planned.items()}
        us = shape.best
        for fixed, per_block, per_row, up_, bag_, gap_ in shape.options:
            n_blocks, rows = sizes[gap_]
            cost = fixed + per_block * n_blocks + per_row * rows
            if cost < us:
                us, up, bag, gap = cost, up_, bag_, gap_
        if us < shape.best:
            starts, runs, experts, merged = planned[gap]
            return Plan(starts, runs, rows_of(experts, s), experts, merged, up, bag)
    if shape.full and shape.full[0] < shape.dense:              # ties go dense
        return Plan((0,), (F_,), torch.arange(F_), torch.arange(E), count < E, shape.full[1],
                    shape.full[2])
    return None

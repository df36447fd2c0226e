"""Hit a requested sparsity: one global router-bias shift, found on held-out data.

The trained routers decide *which* experts a token needs and, through the global efficiency
loss, how sparsity is spread over layers (the paper's layers settle at different
sparsities). Calibration keeps both and moves only the overall level: it adds the same δ to
every router's bias, so the mask becomes z + δ > threshold in every layer, and searches δ so
that the measured sparsity (converter/evaluate.py: fraction of experts off, over held-out
tokens, averaged over layers) equals the target.

Why one global shift rather than a shift per layer: per-layer targets would force every layer
to the same sparsity and throw away the allocation the routers learned (early and late layers
usually want fewer experts off than the middle). A global δ has one unknown, and sparsity is
monotone in it for a fixed input; the only non-linearity is that layer l's mask changes layer
l+1's input, which is why every step measures with a real forward pass.

Search: a Newton-like step from the router margins of the last pass (the δ that would give the
target if inputs did not move: a quantile of the pooled margins), kept inside the bracket
[lo, hi] that the measured points establish, with bisection when the step leaves the bracket.
It stops at |sparsity − target| ≤ tol (default 0.002, well inside the ±0.02 promise) or after
`max_iter` passes, returning the best point seen. Two or three passes are typical.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lte_convert.converter.evaluate import measure
from lte_convert.converter.routers import quantile


@dataclass
class Calibration:
    offset: float                  # δ to add to every router bias
    sparsity: float                # measured at δ on the calibration blocks
    layer_sparsity: list[float]
    uncalibrated_sparsity: float   # measured at δ = 0
    passes: int


@torch.no_grad()
def shift_routers(model, delta: float):
    """Add `delta` to every LTE router's bias (in place)."""
    from lte_convert.converter.surgery import lte_modules

    for _, m in lte_modules(model):
        m.router.bias.add_(delta)


def _newton(margins: list[torch.Tensor], target: float) -> float:
    """d such that mean_l fraction(margin_l + d ≤ 0) ≈ target, inputs held fixed."""
    return -quantile(torch.cat([m.float() for m in margins if m.numel()]), target)


def calibrate(model, blocks: torch.Tensor, target: float, *, batch_size: int = 8,
              task: str = "clm", tokenizer=None, tol: float = 0.002,
              max_iter: int = 10) -> Calibration:
    """Find δ (see module doc). The model is left unchanged (biases copied back)."""
    from lte_convert.converter.surgery import lte_modules

    saved = [m.router.bias.detach().clone() for _, m in lte_modules(model)]
    delta, lo, hi = 0.0, -math.inf, math.inf
    best, first, passes = None, None, 0
    try:
        for passes in range(1, max_iter + 1):
            m = measure(model, blocks, batch_size=batch_size, task=task, tokenizer=tokenizer,
                        keep_margins=True, sparsity_only=True)
            s = m.sparsity
            first = s if first is None else first
            if best is None or abs(s - target) < abs(best[1] - target):
                best = (delta, s, m.layer_sparsity)
            if abs(s - target) <= tol:
                break
            if s > target:          # too many experts off: raise the biases
                lo = max(lo, delta)
            else:
                hi = min(hi, delta)
            step = delta + _newton(m.margins, target)
            if not lo < step < hi:
                step = (lo + hi) / 2 if math.isfinite(lo) and math.isfinite(hi) else (
                    lo + 1.0 if math.isfinite(lo) else hi - 1.0)
            shift_routers(model, step - delta)
            delta = step
    finally:
        with torch.no_grad():
            for (_, m), b in zip(lte_modules(model), saved):
                m.router.bias.copy_(b)
    return Calibration(offset=best[0], sparsity=best[1], layer_sparsity=best[2],
                       uncalibrated_sparsity=first, passes=passes)


@dataclass
class LayerCalibration:
    offsets: list[float]           # the shift added to each layer's router bias
    sparsity: float
    layer_sparsity: list[float]
    passes: int


def target_shift(margins: torch.Tensor, target: float) -> float:
    """The shift that leaves `target` of these margins ≤ 0 (0: all on, 1: all off)."""
    if target <= 0:
        return 1.0 - float(margins.float().min())
    if target >= 1:
        return -1.0 - float(margins.float().max())
    return -quantile(margins, target)


@torch.no_grad()
def calibrate_layers(model, blocks: torch.Tensor, targets: list[float], *, batch_size: int = 8,
                     tol: float = 0.005, max_iter: int = 4) -> LayerCalibration:
    """Move each layer's router bias so that layer l's measured sparsity is targets[l] (in
    place). Each pass measures with a real forward (layer l's inputs depend on the masks
    before it) and shifts every layer by the quantile of its own margins; it stops when every
    layer is within `tol` or after `max_iter` passes."""
    from lte_convert.converter.surgery import lte_modules

    lte = [m for _, m in lte_modules(model)]
    assert len(targets) == len(lte), (len(targets), len(lte))
    offsets = [0.0] * len(lte)
    for passes in range(1, max_iter + 1):
        m = measure(model, blocks, batch_size=batch_size, keep_margins=True, sparsity_only=True)
        if max(abs(s - t) for s, t in zip(m.layer_sparsity, targets)) <= tol:
            break
        for i, (ffn, margin, t) in enumerate(zip(lte, m.margins, targets)):
            shift = target_shift(margin, t)
            ffn.router.bias += shift
            offsets[i] += shift
    else:
        m = measure(model, blocks, batch_size=batch_size, sparsity_only=True)
    return LayerCalibration(offsets=offsets, sparsity=m.sparsity,
                            layer_sparsity=m.layer_sparsity, passes=passes)

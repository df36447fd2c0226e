"""The router start: experts grouped by co-activation, routers fitted to the model's own expert
importance, per-layer sparsity allocated by measured sensitivity (LTE.md steps 1-2, and the
reasons in docs/converter-method.md).

All three read one pass of the dense model over calibration blocks:

    xs = ffn_inputs(model, blocks)              # per layer: FFN inputs x [T, d] (T tokens)

Grouping by co-activation.  Expert e's neurons should fire on the same tokens, so that a token
that needs one of them finds the others useful too. Each neuron i gets the profile
|h_i(x_t)| over the T calibration tokens (h = act(x·W_gateᵀ)·(x·W_upᵀ), the input of W_down),
and the neurons are grouped by balanced k-means on those profiles (converter/grouping.py,
cosine on L2-normalised rows) instead of on their weight rows.

Expert importance and the oracle.  For token t, expert e matters as much as its share of the
FFN's hidden activation: energy E[t, e] = ‖h_e(x_t)‖². The oracle at sparsity S keeps the
experts whose energy is above the layer's S-quantile of all (token, expert) energies: a
variable number per token, the same average as "S of the experts off".

Router fit.  Each router z = x·W_rᵀ + b_r is fitted by binary cross-entropy to the oracle's
on/off labels on the calibration tokens (Adam on mini-batches), from its mean-row start
(converter/surgery.py), then its bias is shifted so that exactly S of the (token, expert)
pairs are off on those tokens. `recall` is the fraction of the oracle's "on" pairs the fitted
router keeps on.

Allocation.  A layer whose experts are redundant can be sparser than one whose every expert
matters. sensitivity() masks one layer at a time at a few levels (all other layers dense) and
measures the loss increase on a few blocks; allocate() then raises, in steps of STEP, the layer
whose next step costs least, until the mean over layers is the requested S.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lte_convert.converter.adapters import blocks as adapter_blocks, get_adapter
from lte_convert.converter.grouping import expert_permutation
from lte_convert.converter.lte_ffn import LTEFFN

LEVELS = (0.25, 0.5, 0.75)      # sensitivity is measured at these per-layer sparsities
STEP = 0.05                     # allocation granularity
MAX_LAYER = 0.9                 # no layer is allocated more than this sparsity


# ---------------------------------------------------------------------------------------
# one pass of the dense model
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def ffn_inputs(model, lte: list[LTEFFN], blocks: torch.Tensor, batch_size: int = 8,
               max_tokens: int = 8192) -> list[torch.Tensor]:
    """Per LTE layer, the FFN's inputs x [T, d] (fp32, CPU) over `blocks` [N, L]."""
    xs = [[] for _ in lte]

    def grab(i):
        def fn(_module, args):
            xs[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())
        return fn

    handles = [m.register_forward_pre_hook(grab(i)) for i, m in enumerate(lte)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, len(blocks), batch_size):
            model.base_model(input_ids=blocks[start:start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [torch.cat(x)[:max_tokens] for x in xs]


def quantile(values: torch.Tensor, q: float) -> float:
    """torch.quantile of the flattened values in fp32, on a fixed 4M-element sample when
    there are more (torch.quantile's input limit)."""
    v = values.float().flatten()
    if len(v) > 4_000_000:
        v = v[torch.randperm(len(v), generator=torch.Generator().manual_seed(0))[:4_000_000]]
    return float(torch.quantile(v, q))


@torch.no_grad()
def expert_energy(ffn: LTEFFN, x: torch.Tensor) -> torch.Tensor:
    """E [T, E] = ‖h_e(x_t)‖² per token and expert."""
    w = next(ffn.parameters())
    h = ffn._hidden(x.to(w.device, w.dtype)).float()                   # [T, F]
    return h.view(len(x), ffn.shape.n_experts, ffn.shape.expert_size).pow(2).sum(-1)


def oracle_mask(energy: torch.Tensor, sparsity: float) -> torch.Tensor:
    """[T, E] bool: the experts above the layer's sparsity-quantile of energy."""
    return energy > quantile(energy.flatten(), sparsity)


# ---------------------------------------------------------------------------------------
# grouping by co-activation
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def coactivation_permutation(ffn: LTEFFN, x: torch.Tensor, seed: int = 0,
                             max_tokens: int = 2048) -> torch.Tensor:
    """Neuron order [F] (indices into ffn's current order) grouping neurons by |h| profile."""
    w = next(ffn.parameters())
    h = ffn._hidden(x[:max_tokens].to(w.device, w.dtype)).float().abs()    # [T, F]
    return expert_permutation(h.t(), ffn.shape.expert_size, seed=seed)


# ---------------------------------------------------------------------------------------
# router fit
# ---------------------------------------------------------------------------------------
@dataclass
class RouterFit:
    recall: float           # oracle "on" pairs kept on by the fitted router
    sparsity: float         # fraction of (token, expert) pairs off after the bias shift
    loss: float             # final BCE


def fit_routers(lte: list[LTEFFN], xs: list[torch.Tensor], sparsity: float, steps: int = 400,
                batch: int = 512, lr: float = 1e-2, seed: int = 0) -> list[RouterFit]:
    """Fit every layer's router to its oracle labels on xs (module doc); in place.

    All layers train as one batched problem (one bmm per step): Adam on random mini-batches of
    `batch` tokens per layer (as good as full-batch steps on held-out recall, measured, and a
    fraction of the cost), then each bias is shifted to the layer's sparsity on its tokens.
    """
    r0 = lte[0].router
    targets = torch.stack([oracle_mask(expert_energy(m, x), sparsity).float()
                           for m, x in zip(lte, xs)])                      # [L, T, E]
    x = torch.stack([x.float() for x in xs])                               # [L, T, d]
    weight = torch.stack([m.router.weight.detach().float().cpu() for m in lte])
    bias = torch.stack([m.router.bias.detach().float().cpu() for m in lte])[:, None]
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(len(lte))[:, None]
    with torch.enable_grad():
        for _ in range(steps):
            i = torch.randint(x.shape[1], (len(lte), batch), generator=gen)
            z = torch.bmm(x[rows, i], weight.transpose(1, 2)) + bias           # [L, B, E]
            loss = F.binary_cross_entropy_with_logits(z, targets[rows, i])
            opt.zero_grad(set_to_none=True)
            (loss * len(lte)).backward()                  # each layer's own mean BCE
            opt.step()
    fits = []
    with torch.no_grad():
        z = torch.bmm(x, weight.transpose(1, 2)) + bias                        # [L, T, E]
        for m, zl, bl, wl, tl in zip(lte, z, bias[:, 0], weight, targets):
            shift = quantile(zl - ffn_threshold(m), sparsity)
            on = zl - shift - ffn_threshold(m) > 0
            m.router.weight.copy_(wl.to(r0.weight.device, r0.weight.dtype))
            m.router.bias.copy_((bl - shift).to(r0.bias.device, r0.bias.dtype))
            loss = F.binary_cross_entropy_with_logits(zl, tl)
            fits.append(RouterFit(recall=float((on & tl.bool()).sum() / tl.sum().clamp_min(1)),
                                  sparsity=float((~on).float().mean()), loss=float(loss)))
    return fits


def ffn_threshold(ffn: LTEFFN) -> float:
    """The router logit at which the (unfolded) hard mask switches: logit(τ)."""
    return float(torch.logit(torch.tensor(ffn.tau)))


@torch.no_grad()
def set_layer_sparsity(ffn: LTEFFN, x: torch.Tensor, sparsity: float) -> float:
    """Shift ffn's router bias so that `sparsity` of x's (token, expert) pairs are off;
    returns the shift added."""
    z = ffn.router_logits(x.to(ffn.router.weight.device, ffn.router.weight.dtype))
    shift = -quantile(z - ffn_threshold(ffn), sparsity)
    ffn.router.bias += shift
    return shift


# ---------------------------------------------------------------------------------------
# per-layer sparsity allocation
# ---------------------------------------------------------------------------------------
class _Replay(nn.Module):
    """Stands in for a block whose outputs on the sensitivity blocks are known: returns them
    (one per batch, in order) instead of computing them. Attribute lookups the model's layer
    loop makes (for example `attention_type`) fall through to the block."""

    def __init__(self, block: nn.Module, outputs: list):
        super().__init__()
        self.block = block
        self.outputs = outputs
        self.calls = 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, *args, **kwargs):
        out = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        if isinstance(out, tuple):          # a copy: the model may update it in place
            return tuple(o.clone() if torch.is_tensor(o) else o for o in out)
        return out.clone()


def _dense_pass(model, layers, blocks, kw) -> tuple[float, list[list]]:
    """(nll, outputs[k] = block k's output per batch) of one pass over `blocks`."""
    from lte_convert.converter.evaluate import measure

    outputs = [[] for _ in layers]
    handles = [b.register_forward_hook(lambda _m, _a, out, k=k: outputs[k].append(out))
               for k, b in enumerate(layers)]
    try:
        return measure(model, blocks, **kw).nll, outputs
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def sensitivity(model, lte: list[LTEFFN], xs: list[torch.Tensor], blocks: torch.Tensor,
                levels=LEVELS, batch_size: int = 8, task: str = "clm",
                tokenizer=None) -> list[list[float]]:
    """costs[l][k]: loss increase of the model's task (`task`, evaluate.measure) with only
    layer l hard-masked at levels[k] on `blocks`.

    The blocks before layer l are dense in every one of its passes, so their outputs are
    recorded once (the dense pass) and replayed (_Replay): layer l's passes compute only the
    blocks from l on. The costs are those of full forward passes (tested).
    """
    from lte_convert.converter.evaluate import measure
    from lte_convert.converter.surgery import lte_modules

    kw = dict(batch_size=batch_size, task=task, tokenizer=tokenizer)
    index = {id(m): i for i, m in lte_modules(model)}
    _, layers = adapter_blocks(model, get_adapter(model.config))
    modes = [m.mode for m in lte]
    for m in lte:
        m.set_mode("dense")
    try:
        base, outputs = _dense_pass(model, layers, blocks, kw)
        costs = []
        for m, x in zip(lte, xs):
            first = index[id(m)]
            for k in range(first):
                layers[k] = _Replay(layers[k], outputs[k])
            bias = m.router.bias.clone()
            m.set_mode("hard")
            row = []
            try:
                for level in levels:
                    set_layer_sparsity(m, x, level)
                    row.append(measure(model, blocks, **kw).nll - base)
                    m.router.bias.copy_(bias)
            finally:
                m.set_mode("dense")
                for k in range(first):
                    layers[k] = layers[k].block
            costs.append(row)
    finally:
        for m, mode in zip(lte, modes):
            m.set_mode(mode)
    return costs


def allocate(costs: list[list[float]], sparsity: float, levels=LEVELS,
             step: float = STEP, max_layer: float = MAX_LAYER) -> list[float]:
    """Per-layer targets with mean `sparsity` that greedily minimise the summed cost.

    Each layer's cost curve runs through (0, 0) and (levels[k], costs[l][k]), made
    non-decreasing, linear between points and extrapolated past the last level with the last
    segment's slope. Ties go to the layer with the lower target, then the earlier one.
    """
    xs = (0.0, *levels)
    curves = []
    for row in costs:
        ys, top = [0.0], 0.0
        for c in row:
            top = max(top, float(c))
            ys.append(top)
        curves.append(ys)

    def cost(l: int, s: float) -> float:
        ys = curves[l]
        k = min(max(i for i in range(len(xs) - 1) if xs[i] <= s + 1e-9), len(xs) - 2)
        slope = (ys[k + 1] - ys[k]) / (xs[k + 1] - xs[k])
        return ys[k] + slope * (s - xs[k])

    n = len(costs)
    targets = [0.0] * n
    for _ in range(round(sparsity * n / step)):
        best = min((round(cost(l, targets[l] + step) - cost(l, targets[l]), 12), targets[l], l)
                   for l in range(n) if targets[l] + step <= max_layer + 1e-9)
        targets[best[2]] = round(targets[best[2]] + step, 10)
    return targets

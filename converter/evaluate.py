"""Evaluation of an LTE model: perplexity, next-token accuracy, measured sparsity, FFN FLOPs.

    measure(model, blocks)                -> Measurement (one pass over held-out blocks)
    ffn_flops_per_token(model, sparsity)  -> FFN FLOPs per token, dense and LTE

`lte-convert eval` (lte_convert/commands/eval.py) writes them as a report with plots.

Sparsity is *measured*: a forward hook on each LTEFFN's router reads the logits z it computes
and counts an expert off when the mask rule says so (z ≤ 0 folded, σ(z) ≤ τ i.e. z ≤ logit(τ)
in stage-2 "hard" mode). Per layer it is the fraction of experts off over all evaluated tokens;
the model's sparsity is the mean over layers (every layer of one model has the same number of
experts, so this is also the fraction over all (token, layer, expert) triples).

FFN FLOPs per token (multiply-adds × 2): dense = Σ_layers 2·d·d_ff·(3 gated | 2 non-gated)
with the model's original d_ff; LTE = Σ_layers [2·d·E (router) + (1 − s_l)·2·d·F·(3 | 2)]
with F the padded width and s_l the measured layer sparsity. Biases and activations are left
out (they are O(d_ff), not O(d·d_ff)).

Masked-LM models are scored on a fixed 15% of positions (seeded), replaced by the mask token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lte_convert.errors import UserError


@dataclass
class Measurement:
    nll: float                    # mean negative log-likelihood per predicted token (nats)
    tokens: int
    accuracy: float
    layer_sparsity: list[float]   # per LTE layer, in layer order (0.0 for a layer not routed)
    margins: list[torch.Tensor] = field(default_factory=list, repr=False)  # z − threshold

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def sparsity(self) -> float:
        return sum(self.layer_sparsity) / max(1, len(self.layer_sparsity))


def _threshold(m) -> float:
    return 0.0 if m.mode == "folded" else math.log(m.tau / (1.0 - m.tau))


def _mlm_inputs(ids, tokenizer, gen):
    labels = torch.full_like(ids, -100)
    pick = torch.rand(ids.shape, generator=gen) < 0.15
    labels[pick] = ids[pick]
    ids = ids.clone()
    ids[pick] = tokenizer.mask_token_id
    return ids, labels


@torch.no_grad()
def measure(model, blocks: torch.Tensor, *, batch_size: int = 8, task: str = "clm",
            tokenizer=None, keep_margins: bool = False, seed: int = 0,
            sparsity_only: bool = False) -> Measurement:
    """One pass over `blocks` [N, T]: loss, accuracy and per-layer sparsity.

    sparsity_only: run the base model without its LM head (calibration needs only the router
    logits; the vocabulary projection is a fifth of SmolLM2's forward). nll/accuracy are NaN.
    """
    from lte_convert.converter.surgery import lte_modules

    lte = [m for _, m in lte_modules(model)]
    off = [0] * len(lte)
    seen = [0] * len(lte)
    margins = [[] for _ in lte]

    def hook(i, m):
        def fn(_module, _inp, z):
            zz = z.detach().float() - _threshold(m)
            off[i] += int((zz <= 0).sum())
            seen[i] += zz.numel()
            if keep_margins:
                margins[i].append(zz.flatten().half())
        return fn

    handles = [m.router.register_forward_hook(hook(i, m)) for i, m in enumerate(lte)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    nll, n_tok, correct = 0.0, 0, 0
    try:
        for start in range(0, len(blocks), batch_size):
            ids = blocks[start:start + batch_size]
            if sparsity_only:
                model.base_model(input_ids=ids.to(device))
                continue
            if task == "mlm":
                ids, labels = _mlm_inputs(ids, tokenizer, gen)
                logits = model(input_ids=ids.to(device)).logits.float()
            else:
                logits = model(input_ids=ids.to(device), use_cache=False).logits[:, :-1].float()
                labels = ids[:, 1:]
            labels = labels.to(device)
            keep = labels != -100
            nll += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            correct += int((logits[keep].argmax(-1) == labels[keep]).sum())
            n_tok += int(keep.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if sparsity_only:
        nll, n_tok, correct = math.nan, 1, math.nan
    elif n_tok == 0:
        raise UserError("The evaluation data produced no tokens to score; give more text.")
    return Measurement(nll=nll / n_tok, tokens=n_tok, accuracy=correct / n_tok,
                       layer_sparsity=[o / s if s else 0.0 for o, s in zip(off, seen)],
                       margins=[torch.cat(m) if m else torch.empty(0) for m in margins])


def ffn_flops_per_token(model, layer_sparsity: list[float] | None) -> dict:
    """{'dense': ..., 'lte': ..., 'ratio': lte/dense} FFN FLOPs per token (see module doc)."""
    from lte_convert.converter.surgery import lte_modules

    dense = lte_flops = 0
    lte = [m for _, m in lte_modules(model)]
    for i, m in enumerate(lte):
        s = m.shape
        mats = 3 if s.gated else 2
        dense += 2 * s.d * getattr(m, "d_ff_original", s.d_ff) * mats
        on = 1.0 - (layer_sparsity[i] if layer_sparsity else 0.0)
        lte_flops += 2 * s.d * s.n_experts + on * 2 * s.d * s.d_ff * mats
    return {"dense": dense, "lte": lte_flops, "ratio": lte_flops / dense if dense else 1.0}

"""Evaluation of an LTE model: perplexity, next-token accuracy, measured sparsity, FFN FLOPs.

    measure(model, blocks)                -> Measurement (one pass over held-out blocks)
    evaluate_checkpoint(ckpt, data, ...)  -> report dict; writes report.json + PNG plots

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

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

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


# ---------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------
def plot_layer_sparsity(layer_sparsity: list[float], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lte_convert.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(layer_sparsity) + 2), 3.2))
    ax.bar(range(len(layer_sparsity)), layer_sparsity, color="#4472c4")
    mean = sum(layer_sparsity) / max(1, len(layer_sparsity))
    ax.axhline(mean, color="k", ls="--", lw=1, label=f"mean {mean:.3f}")
    ax.set(xlabel="layer", ylabel="fraction of experts off", ylim=(0, 1), title=title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_sweep(points: list[dict], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lte_convert.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot([p["sparsity"] for p in points], [p["perplexity"] for p in points], "o-")
    for p in points:
        ax.annotate(f"{p['perplexity']:.1f}", (p["sparsity"], p["perplexity"]),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set(xlabel="measured FFN sparsity", ylabel="perplexity", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# a checkpoint, end to end
# ---------------------------------------------------------------------------------------
def evaluate_checkpoint(ckpt, data=None, *, out_dir=None, sweep: list[float] | None = None,
                        block_size: int = 128, max_blocks: int = 48, batch_size: int = 8,
                        text_field: str = "text", calib_blocks: int = 16) -> dict:
    """Evaluate an LTE checkpoint (or a plain Hugging Face model: dense, for the baseline) on
    held-out text; write report.json and PNG plots.

    data None: the embedded default's held-out Shakespeare plays. With `sweep`, each target is
    calibrated (global router-bias shift on the first `calib_blocks` blocks) and evaluated on
    all blocks; the checkpoint's own threshold is evaluated too.
    """
    from lte_convert.atomic import atomic_path
    from lte_convert.converter.calibrate import calibrate, shift_routers
    from lte_convert.converter.checkpoint import load_lte_model
    from lte_convert.converter.data import heldout_blocks, spread
    from lte_convert.converter.train import check_model_dir

    ckpt = check_model_dir(ckpt)
    dense = not (ckpt / "lte.json").is_file()
    if dense and sweep:
        raise UserError(f"{ckpt} is a plain Hugging Face model (no lte.json): it is evaluated "
                        "dense, and --sweep needs an LTE checkpoint's routers. Drop --sweep, "
                        "or pass a checkpoint from `lte-convert train`.")
    for s in sweep or []:
        if not 0.0 < s < 1.0:
            raise UserError(f"--sweep values must be strictly between 0 and 1, got {s}.")
    if dense:
        from lte_convert.converter.train import load_lm
        model, tokenizer, task = load_lm(ckpt)
        info = {}
    else:
        model, info = load_lte_model(ckpt)
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        task = info.get("task", "clm")
    blocks = heldout_blocks(tokenizer, data, block_size, max_blocks, text_field=text_field)
    m = measure(model, blocks, batch_size=batch_size, task=task, tokenizer=tokenizer)
    flops = None if dense else ffn_flops_per_token(model, m.layer_sparsity)
    report = {
        "checkpoint": str(ckpt), "dense": dense, "tokens": m.tokens, "blocks": len(blocks),
        "block_size": block_size, "perplexity": m.perplexity, "nll": m.nll,
        "accuracy": m.accuracy, "sparsity": m.sparsity, "layer_sparsity": m.layer_sparsity,
        "target_sparsity": info.get("target_sparsity"), "ffn_flops_per_token": flops,
    }
    if sweep:
        points = []
        for target in sorted(sweep):
            cal = calibrate(model, spread(blocks, calib_blocks), target, batch_size=batch_size,
                            task=task, tokenizer=tokenizer)
            shift_routers(model, cal.offset)
            pm = measure(model, blocks, batch_size=batch_size, task=task, tokenizer=tokenizer)
            shift_routers(model, -cal.offset)
            points.append({"target": target, "offset": cal.offset, "sparsity": pm.sparsity,
                           "perplexity": pm.perplexity, "accuracy": pm.accuracy,
                           "layer_sparsity": pm.layer_sparsity})
        report["sweep"] = points
    out_dir = Path(out_dir) if out_dir else ckpt / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    report["plots"] = []
    if not dense:
        plot_layer_sparsity(m.layer_sparsity, out_dir / "layer_sparsity.png",
                            f"{ckpt.name}: measured sparsity per layer")
        report["plots"].append(str(out_dir / "layer_sparsity.png"))
    if sweep:
        plot_sweep(report["sweep"], out_dir / "sweep.png", f"{ckpt.name}: perplexity vs sparsity")
        report["plots"].append(str(out_dir / "sweep.png"))
    report["report_path"] = str(out_dir / "report.json")
    with atomic_path(out_dir / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    return report

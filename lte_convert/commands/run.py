"""`lte-convert run`, the one-shot job: `lte-convert [MODEL] --out model.onnx` = train → fold →
export → validate.

    MODEL (default: the embedded SmolLM2-135M) ─► held-out perplexity, dense
        ─► converter.train.train_lte (start, stage 2, calibrate, fold, save the checkpoint)
        ─► held-out perplexity and measured sparsity of the folded LTE model
        ─► export (exporters.onnx_export) ─► validate ONNX Runtime vs PyTorch
        ─► summary

With no --data, training and calibration read Shakespeare's training plays (as `lte-convert
train`) and the before/after evaluation reads EVAL_BLOCKS blocks evenly spread over the four
held-out plays; with --data, the evaluation reads the held-out tail of the data's blocks.
The original model and the converted one are measured on the same blocks.
The checkpoint goes to `<out stem>-lte/` beside the ONNX file unless --checkpoint says
otherwise; the output path is checked for writability before training starts.
"""
from __future__ import annotations

import time
from pathlib import Path

import click

from lte_convert.commands.options import DTYPE_CHOICE, Failed, threshold_option, trust_option

EVAL_BLOCKS = 48      # held-out blocks for the before/after perplexity (evenly spread)


def default_checkpoint(out: Path) -> Path:
    return out.with_name(out.stem + "-lte")


def _dense_and_blocks(model_dir, data, heldout, cfg, trust_remote_code):
    """(dense model, tokenizer, task, held-out blocks): the blocks training holds out."""
    from lte_convert.converter.data import load_blocks, spread
    from lte_convert.loading import load_lm

    model, tokenizer, task = load_lm(model_dir, trust_remote_code)
    blocks = load_blocks(tokenizer, data, cfg.block_size, heldout=heldout,
                         heldout_fraction=cfg.heldout_fraction)
    return model, tokenizer, task, spread(blocks.heldout, EVAL_BLOCKS)


def run_pipeline(model_dir=None, out="model.onnx", *, sparsity: float = 0.5, data=None,
                 checkpoint=None, dtype: str = "fp32", kv_cache: bool = True,
                 overwrite: bool = False, resume: bool = False,
                 external_data_threshold: int | None = None, config=None,
                 trust_remote_code: bool = False, echo=print) -> dict:
    """Run the whole job; returns a dict of what was measured and written (see `summary`).

    config: a converter.train.TrainConfig (default: its defaults, sized for the embedded model).
    """
    from lte_convert.checks import check_writable
    from lte_convert.commands.train import TRAIN_DEFAULTS, check_train_inputs

    out = Path(out)
    ckpt = Path(checkpoint) if checkpoint else default_checkpoint(out)
    given = config or TRAIN_DEFAULTS
    check_writable(out, overwrite or resume)
    check_train_inputs(model_dir, ckpt, sparsity=sparsity, expert_size=given.expert_size,
                       lr=given.lr, router_lr=given.router_lr, resume=resume,
                       overwrite=overwrite, trust_remote_code=trust_remote_code)

    echo("[0/4] loading torch, transformers and onnx")
    from lte_convert.converter.checkpoint import load_lte_model
    from lte_convert.converter.evaluate import measure
    from lte_convert.converter.train import TrainConfig, train_lte
    from lte_convert.exporters import onnx_export
    from lte_convert.exporters.validate import format_table, validate

    cfg = config or TrainConfig()
    heldout = None
    if model_dir is None:
        from lte_convert.default import default_model_dir
        model_dir = default_model_dir()
    if data is None:                 # train on the training plays, evaluate on held-out plays
        from lte_convert.default import shakespeare_texts
        data, heldout = shakespeare_texts()
    times = {}

    t = time.time()
    echo(f"[1/4] held-out perplexity of the dense model {model_dir}")
    dense, tokenizer, task, blocks = _dense_and_blocks(model_dir, data, heldout, cfg,
                                                       trust_remote_code)
    before = measure(dense, blocks, batch_size=cfg.batch_size, task=task, tokenizer=tokenizer)
    del dense
    echo(f"[2/4] training LTE routers (target sparsity {sparsity:.0%}) -> {ckpt}")
    train_lte(model_dir, data, ckpt, sparsity, config=cfg, resume=resume, overwrite=True,
              trust_remote_code=trust_remote_code)
    lte_model, _ = load_lte_model(ckpt, trust_remote_code=trust_remote_code)
    after = measure(lte_model, blocks, batch_size=cfg.batch_size, task=task,
                    tokenizer=tokenizer)
    del lte_model
    times["train"] = time.time() - t

    t = time.time()
    echo(f"[3/4] exporting {ckpt} -> {out} ({dtype})")
    kwargs = {} if external_data_threshold is None else {
        "external_data_threshold": external_data_threshold}
    exported = onnx_export.export_checkpoint(ckpt, out, dtype=dtype, kv_cache=kv_cache,
                                             overwrite=True,                # checked above
                                             trust_remote_code=trust_remote_code, **kwargs)
    times["export"] = time.time() - t

    t = time.time()
    echo("[4/4] validating ONNX Runtime against PyTorch")
    report = validate(out, ckpt, trust_remote_code=trust_remote_code)
    echo(format_table(report))
    times["validate"] = time.time() - t
    return {"model": str(model_dir), "checkpoint": str(ckpt), "target_sparsity": sparsity,
            "sparsity": after.sparsity, "layer_sparsity": after.layer_sparsity,
            "perplexity_before": before.perplexity, "perplexity_after": after.perplexity,
            "export": exported, "validation": report, "seconds": times}


def summary(r: dict) -> str:
    v, e = r["validation"], r["export"]
    files = [r["checkpoint"] + "/", e["path"]] + ([e["data_path"]] if e["data_path"] else [])
    files.append(v["report_path"])
    worst = max(s["max_abs"] for s in (v["forced"] or v["free"]).values())
    top1 = min(s["top1_agreement"] for s in v["free"].values())
    secs = r["seconds"]
    return "\n".join([
        "",
        "summary",
        f"  model               {r['model']}",
        f"  sparsity            {r['sparsity']:.1%} measured on held-out text "
        f"(target {r['target_sparsity']:.0%}; per layer "
        f"{min(r['layer_sparsity']):.0%}–{max(r['layer_sparsity']):.0%})",
        f"  perplexity          {r['perplexity_before']:.2f} original -> "
        f"{r['perplexity_after']:.2f} LTE (same {EVAL_BLOCKS} held-out blocks)",
        f"  validation          {'PASSED' if v['passed'] else 'FAILED'} "
        f"(ONNX Runtime vs PyTorch, {v['compute_dtype']}: max |Δ logits| {worst:.2g} "
        f"{v['verdict']}, top-1 {top1:.1%} free-running)",
        f"  time                train {secs['train']:.0f} s, export {secs['export']:.0f} s, "
        f"validate {secs['validate']:.0f} s",
        "  files               " + "\n                      ".join(files),
    ])


@click.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--out", "-o", default=Path("model.onnx"), show_default=True,
              type=click.Path(path_type=Path), help="The .onnx file to write.")
@click.option("--sparsity", type=float, default=0.5, show_default=True,
              help="Fraction of FFN experts skipped per token.")
@click.option("--data", multiple=True, type=click.Path(path_type=Path),
              help="Training text (.txt, folder, .jsonl, saved dataset); the last 5% is held "
                   "out. Default with no MODEL: Shakespeare (train/held-out plays).")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Where the LTE checkpoint goes [default: <out stem>-lte beside --out].")
@click.option("--dtype", type=DTYPE_CHOICE, default="fp32", show_default=True)
@click.option("--no-kv-cache", is_flag=True, help="Export decoders without the KV cache.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing checkpoint folder and --out file.")
@click.option("--resume", is_flag=True, help="Continue an interrupted training run.")
@threshold_option
@trust_option
def run(model, out, sparsity, data, checkpoint, dtype, no_kv_cache, overwrite, resume,
        external_data_threshold, trust_remote_code):
    """Train LTE routers, fold, export to ONNX and validate: MODEL -> model.onnx."""
    r = run_pipeline(model, out, sparsity=sparsity, data=list(data) or None,
                     checkpoint=checkpoint, dtype=dtype, kv_cache=not no_kv_cache,
                     overwrite=overwrite, resume=resume,
                     external_data_threshold=external_data_threshold,
                     trust_remote_code=trust_remote_code, echo=click.echo)
    click.echo(summary(r))
    if not r["validation"]["passed"]:
        raise Failed("the exported model failed validation against PyTorch (table above, "
                     f"report in {r['validation']['report_path']}); the files are kept")

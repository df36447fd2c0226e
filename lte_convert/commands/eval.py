"""`lte-convert eval`: perplexity, accuracy, measured sparsity and FFN FLOPs of an LTE
checkpoint (converter.evaluate.measure), written as report.json and PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

import click

from lte_convert.commands.options import trust_option
from lte_convert.errors import UserError


def _floats(ctx, param, value):
    if not value:
        return None
    out = []
    for item in (v.strip() for v in value.split(",")):
        try:
            x = float(item)
        except ValueError:
            raise UserError(f"--sweep takes comma-separated sparsities such as 0.3,0.5,0.7; "
                            f"{item!r} in {value!r} is not a number.") from None
        if not 0.0 < x < 1.0:
            raise UserError(f"--sweep values must be strictly between 0 and 1 (fractions of "
                            f"experts switched off); {item!r} in {value!r} is not.")
        out.append(x)
    return out


def default_out(ckpt: Path) -> Path:
    """Where eval writes without --out: `<checkpoint>-eval/` beside the checkpoint (the
    checkpoint folder stays as train/fold wrote it)."""
    return ckpt.with_name(ckpt.name + "-eval")


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data", multiple=True, type=click.Path(path_type=Path),
              help="Held-out text (.txt, folder, JSONL, saved dataset). Default: Shakespeare's "
                   "held-out plays.")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Folder for report.json and the plots [default: CHECKPOINT-eval beside "
                   "the checkpoint].")
@click.option("--sweep", callback=_floats, default=None,
              help="Comma-separated target sparsities (e.g. 0.3,0.5,0.7): calibrate to each, "
                   "evaluate, and plot perplexity against sparsity.")
@click.option("--block-size", type=int, default=128, show_default=True)
@click.option("--max-blocks", type=int, default=48, show_default=True,
              help="Blocks evaluated, evenly spread over the data (48: the one-shot's "
                   "layout).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--text-field", default="text", show_default=True)
@trust_option
def eval_(checkpoint, data, out, sweep, block_size, max_blocks, batch_size, text_field,
          trust_remote_code):
    """Perplexity, next-token accuracy, measured sparsity per layer and FFN FLOPs of an LTE
    checkpoint, as a JSON report and PNG plots. A plain Hugging Face model folder is
    evaluated dense on the same blocks (the baseline to compare against).

    \b
    Examples:
      lte-convert eval smollm2-lte --sweep 0.3,0.5,0.7
      lte-convert eval ~/.cache/lte-convert/smollm2-135m-instruct     # the original, dense
    """
    r = evaluate_checkpoint(checkpoint, list(data) or None, out_dir=out, sweep=sweep,
                            block_size=block_size, max_blocks=max_blocks,
                            batch_size=batch_size, text_field=text_field,
                            trust_remote_code=trust_remote_code)
    f = r["ffn_flops_per_token"]
    what = ("dense model (no lte.json)" if f is None else
            f"sparsity {r['sparsity']:.3f}  FFN FLOPs/token {f['lte'] / 1e6:.2f}M vs dense "
            f"{f['dense'] / 1e6:.2f}M ({f['ratio']:.2f}x)")
    click.echo(f"perplexity {r['perplexity']:.3f}  accuracy {r['accuracy']:.4f}  {what}  "
               f"[{r['blocks']} blocks, {r['tokens']} tokens]")
    for p in r.get("sweep", []):
        click.echo(f"  target {p['target']:.2f}: sparsity {p['sparsity']:.3f}  "
                   f"perplexity {p['perplexity']:.3f}")
    click.echo("report: " + r["report_path"])


def evaluate_checkpoint(ckpt, data=None, *, out_dir=None, sweep: list[float] | None = None,
                        block_size: int = 128, max_blocks: int = 48, batch_size: int = 8,
                        text_field: str = "text", calib_blocks: int = 16,
                        trust_remote_code: bool = False) -> dict:
    """Evaluate an LTE checkpoint (or a plain Hugging Face model: dense, for the baseline) on
    held-out text; write report.json and PNG plots into `out_dir` (default:
    `<checkpoint>-eval/` beside it).

    data None: the embedded default's held-out Shakespeare plays. With `sweep`, each target is
    calibrated (global router-bias shift on the first `calib_blocks` blocks) and evaluated on
    all blocks; the checkpoint's own threshold is evaluated too.
    """
    from lte_convert.atomic import atomic_path
    from lte_convert.converter.calibrate import calibrate, shift_routers
    from lte_convert.converter.checkpoint import load_lte_model
    from lte_convert.converter.data import heldout_blocks, spread
    from lte_convert.converter.evaluate import ffn_flops_per_token, measure
    from lte_convert.checks import check_output_dir
    from lte_convert.loading import check_model_dir

    ckpt = check_model_dir(ckpt)
    dense = not (ckpt / "lte.json").is_file()
    if dense and sweep:
        raise UserError(f"{ckpt} is a plain Hugging Face model (no lte.json): it is evaluated "
                        "dense, and --sweep needs an LTE checkpoint's routers. Drop --sweep, "
                        "or pass a checkpoint from `lte-convert train`.")
    for s in sweep or []:
        if not 0.0 < s < 1.0:
            raise UserError(f"--sweep values must be strictly between 0 and 1, got {s}.")
    out_dir = Path(out_dir) if out_dir else default_out(ckpt)
    check_output_dir(out_dir, overwrite=True)
    if dense:
        from lte_convert.loading import load_lm
        model, tokenizer, task = load_lm(ckpt, trust_remote_code)
        info = {}
    else:
        model, info = load_lte_model(ckpt, trust_remote_code=trust_remote_code)
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=trust_remote_code)
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


def plot_layer_sparsity(layer_sparsity: list[float], path: Path, title: str):
    from matplotlib.figure import Figure

    from lte_convert.atomic import atomic_path

    fig = Figure(figsize=(max(5, 0.25 * len(layer_sparsity) + 2), 3.2))
    ax = fig.subplots()
    ax.bar(range(len(layer_sparsity)), layer_sparsity, color="#4472c4")
    mean = sum(layer_sparsity) / max(1, len(layer_sparsity))
    ax.axhline(mean, color="k", ls="--", lw=1, label=f"mean {mean:.3f}")
    ax.set(xlabel="layer", ylabel="fraction of experts off", ylim=(0, 1), title=title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def plot_sweep(points: list[dict], path: Path, title: str):
    from matplotlib.figure import Figure

    from lte_convert.atomic import atomic_path

    fig = Figure(figsize=(5, 3.4))
    ax = fig.subplots()
    ax.plot([p["sparsity"] for p in points], [p["perplexity"] for p in points], "o-")
    for p in points:
        ax.annotate(f"{p['perplexity']:.1f}", (p["sparsity"], p["perplexity"]),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set(xlabel="measured FFN sparsity", ylabel="perplexity", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)

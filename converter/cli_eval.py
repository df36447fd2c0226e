"""`lte-convert eval`: a thin wrapper over converter.evaluate.evaluate_checkpoint."""
from __future__ import annotations

from pathlib import Path

import click

from lte_convert.errors import UserError


def _floats(ctx, param, value):
    if not value:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--sweep takes comma-separated sparsities such as 0.3,0.5,0.7; got "
                        f"{value!r}.") from None


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data", multiple=True, type=click.Path(path_type=Path),
              help="Held-out text (.txt, folder, JSONL, saved dataset). Default: Shakespeare's "
                   "held-out plays.")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Folder for report.json and the plots (default: CHECKPOINT/eval).")
@click.option("--sweep", callback=_floats, default=None,
              help="Comma-separated target sparsities (e.g. 0.3,0.5,0.7): calibrate to each, "
                   "evaluate, and plot perplexity against sparsity.")
@click.option("--block-size", type=int, default=128, show_default=True)
@click.option("--max-blocks", type=int, default=48, show_default=True,
              help="Blocks evaluated, evenly spread over the data (48: the one-shot's "
                   "layout).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--text-field", default="text", show_default=True)
def eval_(checkpoint, data, out, sweep, block_size, max_blocks, batch_size, text_field):
    """Perplexity, next-token accuracy, measured sparsity per layer and FFN FLOPs of an LTE
    checkpoint, as a JSON report and PNG plots. A plain Hugging Face model folder is
    evaluated dense on the same blocks (the baseline to compare against).

    \b
    Examples:
      lte-convert eval smollm2-lte --sweep 0.3,0.5,0.7
      lte-convert eval ~/.cache/lte-convert/smollm2-135m-instruct     # the original, dense
    """
    from lte_convert.converter.evaluate import evaluate_checkpoint

    r = evaluate_checkpoint(checkpoint, list(data) or None, out_dir=out, sweep=sweep,
                            block_size=block_size, max_blocks=max_blocks,
                            batch_size=batch_size, text_field=text_field)
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

"""`lte-convert run | export | validate`: thin click commands over exporters/ and converter/."""
from __future__ import annotations

import time
from pathlib import Path

import click

DTYPE_CHOICE = click.Choice(["fp32", "fp16", "bf16"])


class _Failed(click.ClickException):
    """A comparison out of tolerance: exit code 1 (user errors exit with 2)."""

    exit_code = 1


def _threshold_option(f):
    from lte_convert.exporters.onnx_export import EXTERNAL_DATA_THRESHOLD

    return click.option(
        "--external-data-threshold", type=int, default=EXTERNAL_DATA_THRESHOLD,
        show_default=True, metavar="BYTES",
        help="Weights go to <out>.data beside the .onnx file when they exceed this size "
             "(ONNX files cannot exceed 2 GiB).")(f)


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="The .onnx file to write (weights beside it as <out>.data when large).")
@click.option("--dtype", type=DTYPE_CHOICE, default="fp32", show_default=True,
              help="Weights and activations of the exported graph.")
@click.option("--no-kv-cache", is_flag=True,
              help="Decoders: export input_ids/attention_mask -> logits only, without the "
                   "past_key_values/present inputs and outputs.")
@_threshold_option
def export(checkpoint, out, dtype, no_kv_cache, external_data_threshold):
    """Export a folded LTE checkpoint to ONNX (lte SparseFFN nodes with function bodies)."""
    from lte_convert.exporters.onnx_export import export_checkpoint

    t0 = time.time()
    r = export_checkpoint(checkpoint, out, dtype=dtype, kv_cache=not no_kv_cache,
                          external_data_threshold=external_data_threshold)
    _print_export(r, time.time() - t0)


def _print_export(r: dict, seconds: float):
    n = r["custom_nodes"]
    click.echo(f"wrote {r['path']}" + (f" + {r['data_path']}" if r["data_path"] else "")
               + f" ({r['bytes'] / 1e6:.1f} MB of weights, {r['dtype']}, "
               f"{'with' if r['kv_cache'] else 'without'} KV cache, "
               f"{sum(n.values())} lte nodes) in {seconds:.0f} s")


# ---------------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------------
@click.command()
@click.argument("onnx_file", type=click.Path(path_type=Path))
@click.option("--reference", "-r", required=True, type=click.Path(path_type=Path),
              help="The LTE checkpoint the file was exported from (PyTorch side).")
@click.option("-n", "n", type=int, default=4, show_default=True, help="Sequences to compare.")
@click.option("--seq-len", type=int, default=32, show_default=True, help="Tokens per sequence.")
@click.option("--decode-steps", type=int, default=3, show_default=True,
              help="Tokens decoded one at a time after the prefill (files with KV cache).")
@click.option("--data", multiple=True, type=click.Path(path_type=Path),
              help="Text (.txt, folder, .jsonl, saved dataset) to draw sequences from; "
                   "default: random tokens.")
@click.option("--atol", type=float, help="Absolute tolerance on logits (default per dtype).")
@click.option("--rtol", type=float, help="Relative tolerance on logits (default per dtype).")
@click.option("--max-flip-rate", type=float,
              help="Largest fraction of flipped expert decisions (default per dtype).")
@click.option("--engine", type=click.Path(path_type=Path),
              help="Validate a TensorRT engine (.plan) built from ONNX_FILE instead of ONNX "
                   "Runtime (needs TensorRT and a GPU).")
@click.option("--report", type=click.Path(path_type=Path),
              help="JSON report path [default: <onnx stem>.validation.json beside the file].")
def validate(onnx_file, reference, n, seq_len, decode_steps, data, atol, rtol, max_flip_rate,
             engine, report):
    """Compare ONNX Runtime (or a TensorRT engine) with PyTorch; exit 1 when out of tolerance."""
    from lte_convert.exporters.validate import format_table
    from lte_convert.exporters.validate import validate as run_validation

    backend = None
    if engine is not None:
        from lte_convert.trt_plugins.runner import EngineRunner
        backend = EngineRunner(engine)
    r = run_validation(onnx_file, reference, n=n, seq_len=seq_len, decode_steps=decode_steps,
                       data=list(data) or None,
                       atol=atol, rtol=rtol, max_flip_rate=max_flip_rate, backend=backend,
                       report_path=report)
    click.echo(format_table(r))
    if not r["passed"]:
        raise _Failed(f"validation failed; report in {r['report_path']}")


# ---------------------------------------------------------------------------------------------
# run: the one-shot pipeline
# ---------------------------------------------------------------------------------------------
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
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint folder.")
@click.option("--resume", is_flag=True, help="Continue an interrupted training run.")
@_threshold_option
def run(model, out, sparsity, data, checkpoint, dtype, no_kv_cache, overwrite, resume,
        external_data_threshold):
    """Train LTE routers, fold, export to ONNX and validate: MODEL -> model.onnx."""
    from lte_convert.exporters.pipeline import run_pipeline, summary

    r = run_pipeline(model, out, sparsity=sparsity, data=list(data) or None,
                     checkpoint=checkpoint, dtype=dtype, kv_cache=not no_kv_cache,
                     overwrite=overwrite, resume=resume,
                     external_data_threshold=external_data_threshold, echo=click.echo)
    click.echo(summary(r))
    if not r["validation"]["passed"]:
        raise _Failed("the exported model failed validation against PyTorch (table above, "
                      f"report in {r['validation']['report_path']}); the files are kept")

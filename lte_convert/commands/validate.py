"""`lte-convert validate`: ONNX Runtime (or a TensorRT engine) against PyTorch."""
from __future__ import annotations

from pathlib import Path

import click

from lte_convert.commands.options import Failed, trust_option


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
@trust_option
def validate(onnx_file, reference, n, seq_len, decode_steps, data, atol, rtol, max_flip_rate,
             engine, report, trust_remote_code):
    """Compare ONNX Runtime (or a TensorRT engine) with PyTorch; exit 1 when out of tolerance."""
    from lte_convert.exporters.validate import format_table
    from lte_convert.exporters.validate import validate as run_validation

    backend = None
    if engine is not None:
        from lte_convert.trt_plugins.runner import EngineRunner
        backend = EngineRunner(engine)
    click.echo(f"[lte] validating {onnx_file} against {reference}: loading both, running "
               "prefill and decode", err=True)
    r = run_validation(onnx_file, reference, n=n, seq_len=seq_len, decode_steps=decode_steps,
                       data=list(data) or None,
                       atol=atol, rtol=rtol, max_flip_rate=max_flip_rate, backend=backend,
                       report_path=report, trust_remote_code=trust_remote_code)
    click.echo(format_table(r))
    if not r["passed"]:
        raise Failed(f"validation failed; report in {r['report_path']}")

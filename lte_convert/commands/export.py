"""`lte-convert export`: an LTE checkpoint to ONNX (exporters.onnx_export)."""
from __future__ import annotations

import time
from pathlib import Path

import click

from lte_convert.commands.options import DTYPE_CHOICE, threshold_option, trust_option


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="The .onnx file to write (weights beside it as <out>.data when large).")
@click.option("--dtype", type=DTYPE_CHOICE, default="fp32", show_default=True,
              help="Weights and activations of the exported graph.")
@click.option("--no-kv-cache", is_flag=True,
              help="Decoders: export input_ids/attention_mask -> logits only, without the "
                   "past_key_values/present inputs and outputs.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@threshold_option
@trust_option
def export(checkpoint, out, dtype, no_kv_cache, overwrite, external_data_threshold,
           trust_remote_code):
    """Export a folded LTE checkpoint to ONNX (lte SparseFFN nodes with function bodies)."""
    from lte_convert.exporters.onnx_export import export_checkpoint

    click.echo(f"[lte] exporting {checkpoint} -> {out} ({dtype}): loading, tracing, writing",
               err=True)
    t0 = time.time()
    kwargs = {} if external_data_threshold is None else {
        "external_data_threshold": external_data_threshold}
    r = export_checkpoint(checkpoint, out, dtype=dtype, kv_cache=not no_kv_cache,
                          overwrite=overwrite, trust_remote_code=trust_remote_code, **kwargs)
    _print_export(r, time.time() - t0)


def _print_export(r: dict, seconds: float):
    n = r["custom_nodes"]
    click.echo(f"wrote {r['path']}" + (f" + {r['data_path']}" if r["data_path"] else "")
               + f" ({r['bytes'] / 1e6:.1f} MB of weights, {r['dtype']}, "
               f"{'with' if r['kv_cache'] else 'without'} KV cache, "
               f"{sum(n.values())} lte nodes) in {seconds:.0f} s")

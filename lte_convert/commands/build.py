"""`lte-convert build model.onnx --engine model.plan`: a TensorRT engine with the lte plugins
(trt_plugins.builder)."""
from __future__ import annotations

import click

from lte_convert.commands.options import source_literals
from lte_convert.errors import UserError

DEFAULT_DIMS = source_literals("lte_convert.trt_plugins.builder")["DEFAULT_DIMS"]


def _parse_range(value, name):
    from lte_convert.trt_plugins import builder

    return builder.parse_range(value, name)


def _range(name):
    def convert(ctx, param, value):
        return None if value is None else _parse_range(value, f"--{name}")
    return convert


def _dims(ctx, param, values):
    out = {}
    for v in values:
        name, sep, rng = v.partition("=")
        if not sep or not name:
            raise UserError(f"--dim {v!r} must look like NAME=MIN:OPT:MAX (e.g. past_seq=0:128:1024).")
        out[name] = _parse_range(rng, f"--dim {name}")
    return out


@click.command("build")
@click.argument("onnx_file", type=click.Path(dir_okay=False))
@click.option("--engine", "engine", required=True, type=click.Path(dir_okay=False),
              help="Where to write the TensorRT engine (.plan).")
@click.option("--batch", callback=_range("batch"), metavar="MIN:OPT:MAX",
              help=f"Batch range [default {':'.join(map(str, DEFAULT_DIMS['batch']))}].")
@click.option("--seq", callback=_range("seq"), metavar="MIN:OPT:MAX",
              help="New tokens per step [default "
                   f"{':'.join(map(str, DEFAULT_DIMS['seq']))}]; use 1:1:N for decoding.")
@click.option("--past", callback=_range("past"), metavar="MIN:OPT:MAX",
              help="KV-cache length [default "
                   f"{':'.join(map(str, DEFAULT_DIMS['past_seq']))}].")
@click.option("--dim", "dims", multiple=True, callback=_dims, metavar="NAME=MIN:OPT:MAX",
              help="Range of any other named dynamic dim of the ONNX inputs (repeatable).")
@click.option("--allow-dense", is_flag=True,
              help="Build even if the file has no lte nodes (a plain dense model).")
@click.option("--workspace", type=float, metavar="GIB", help="Builder workspace limit in GiB.")
@click.option("--overwrite", is_flag=True, help="Replace an existing engine file.")
@click.option("--verbose", is_flag=True, help="Print TensorRT's full build log.")
def build(onnx_file, engine, batch, seq, past, dims, allow_dense, workspace, overwrite, verbose):
    """Build a TensorRT engine (.plan) from an exported LTE ONNX file.

    \b
    The lte::SparseFFNUp/Down nodes become TensorRT plugins whose kernels (the Triton
    kernels of plugins/, compiled ahead of time to PTX) are stored in the engine, so it runs
    without Python: trtexec --loadEngine=model.plan, or the C++ runtime.
    Precision is the ONNX file's (strongly typed network). Needs TensorRT >= 10.9 and an
    NVIDIA GPU of compute capability >= 8.0; the engine is for that GPU model.
    One optimisation profile covers --batch, --seq and --past (and --dim ranges).
    """
    from lte_convert.trt_plugins import builder

    ranges = dict(dims)
    for name, r in (("batch", batch), ("seq", seq), ("past_seq", past)):
        if r is not None:
            ranges[name] = r
    summary = builder.build_engine(onnx_file, engine, dims=ranges, allow_dense=allow_dense,
                                   workspace_gib=workspace, overwrite=overwrite, verbose=verbose)
    kind = (f"{summary['lte_nodes']} lte plugin nodes ({', '.join(summary['dtypes'])})"
            if summary["lte_nodes"] else "no lte nodes (dense model, --allow-dense)")
    click.echo(f"Wrote {engine} ({summary['bytes'] / 2**20:.1f} MiB): {kind}.")
    for name, (lo, opt, hi) in summary["shapes"].items():
        click.echo(f"  {name}: min {lo}  opt {opt}  max {hi}")

"""`lte-convert bench`: the sparse FFN op against dense PyTorch (plugins/bench.py), or
end-to-end decoding speed with --decode (lte_convert/bench_decode.py)."""
from __future__ import annotations

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--shapes", default="smollm2,llama2-7b", show_default=True,
              help="FFN shapes: smollm2 (576/1536), llama2-7b (4096/11008).")
@click.option("--sparsity", default="0,0.25,0.5,0.75,0.9", show_default=True,
              help="Comma list of fractions of experts off per token.")
@click.option("--tokens", default="1,4,16,64,256,2048", show_default=True,
              help="Comma list of token counts per call.")
@click.option("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 "
              "on CPU, bfloat16 on CUDA).")
@click.option("--device", default=None, help="cpu | cuda (default: cuda when available).")
@click.option("--layers", type=int, default=None, help="Layers' weights to rotate over "
              "(default: the model's layer count, capped by --max-gib).")
@click.option("--max-gib", type=float, default=4.0, show_default=True,
              help="Memory cap for the rotated weights.")
@click.option("--expert-size", type=int, default=32, show_default=True,
              help="Neurons per expert (must divide the shape's FFN width).")
@click.option("--reps", type=int, default=None,
              help="Repeats; the median is reported (default 15, with --decode 5).")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="cpu: process CPU time with 1 thread (for a machine shared with other jobs).")
@click.option("--masks", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Recorded masks (safetensors, layer.<i> [tokens, E]) instead of random ones.")
@click.option("--unpaired", is_flag=True, help="W_gate and W_up as two separate tensors "
              "(default: one [2, F, d] storage, as a folded LTE model holds them).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the results as JSON here.")
@click.option("--calibrate", is_flag=True, help="CPU: measure the op's plan numbers on this "
              "host now (cached per host, torch version, dtype and thread count; otherwise "
              "they are measured at first use).")
@click.option("--decode", is_flag=True, help="Instead: tokens/s of generate(), dense vs LTE, "
              "on the embedded SmolLM2 sample (or --model).")
@click.option("--model", type=click.Path(exists=True, file_okay=False), default=None,
              help="With --decode: an LTE checkpoint folder.")
@click.option("--new-tokens", type=int, default=32, show_default=True,
              help="With --decode: tokens to generate.")
def bench(shapes, sparsity, tokens, dtype, device, layers, max_gib, expert_size, reps, threads,
          clock, masks, unpaired, json_path, calibrate, decode, model, new_tokens):
    """Benchmark lte.SparseFFN against dense PyTorch; prints a table, writes JSON."""
    if decode:
        from lte_convert import bench_decode
        argv = ["--new-tokens", str(new_tokens), "--clock", clock,
                "--reps", str(reps or 5),
                "--dtype", dtype or "float32"]
        sp = [float(v) for v in sparsity.split(",")]
        argv += ["--sparsity", str(sp[0] if len(sp) == 1 else 0.5)]
        for flag, value in (("--model", model), ("--threads", threads), ("--json", json_path),
                            ("--device", device)):
            if value is not None:
                argv += [flag, str(value)]
        bench_decode.main(argv + ["--calibrate"] * calibrate)
        return
    from lte_convert.plugins import bench as bench_ffn
    argv = ["--shapes", shapes, "--sparsity", sparsity, "--tokens", tokens,
            "--max-gib", str(max_gib), "--reps", str(reps or 15), "--clock", clock,
            "--expert-size", str(expert_size)]
    for flag, value in (("--dtype", dtype), ("--device", device), ("--layers", layers),
                        ("--threads", threads), ("--masks", masks), ("--json", json_path)):
        if value is not None:
            argv += [flag, str(value)]
    bench_ffn.main(argv + ["--unpaired"] * unpaired + ["--calibrate"] * calibrate)

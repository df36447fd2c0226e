"""Benchmark lte.SparseFFN against the dense FFN PyTorch runs for the same model.

    python -m lte_convert.plugins.bench --shapes smollm2,llama2-7b --tokens 1,4,16 --json out.json
    lte-convert bench ...            (same options)

For each shape, sparsity and token count it times, per FFN layer:
- dense: the Hugging Face MLP as PyTorch runs it, F.linear with W_gate, W_up [F, d] and W_down
  [d, F] (the original layout), act(gate) * up;
- sparse: torch.ops.lte.sparse_ffn with the same weights in the kernel layout (W_down_t [F, d])
  and a boolean expert mask per token.
- ideal: a dense FFN (as dense) at the active width: the union's experts (half the rows at
  sparsity 0.5 for one token), the time a kernel that reads only the active weights at
  dense PyTorch's speed would take.
It reports median times, the speed-up over dense, the union density (fraction of experts
active for at least one token of the batch: the weights any implementation must read), the
fraction of the ideal (ideal time / sparse time) and PASS/FAIL for the bars of issue 14 where
a row has one (CPU, fp32, random masks: sparsity 0 at ≥ 0.97x of dense; one token at sparsity
0.5 at ≥ 0.85 of the ideal). Every table and JSON names the host (cpu_tuning.host()).

Plan numbers: on CPU the op plans with numbers measured on this host (plugins/cpu_tuning.py);
they are measured (or read from the cache) for each shape before anything is timed, and
`--calibrate` measures them again now. The numbers used go into the JSON.

Caches: every timed pass runs over `--layers` different layers' weights in turn (as many as
the model has by default, capped by `--max-gib`), so a small FFN is not timed out of the
last-level cache. Dense, ideal and sparse passes alternate within each repeat, so load from
other processes on a shared machine hits them alike; the median over repeats is reported.

Masks: random per token (each expert on with probability 1 − sparsity, drawn independently),
or recorded from a real LTE model with `--masks FILE` (a safetensors file of bool tensors
[tokens, E] per layer, keys `layer.<i>`, as lte_convert/bench_decode.py --record-masks writes;
--sparsity is then ignored and the masks' own mean sparsity is reported; a call with T tokens
uses the last T rows of each layer: the decode steps, then the prompt's tokens).

CUDA: timed with CUDA events, eager and as CUDA-graph replays (both reported).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lte_convert.plugins  # noqa: F401  (registers torch.ops.lte)
from lte_convert.errors import UserError, exit_with
from lte_convert.plugins import cpu_tuning
from lte_convert.plugins.reference import ACT_FNS

# name -> (d, d_ff, layers in the model)
SHAPES = {"smollm2": (576, 1536, 30), "llama2-7b": (4096, 11008, 32)}
SPARSITIES = (0.0, 0.25, 0.5, 0.75, 0.9)
TOKENS = (1, 4, 16, 64, 256, 2048)
EXPERT_SIZE = 32
# The bars of issue 14 (CPU): (rule, threshold) by what a row is.
BAR_DENSE = 0.97            # sparsity 0: speed-up over dense
BAR_IDEAL = 0.85            # one fp32 token at sparsity 0.5: fraction of the ideal


def make_layers(d, F_, n_layers, dtype, device, seed=0, paired=True, sparse=True):
    """n_layers FFNs: gate/up [F, d] shared by both paths, W_down [d, F] (dense) and W_down_t
    [F, d] (sparse, unless `sparse` is off) holding the same values. paired: W_gate and W_up
    are the two halves of one [2, F, d] tensor, as a folded LTEFFN holds them
    (converter/lte_ffn.py)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    layers = []
    for _ in range(n_layers):
        w = [(torch.randn(F_, d, generator=g) / math.sqrt(d)).to(dtype).to(device)
             for _ in range(3)]
        if paired:
            w[0], w[1] = torch.stack(w[:2])
        layers.append({"w_gate": w[0], "w_up": w[1], "w_down": w[2].t().contiguous(),
                       **({"w_down_t": w[2]} if sparse else {})})
    return layers


def random_masks(n_layers, tokens, E, sparsity, device, seed=0):
    """[layer] bool [tokens, E]: each expert on with probability 1 − sparsity."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [(torch.rand(tokens, E, generator=g) >= sparsity).to(device) for _ in range(n_layers)]


def recorded_masks(path, n_layers, tokens, E, device):
    """Masks from a real model: layer i of the benchmark uses recorded layer i mod L, its last
    `tokens` rows (bench_decode records the prompt's tokens, then the decode steps)."""
    from safetensors.torch import load_file
    rec = load_file(path)
    keys = sorted(rec, key=lambda k: int(k.split(".")[-1]))
    out = []
    for i in range(n_layers):
        m = rec[keys[i % len(keys)]]
        if m.shape[-1] != E or m.shape[0] < tokens:
            raise UserError(f"{path}: {keys[i % len(keys)]} has shape {tuple(m.shape)}; this "
                            f"benchmark needs at least [{tokens}, {E}] for the shape. Record "
                            "masks from a model with this FFN shape, or lower --tokens.")
        out.append(m[-tokens:].bool().to(device))
    return out


def dense_ffn(x, L):
    """The HF LLaMA MLP: down(act(gate(x)) * up(x)), original layouts."""
    return F.linear(ACT_FNS["silu"](F.linear(x, L["w_gate"])) * F.linear(x, L["w_up"]),
                    L["w_down"])


def sparse_ffn(x, m, L, expert_size):
    return torch.ops.lte.sparse_ffn(x, m, L["w_gate"], L["w_up"], L["w_down_t"], None, None,
                                    None, expert_size, "silu")


def _time_cpu(fn, reps, clock):
    """Seconds per call of fn() (fn runs all layers once), one value per repeat."""
    out = []
    for _ in range(reps):
        t = clock()
        fn()
        out.append(clock() - t)
    return out


def time_passes(fns, reps, device, graphs, clock=time.perf_counter):
    """Repeats of every pass in turn (fns: {name: fn}); returns {name: [...]} seconds per pass
    (and '<name>_graph' lists on CUDA when graphs is set)."""
    for fn in fns.values():                                     # warm-up
        fn()
    res = {name: [] for name in fns}
    if device.type == "cpu":
        for _ in range(reps):
            for name, fn in fns.items():
                res[name] += _time_cpu(fn, 1, clock)
        return res
    fns = dict(fns)
    if graphs:
        for name, fn in list(fns.items()):
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            fns[name + "_graph"] = g.replay
            res[name + "_graph"] = []
    for _ in range(reps):
        for name, fn in fns.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            res[name].append(a.elapsed_time(b) / 1e3)
    return res


def bar(row):
    """(rule, PASS|FAIL) of issue 14's bar for this row, or None where none applies."""
    if row["device"] != "cpu" or row["masks"] != "random" or row["dtype"] != "float32":
        return None
    if row["sparsity"] == 0:
        ok = row["speedup"] >= BAR_DENSE
        return f"speed-up ≥ {BAR_DENSE}", "PASS" if ok else "FAIL"
    if row["sparsity"] == 0.5 and row["tokens"] == 1:
        ok = row["fraction_of_ideal"] >= BAR_IDEAL
        return f"of ideal ≥ {BAR_IDEAL}", "PASS" if ok else "FAIL"
    return None


def bench_one(shape_name, sparsity, tokens, args, layers, device, clock):
    d, F_, _ = SHAPES[shape_name]
    s = args.expert_size
    E = F_ // s
    n = len(layers)
    if args.masks:
        masks = recorded_masks(args.masks, n, tokens, E, device)
    else:
        masks = random_masks(n, tokens, E, sparsity, device)
    g = torch.Generator(device="cpu").manual_seed(1)
    xs = [torch.randn(tokens, d, generator=g).to(args.dtype).to(device) for _ in range(n)]
    outs = [torch.empty(tokens, d, dtype=args.dtype, device=device) for _ in range(n)]
    union = statistics.mean(float(m.any(0).float().mean()) for m in masks)
    width = round(union * E) * s                           # the ideal: dense at this width
    ideal = make_layers(d, width, n, args.dtype, device, seed=2, paired=False, sparse=False) \
        if 0 < width < F_ else None

    def run_dense():
        for x, L, o in zip(xs, layers, outs):
            o.copy_(dense_ffn(x, L))

    def run_ideal():
        for x, L, o in zip(xs, ideal, outs):
            o.copy_(dense_ffn(x, L))

    def run_sparse():
        for x, m, L, o in zip(xs, masks, layers, outs):
            o.copy_(sparse_ffn(x, m, L, s))

    fns = {"dense": run_dense, **({"ideal": run_ideal} if ideal else {}), "sparse": run_sparse}
    with torch.inference_mode():
        t = time_passes(fns, args.reps, device, graphs=device.type == "cuda", clock=clock)
    del ideal
    if args.masks:                                  # the recorded masks' own mean sparsity
        sparsity = 1.0 - statistics.mean(float(m.float().mean()) for m in masks)
    row = {"shape": shape_name, "d": d, "d_ff": F_, "expert_size": s, "sparsity": sparsity,
           "tokens": tokens,
           "layers_rotated": n, "dtype": str(args.dtype).replace("torch.", ""),
           "device": device.type, "union_density": union, "ideal_width": width,
           "clock": args.clock, "threads": torch.get_num_threads(),
           "gate_up_paired": not args.unpaired, "masks": "recorded" if args.masks else "random"}
    for name, v in t.items():
        row[f"{name}_ms"] = statistics.median(v) / n * 1e3     # per layer
    for suffix in ("", "_graph"):
        if f"dense{suffix}_ms" in row:
            dn, sp = row[f"dense{suffix}_ms"], row[f"sparse{suffix}_ms"]
            ideal_ms = row.get(f"ideal{suffix}_ms", dn if width == F_ else 0.0)
            row[f"ideal{suffix}_ms"] = ideal_ms
            row[f"speedup{suffix}"] = dn / sp
            row[f"fraction_of_ideal{suffix}"] = ideal_ms / sp if ideal_ms else float("nan")
    rule = bar(row)
    if rule:
        row["bar"], row["bar_result"] = rule
    return row


def host_line(host):
    return (f"{host['cpu']} ({host['logical_cpus']} CPUs, {host['aten_capability']}; "
            f"{' '.join(host['isa'])}), {host['threads']} threads, torch {host['torch']}, "
            f"MKL {host['mkl']}, oneDNN {host['onednn']}")


def print_table(rows, host=None):
    from rich.console import Console
    from rich.table import Table

    graphs = any("speedup_graph" in r for r in rows)
    title = "lte.SparseFFN vs dense PyTorch (median ms per FFN layer)"
    table = Table(title=title + (f"\non {host_line(host)}" if host else ""))
    cols = ["shape", "expert", "dtype", "sparsity", "tokens", "union", "dense ms", "ideal ms",
            "sparse ms", "speed-up", "of ideal", "bar"]
    if graphs:
        cols += ["dense graph ms", "sparse graph ms", "graph speed-up", "graph of ideal"]
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        cells = [r["shape"], str(r["expert_size"]), r["dtype"], f"{r['sparsity']:.2f}",
                 str(r["tokens"]),
                 f"{r['union_density']:.2f}", f"{r['dense_ms']:.3f}", f"{r['ideal_ms']:.3f}",
                 f"{r['sparse_ms']:.3f}", f"{r['speedup']:.2f}x",
                 f"{r['fraction_of_ideal']:.2f}",
                 f"{r['bar_result']} ({r['bar']})" if "bar" in r else ""]
        if graphs:
            cells += [f"{r['dense_graph_ms']:.3f}", f"{r['sparse_graph_ms']:.3f}",
                      f"{r['speedup_graph']:.2f}x", f"{r['fraction_of_ideal_graph']:.2f}"]
        table.add_row(*cells)
    Console(width=200).print(table)
    results = [r["bar_result"] for r in rows if "bar" in r]
    if results:
        print(f"Bars (issue 14): {results.count('PASS')} PASS, {results.count('FAIL')} FAIL")


def _floats(s):
    return [float(v) for v in s.split(",")]


def _ints(s):
    return [int(v) for v in s.split(",")]


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    p.add_argument("--sparsity", type=_floats, default=list(SPARSITIES))
    p.add_argument("--tokens", type=_ints, default=list(TOKENS))
    p.add_argument("--dtype", default=None, help="float32|bfloat16|float16 (default: fp32 on "
                   "CPU, bf16 on CUDA)")
    p.add_argument("--device", default=None, help="cpu|cuda (default: cuda when available)")
    p.add_argument("--layers", type=int, default=None,
                   help="layers' weights to rotate over (default: the model's layer count, "
                        "capped by --max-gib)")
    p.add_argument("--max-gib", type=float, default=4.0,
                   help="memory cap for the rotated weights (default 4 GiB)")
    p.add_argument("--expert-size", type=int, default=EXPERT_SIZE,
                   help=f"neurons per expert (default {EXPERT_SIZE}; must divide d_ff)")
    p.add_argument("--reps", type=int, default=15, help="repeats; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time, with 1 thread "
                        "(robust on a machine shared with other jobs: time spent descheduled "
                        "is not counted; memory-bandwidth contention still is)")
    p.add_argument("--masks", default=None, help="recorded masks (safetensors, keys layer.<i>)")
    p.add_argument("--unpaired", action="store_true",
                   help="W_gate and W_up in separate storages (default: one [2, F, d] storage, "
                        "as a folded LTE model holds them)")
    p.add_argument("--calibrate", action="store_true",
                   help="CPU: measure the op's plan numbers for each shape now (else they "
                        "come from the cache, or are measured at first use)")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    return p


def set_up_clock(args, device_type: str):
    """Apply --clock and --threads (bench_decode shares this): `cpu` is process CPU time with
    one thread, for CPU runs only. Returns the clock function."""
    if args.clock == "cpu":
        if device_type != "cpu":
            raise UserError("--clock cpu measures CPU time and is for CPU runs only; use "
                            "--clock wall with --device cuda.")
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    return time.process_time if args.clock == "cpu" else time.perf_counter


def main(argv=None):
    args = parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    clock = set_up_clock(args, device.type)
    host = cpu_tuning.host()
    print(f"host: {host_line(host)}", flush=True)
    rows, tunings = [], {}
    for shape_name in args.shapes.split(","):
        if shape_name not in SHAPES:
            raise UserError(f"Unknown shape {shape_name!r} in --shapes; choose from "
                            f"{', '.join(SHAPES)}.")
        d, F_, model_layers = SHAPES[shape_name]
        if args.expert_size < 1 or F_ % args.expert_size:
            raise UserError(f"--expert-size {args.expert_size} does not divide the {shape_name} "
                            f"FFN width {F_}; choose a divisor such as 8, 16 or 32.")
        if device.type == "cpu":
            tunings[shape_name] = plan_numbers(d, F_, args.dtype, args.calibrate)
        per_layer = 4 * F_ * d * torch.finfo(args.dtype).bits / 8  # gate, up, down, down_t
        n = args.layers or max(1, min(model_layers, int(args.max_gib * 2**30 // per_layer)))
        layers = make_layers(d, F_, n, args.dtype, device, paired=not args.unpaired)
        for tokens in args.tokens:
            for sparsity in ([None] if args.masks else args.sparsity):
                row = bench_one(shape_name, sparsity, tokens, args, layers, device, clock)
                rows.append(row)
                print(f"{shape_name} tokens={tokens} sparsity={row['sparsity']:.2f}: dense "
                      f"{row['dense_ms']:.3f} ms, ideal {row['ideal_ms']:.3f} ms, sparse "
                      f"{row['sparse_ms']:.3f} ms, {row['speedup']:.2f}x, "
                      f"{row['fraction_of_ideal']:.2f} of ideal (union "
                      f"{row['union_density']:.2f}, layers {n})"
                      + (f" {row['bar_result']}" if "bar" in row else ""), flush=True)
        del layers
    print_table(rows, host)
    if args.json:
        from lte_convert.atomic import atomic_path
        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps({"host": host, "argv": argv,
                                             "plan_numbers": tunings, "rows": rows},
                                            indent=1, default=str))
    return rows


def plan_numbers(d, F_, dtype, fresh):
    """The CPU op's plan numbers for this shape (measured now with `fresh`), printed as
    GB/s and µs per call of each kernel; returns them as a dict for the JSON."""
    t = cpu_tuning.calibrate(d, F_, dtype) if fresh else cpu_tuning.get(d, F_, dtype)
    row_bytes = d * torch.finfo(dtype).bits / 8
    parts = []
    for name in cpu_tuning.KERNELS:
        k = getattr(t, name)
        parts.append(f"{name} {row_bytes / k.row_ns:.1f} GB/s + {k.call_us:.1f} µs")
    print(f"plan numbers {d}x{F_} ({t.source}): " + ", ".join(parts)
          + f"; planning {t.plan_us:.0f} µs", flush=True)
    return dataclasses.asdict(t)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        exit_with(e)

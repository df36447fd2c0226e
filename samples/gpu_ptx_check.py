"""Run the TensorRT plugin's exact PTX on a GPU without TensorRT, launched as TensorRT would.

For each case (FFN shape, gating, activation), dtype (fp16, bf16, fp32), PTX target (sm_80
and sm_90a) and tactic, this script

  1. asks trt_plugins.aot.compile_op for the Launch the plugin's aot_impl returns: kernel
     name, PTX, grid/block/shared-memory expressions, int32 scalar expressions;
  2. loads that PTX with the CUDA driver (cupy.RawModule -> cuModuleLoad; sm_80 PTX is
     JIT-compiled by the driver on newer GPUs, sm_90a PTX runs on compute 9.0 only);
  3. for several token counts T, on fresh random inputs (mask as INT32, as TensorRT gives
     it after the builder's Cast; for some T the activations start at an odd element, as a
     TensorRT view may; weight rows of experts no token uses are NaN, so reading one shows),
     with the output buffer poisoned with NaN, launches the
     kernel with exactly the grid, block, shared memory and argument list TensorRT builds
     (input pointers, int32 scalars, output pointers, then a null pointer per hidden
     Triton scratch parameter);
  4. compares with plugins.reference (fp32 math) and with the PyTorch op
     (torch.ops.lte.sparse_ffn_up/down, the same kernels through Triton's JIT).

The PTX is generated ON the GPU machine by trt_plugins/aot.py with that machine's Triton
(what a user's TensorRT build would embed); tests/trt_plugins/test_aot.py assembles the PTX
of the development machine's Triton with ptxas. Needs: torch (CUDA), triton, cupy; no
TensorRT, no install of this project (run from the repository root with PYTHONPATH=.).

    PYTHONPATH=. python samples/gpu_ptx_check.py            # table + $OUT/gpu_ptx_check.json
    PYTHONPATH=. python samples/gpu_ptx_check.py --dry-run  # no GPU: compile, plan, ptxas -v

Exit code 0 when every launch matches, 1 otherwise. Finishes within about 2 minutes: launches
stop after --budget-s (90 s, counted from the start) and the rows left are reported as skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from lte_convert.plugins import spec
from lte_convert.plugins.reference import sparse_ffn_down_reference, sparse_ffn_up_reference
from lte_convert.trt_plugins import aot

# max |kernel - reference| / max(1, max |reference|): fp32 accumulation in both, so the
# difference is the output rounding (≤ 1 ulp) plus summation order.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 1.6e-2}
TOKENS = (1, 5, 64, 130)      # decode, small batch, a bucket edge, prefill (not a multiple of 64)
UNALIGNED = (5, 130)          # token counts run with activations at an odd element offset
TORCH_OP_TOKENS = (1, 130)    # also compared with the PyTorch op (decode and prefill configs)
DENSITY = 0.5                 # share of active experts per token


@dataclass(frozen=True)
class Case:
    name: str
    d: int
    F: int
    expert_size: int
    gated: int
    activation: str
    every_target: bool        # every tactic on both PTX targets, or tactics {first, last} natively


CASES = (
    Case("smollm2-135m", 576, 1536, 32, 1, "silu", True),
    Case("gpt2-like", 256, 1024, 32, 0, "gelu_tanh", False),
    Case("odd-d", 200, 352, 32, 1, "gelu", False),           # d % 16 != 0, 11 experts
    Case("s16-relu", 128, 512, 16, 0, "relu", False),
)


def plan(native_arch: int):
    """[(case, op, arch, dtype, tactic, compile_op kwargs)] to run, in order: every tactic
    on both PTX targets for the cases marked every_target, else the first and last tactic
    on the GPU's own target."""
    rows = []
    for case in CASES:
        archs = aot.ARCHS if case.every_target else (native_arch,)
        for arch in archs:
            for dtype in spec.DTYPE_BY_NAME:
                for op in (spec.OP_UP, spec.OP_DOWN):
                    kw = dict(arch=arch, dtype=dtype, d=case.d, F=case.F,
                              expert_size=case.expert_size)
                    if op == spec.OP_UP:
                        kw.update(activation=case.activation, gated=case.gated)
                    n = len(aot.configs(op, d=case.d, F=case.F, expert_size=case.expert_size,
                                        dtype=dtype))
                    tactics = range(1, n + 1) if case.every_target else sorted({1, n})
                    rows += [(case, op, arch, dtype, t, kw) for t in tactics]
    return rows


def compile_one(op, tactic, kw):
    """A Launch; an AotRuleError (the plugin leaves that tactic out too); or, if compiling
    fails for another reason, that error as text (reported as a failed row)."""
    try:
        return aot.compile_op(op, tactic=tactic, **kw)
    except aot.AotRuleError as e:
        return e
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def compile_all(rows, workers: int) -> list:
    """compile_op for every row (a Launch or an AotRuleError each), in `workers` spawned
    processes: the AOT compiles are most of this script's time."""
    jobs = list(zip(*[(op, t, kw) for _, op, _, _, t, kw in rows]))
    if workers <= 1:
        return [compile_one(*j) for j in zip(*jobs)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        return list(ex.map(compile_one, *jobs))


def _unaligned(t):
    """The same values in a buffer one element past a 256-byte aligned start: a pointer
    TensorRT may pass for an activation (the kernels promise alignment for weights only)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def make_inputs(case: Case, T: int, dtype: str, device, unaligned: bool = False):
    """(kernel inputs, reference inputs, bool mask, poisoned outputs).

    Inputs follow the spec's order in ONNX form (gate slots hold W_up/b_up when not gated,
    biases always present). Random, seeded by (case, T, dtype) so every PTX target and
    tactic sees the same data. The kernel's copies differ from the reference's in two
    ways that must not change the result: rows of W_gate/W_up/W_down_t of experts no token
    uses are NaN (proves they are never read), and h holds random values at masked-off
    positions (the down kernel must skip them). unaligned: activations (x, mask, h and the
    outputs) start at an odd element.
    """
    d, F, E = case.d, case.F, case.F // case.expert_size
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(f"{case.name}/{T}/{dtype}".encode()))
    tdt = spec.DTYPE_BY_NAME[dtype]
    act = _unaligned if unaligned else (lambda t: t)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(tdt)

    mask = torch.rand(T, E, generator=gen, device=device) < DENSITY
    rows_on = mask.repeat_interleave(case.expert_size, dim=1)               # [T, F]
    w_up, b_up = randn(F, d, scale=d ** -0.5), randn(F, scale=0.1)
    w_gate, b_gate = (randn(F, d, scale=d ** -0.5), randn(F, scale=0.1)) if case.gated else (w_up, b_up)
    h = randn(T, F)
    ref = {"x": randn(T, d), "mask": mask, "w_gate": w_gate, "w_up": w_up, "b_gate": b_gate,
           "b_up": b_up, "h": h * rows_on.to(tdt), "w_down_t": randn(F, d, scale=F ** -0.5),
           "b_down": randn(d, scale=0.1)}
    dead = ~rows_on.any(0)                                                   # rows no token uses

    def poisoned(w):
        w = w.clone()
        w[dead] = float("nan")
        return w

    kern = dict(ref, x=act(ref["x"]), mask=act(mask.to(torch.int32)), h=act(h),
                w_up=poisoned(w_up), w_down_t=poisoned(ref["w_down_t"]))
    kern["w_gate"] = poisoned(w_gate) if case.gated else kern["w_up"]
    out = {"h_out": act(torch.full((T, F), float("nan"), dtype=tdt, device=device)),
           "y": act(torch.full((T, d), float("nan"), dtype=tdt, device=device))}
    return kern, ref, mask, out


def references(case, op, t, mask, with_torch_op: bool):
    """(reference, PyTorch op or None) outputs of `op` on the inputs `t`."""
    g = t["w_gate"] if case.gated else None
    bg = t["b_gate"] if case.gated else None
    if op == spec.OP_UP:
        ref = sparse_ffn_up_reference(t["x"], mask, g, t["w_up"], bg, t["b_up"],
                                      case.expert_size, case.activation, bool(case.gated))
        mine = torch.ops.lte.sparse_ffn_up(t["x"], mask, g, t["w_up"], bg, t["b_up"],
                                           case.expert_size, case.activation) if with_torch_op else None
    else:
        ref = sparse_ffn_down_reference(t["h"], mask, t["w_down_t"], t["b_down"], case.expert_size)
        mine = torch.ops.lte.sparse_ffn_down(t["h"], mask, t["w_down_t"], t["b_down"],
                                             case.expert_size) if with_torch_op else None
    return ref, mine


def launch_args(launch: aot.Launch, t: dict, out: dict, T: int):
    """grid, block, shared memory and the argument list exactly as TensorRT builds them."""
    import numpy as np

    env = {"T": T}
    ptrs = {n: t[n].data_ptr() for n in launch.inputs}
    ptrs.update({n: out["h_out" if n == "h" else n].data_ptr() for n in launch.outputs})
    values = launch.kernel_args(ptrs, env)
    n_in, n_sc = len(launch.inputs), len(launch.scalars)
    args = [np.uint64(v) for v in values[:n_in]] + [np.int32(v) for v in values[n_in:n_in + n_sc]] \
        + [np.uint64(v) for v in values[n_in + n_sc:]]
    grid = tuple(int(aot.evaluate(g, env)) for g in launch.grid)
    return grid, (launch.block, 1, 1), launch.shared_mem, tuple(args)


def check(fn, case, op, launch, refs):
    """Launch `fn` (the loaded PTX) for every T in TOKENS; errors against the references."""
    import cupy

    errs_ref, errs_torch, masked_zero, finite, torch_error = [], [], True, True, None
    for T in TOKENS:
        t, t_ref, mask, out = make_inputs(case, T, launch.dtype, "cuda", unaligned=T in UNALIGNED)
        key = (case.name, op, launch.dtype, T)
        if key not in refs:
            try:
                with_op = case.every_target and T in TORCH_OP_TOKENS
                refs[key] = (*references(case, op, t_ref, mask, with_op), None)
            except Exception as e:          # the PyTorch op failing must not hide the PTX result
                refs[key] = (references(case, op, t_ref, mask, False)[0], None,
                             f"{type(e).__name__}: {e}")
        ref, mine, err = refs[key]
        torch_error = torch_error or err
        grid, block, smem, kargs = launch_args(launch, t, out, T)
        torch.cuda.synchronize()
        fn(grid, block, kargs, shared_mem=smem)
        cupy.cuda.runtime.deviceSynchronize()
        got = (out["h_out"] if op == spec.OP_UP else out["y"]).float()
        scale = max(1.0, ref.float().abs().max().item())
        finite &= bool(torch.isfinite(got).all())
        errs_ref.append((got - ref.float()).abs().max().item() / scale)
        if mine is not None:
            errs_torch.append((got - mine.float()).abs().max().item() / scale)
        if op == spec.OP_UP:
            masked_zero &= bool((got[~mask.repeat_interleave(case.expert_size, dim=1)] == 0).all())
    tol = TOLERANCE[launch.dtype]
    e_ref, e_torch = max(errs_ref), max(errs_torch) if errs_torch else None
    ok = finite and masked_zero and e_ref <= tol and (e_torch is None or e_torch <= tol)
    return dict(ok=ok, finite=finite, masked_zero=masked_zero, tolerance=tol,
                max_err_ref=e_ref, max_err_torch=e_torch, tokens=list(TOKENS),
                torch_op_error=torch_error)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON")
    ap.add_argument("--dry-run", action="store_true", help="compile and plan only; no GPU")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes for the AOT compiles")
    ap.add_argument("--budget-s", type=float, default=90.0,
                    help="stop launching new kernels after this many seconds (rows left are "
                         "reported as skipped), so the run ends within ~2 minutes")
    args = ap.parse_args(argv)
    t0 = time.time()
    lines = []

    def say(text, **_):
        lines.append(text)
        print(text, flush=True)

    import triton

    native = 90 if args.dry_run else aot.ptx_arch(*torch.cuda.get_device_capability())
    rows = plan(native)
    launches = compile_all(rows, args.workers)
    say(f"compiled {len(rows)} kernels in {time.time() - t0:.1f} s with triton {triton.__version__}, "
          f"{args.workers} processes", flush=True)
    device_name = "none (dry run)"
    if not args.dry_run:
        import cupy

        device_name = torch.cuda.get_device_name()
    say(f"device: {device_name}; torch {torch.__version__}; tokens {TOKENS}; "
          f"errors are max|kernel - x| / max(1, max|reference|)")
    say(f"{'case':14} {'op':13} {'ptx':6} {'dtype':5} {'tac':>3} {'grid@T=130':>14} "
          f"{'block':>5} {'smem':>6} {'hid':>3} {'err/ref':>9} {'err/torch':>9} {'tol':>7}  ok")
    results, modules, refs = [], {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="ptx_check_"))
    for (case, op, arch, dtype, tactic, kw), launch in zip(rows, launches):
        row = {"case": case.name, "op": op, "ptx_target": f"sm_{arch}{'a' if arch == 90 else ''}",
               "dtype": dtype, "tactic": tactic}
        if time.time() - t0 > args.budget_s:
            row.update(ok=None, skipped=f"time budget of {args.budget_s:.0f} s spent")
            results.append(row)
            continue
        if isinstance(launch, str):
            row.update(ok=False, error=f"compile failed: {launch}")
            results.append(row)
            say(f"{case.name:14} {op:13} {row['ptx_target']:6} {dtype:5} {tactic:>3}  "
                  f"ERROR {row['error']}", flush=True)
            continue
        if isinstance(launch, aot.AotRuleError):
            row.update(ok=None, left_out=str(launch))
            results.append(row)
            say(f"{case.name:14} {op:13} {row['ptx_target']:6} {dtype:5} {tactic:>3}  left out "
                  f"of the TensorRT tactics: {launch}")
            continue
        t, _, _, out = make_inputs(case, 130, dtype, "cpu")
        grid, _, _, kargs = launch_args(launch, t, out, 130)
        row.update(kernel=launch.kernel_name, block=launch.block, shared_mem=launch.shared_mem,
                   hidden_pointers=launch.hidden_pointers, n_args=len(kargs),
                   grid=[aot.to_str(g) for g in launch.grid], grid_at_130=list(grid),
                   scalars=[[n, aot.to_str(e)] for n, e in launch.scalars], ok=None)
        if args.dry_run and shutil.which("ptxas"):
            row["ptxas"] = aot.assemble(launch, shutil.which("ptxas"))
        if not args.dry_run:
            key = (launch.kernel_name, hash(launch.ptx))
            try:
                if key not in modules:
                    path = tmp / f"k{len(modules)}.ptx"
                    path.write_text(launch.ptx)
                    modules[key] = cupy.RawModule(path=str(path)).get_function(launch.kernel_name)
                row.update(check(modules[key], case, op, launch, refs))
            except Exception as e:          # record and go on: one table for every kernel
                row.update(ok=False, error=f"{type(e).__name__}: {e}")
                say(f"{case.name:14} {op:13} {row['ptx_target']:6} {dtype:5} {tactic:>3}  "
                      f"ERROR {row['error']}", flush=True)
                results.append(row)
                continue
        results.append(row)
        regs = row.get("ptxas", {}).get("registers", "-")
        err = f"{'regs ' + str(regs):>19} {'-':>7}" if args.dry_run else (
            f"{row['max_err_ref']:9.2e} "
            + (f"{row['max_err_torch']:9.2e}" if row["max_err_torch"] is not None else f"{'-':>9}")
            + f" {row['tolerance']:7.0e}")
        say(f"{case.name:14} {op:13} {row['ptx_target']:6} {dtype:5} {tactic:>3} "
              f"{str(tuple(grid)):>14} {launch.block:>5} {launch.shared_mem:>6} "
              f"{launch.hidden_pointers:>3} {err}  {row['ok']}", flush=True)
    for err in sorted({r["torch_op_error"] for r in results if r.get("torch_op_error")}):
        say(f"note: the PyTorch op failed, rows compared with the reference only: {err}")
    failed = sum(r["ok"] is False for r in results)
    left_out = sum("left_out" in r for r in results)
    skipped = sum("skipped" in r for r in results)
    ok_all = not args.dry_run and failed == 0
    summary = {
        "script": "samples/gpu_ptx_check.py",
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "device": device_name, "dry_run": args.dry_run, "ok": None if args.dry_run else ok_all,
        "checked": len(results) - left_out - skipped, "failed": failed, "left_out": left_out,
        "skipped": skipped,
        "seconds": round(time.time() - t0, 1), "triton": triton.__version__,
        "torch": torch.__version__, "python": platform.python_version(),
        "ptx_version": aot.PTX_VERSION, "tokens": list(TOKENS), "density": DENSITY,
        "rows": results,
    }
    if not args.dry_run:
        summary.update(capability=".".join(map(str, torch.cuda.get_device_capability())),
                       cuda_driver=cupy.cuda.runtime.driverGetVersion(), cupy=cupy.__version__)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    verdict = "dry run" if args.dry_run else ("ALL OK" if ok_all else f"{failed} FAILED")
    say(f"{verdict}: {summary['checked']} kernels checked, {left_out} left out, {skipped} skipped, "
        f"{summary['seconds']} s -> {out_dir / 'gpu_ptx_check.json'}")
    summary["verdict"] = verdict
    (out_dir / "gpu_ptx_check.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "gpu_ptx_check.txt").write_text("\n".join(lines) + "\n")
    return 0 if args.dry_run or ok_all else 1


if __name__ == "__main__":
    sys.exit(main())

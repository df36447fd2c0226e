"""plugins/triton_kernels.py, triton_configs.py, triton_dispatch.py: the Triton kernels
against the reference, on CPU.

Triton decides interpreted-or-compiled when it is imported (TRITON_INTERPRET=1 must be set
before `import triton`), so one process cannot do both, and setting it here would leak into
every other test module of the pytest session. This module therefore runs itself in two
subprocesses: `--interpret` runs every kernel case under Triton's interpreter (fp32 and
fp16; the interpreter's bf16 tl.dot is broken) and `--aot` compiles every default config
ahead of time for sm_80 / sm_90 as trt_plugins/ does and assembles the PTX with the ptxas
Triton ships (the test fails when it is missing). Each
prints JSON; the tests below assert on it, one test per case.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and {"--interpret", "--interpret-real"} & set(sys.argv):
    os.environ["TRITON_INTERPRET"] = "1"   # before torch/triton are imported

import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from lte_convert.plugins.reference import (  # noqa: E402
    sparse_ffn_down_reference, sparse_ffn_reference, sparse_ffn_up_reference)
from lte_convert.plugins.triton_configs import LaunchConfig, launch_config  # noqa: E402
from tests.plugins.triton_problems import problem, rel  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# Both sides accumulate in fp32 and round h and y once (plugins/spec.py), so in fp16 they
# differ by about one rounding: the unit roundoff u = 2^-11 bounds the relative error.
TOL = {"fp32": 1e-5, "fp16": 2.0 ** -11}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# The kernel paths (GEMV for one token, tl.dot for blocks of tokens) with block sizes that do
# not divide the problem: row blocks spanning or splitting experts, ragged token blocks.
# "compact" walks the active experts only, reading the mask 4 experts at a time (several
# pieces per token); "gemv" walks every row.
PATHS = {  # (block_t, block_f, block_d, num_warps[, num_stages, compact]) for up, then down
    "gemv": ((1, 8, 16, 2), (1, 32, 16, 2)),
    "compact": ((1, 8, 16, 2), (1, 32, 16, 2, 1, 4)),
    "dot": ((16, 32, 16, 2), (16, 32, 16, 2)),
}
CASES = [  # T, d, F, s, gated, bias, activation, masks
    (1, 40, 96, 32, True, False, "silu", "per_token"),
    (1, 40, 96, 16, True, True, "silu", "off"),
    (2, 24, 64, 16, False, True, "relu", "on"),
    (3, 40, 96, 32, True, True, "gelu", "one"),
    (17, 72, 48, 8, False, False, "gelu_tanh", "per_token"),
    (5, 33, 64, 32, True, True, "silu", "per_token"),
]
KERNEL_IDS = [f"T{c[0]}-d{c[1]}-F{c[2]}-s{c[3]}-{c[6]}-{c[7]}-{p}-{dt}"
              for c in CASES for p in sorted(PATHS) for dt in ("fp32", "fp16")]
# sparse_ffn with its own dispatch (one token: both kernels; a few: up kernel + matmul;
# from tuning().dense_min_tokens (17) on: matmuls + the fused act·up·mask kernel), fp32; "paired":
# W_gate and W_up in one [2, F, d] storage (one GEMM for both from 17 tokens on).
WHOLE_OP = [(1, True, True, "silu", False), (4, True, True, "silu", False),
            (20, True, True, "silu", False), (3, False, True, "gelu", False),
            (17, False, True, "gelu_tanh", False), (40, True, False, "relu", False),
            (1, True, False, "silu", True), (20, True, False, "silu", True),
            (33, True, True, "gelu", True)]
WHOLE_OP_IDS = [f"T{T}-{'gated' if g else 'plain'}{'-bias' if b else ''}-{a}"
                f"{'-paired' if p else ''}-{dt}" for T, g, b, a, p in WHOLE_OP
                for dt in ("fp32", "fp16")]
AOT_T = (1, 16, 64, 4096)         # one T per launch_config bucket
AOT_IDS = [f"{op}-{dt}-sm{arch}" for op in ("up", "down")   # fp16 compiles like bf16
           for dt, arch in (("bf16", 80), ("bf16", 90), ("fp16", 90), ("fp32", 80), ("fp32", 90))]


# ---------------------------------------------------------------------------------------
# What the subprocesses run
# ---------------------------------------------------------------------------------------
def _kernel_case(tk, case, path, dt):
    T, d, F, s, gated, bias, act, masks = case
    dtype = DTYPES[dt]
    p = problem(T, d, F, s, gated, bias, dtype, masks, seed=sum(case[:4]))
    up_cfg, down_cfg = (LaunchConfig(op, *c) for op, c in zip(("up", "down"), PATHS[path]))
    h = tk.sparse_ffn_up(p["x"], p["mask"], p["w_gate"], p["w_up"], p["b_gate"], p["b_up"],
                         expert_size=s, activation=act, gated=gated, config=up_cfg)
    h_ref = sparse_ffn_up_reference(p["x"], p["mask"], p["w_gate"], p["w_up"], p["b_gate"],
                                    p["b_up"], s, act, gated)
    skipped = ~p["mask"].repeat_interleave(s, dim=1)
    # down gets an h with values where the mask is off too: it must ignore them.
    h_in = torch.randn(T, F, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = tk.sparse_ffn_down(h_in, p["mask"], p["w_down_t"], p["b_down"], expert_size=s,
                           config=down_cfg)
    y_ref = sparse_ffn_down_reference(h_in, p["mask"], p["w_down_t"], p["b_down"], s)
    return {"h_meta": [str(h.dtype), list(h.shape)], "y_meta": [str(y.dtype), list(y.shape)],
            "expected_meta": [str(dtype), [T, F], [T, d]],
            "h_skipped_zero": bool((h[skipped] == 0).all()),
            "h_rel": rel(h, h_ref) if masks != "off" else 0.0,
            "y_zero": bool((y == 0).all()),
            "y_rel": rel(y, y_ref) if masks != "off" or bias else 0.0}


def _run_interpret():
    import lte_convert.plugins.triton_dispatch as tk

    out = {}
    jobs = [(i, lambda c=c, p=p, dt=dt: _kernel_case(tk, c, p, dt))
            for i, (c, p, dt) in zip(KERNEL_IDS, ((c, p, dt) for c in CASES
                                                   for p in sorted(PATHS)
                                                   for dt in ("fp32", "fp16")))]
    whole_cases = [(*c, dt) for c in WHOLE_OP for dt in ("fp32", "fp16")]
    for name, (T, gated, bias, act, paired, dt) in zip(WHOLE_OP_IDS, whole_cases):
        def whole(T=T, gated=gated, bias=bias, act=act, paired=paired, dt=dt):
            p = problem(T, 48, 128, 32, gated, bias, DTYPES[dt], "per_token", seed=T)
            if paired:
                p["w_gate"], p["w_up"] = torch.stack([p["w_gate"], p["w_up"]])
            y = tk.sparse_ffn(p["x"], p["mask"], p["w_gate"], p["w_up"], p["w_down_t"],
                              p["b_gate"], p["b_up"], p["b_down"], expert_size=32,
                              activation=act)
            return {"rel": rel(y, sparse_ffn_reference(**p, expert_size=32, activation=act))}
        jobs.append((f"whole-{name}", whole))
    for name, job in jobs:
        try:
            out[name] = job()
        except Exception:
            out[name] = {"error": traceback.format_exc()}
    return out


def _run_aot():
    import triton
    from triton.backends.compiler import GPUTarget

    from lte_convert.plugins.triton_kernels import ast_source

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in AOT_IDS:
            op, dt, arch = name.split("-")
            arch = int(arch[2:])
            res = out[name] = {"configs": []}
            try:
                for T in AOT_T:
                    cfg = launch_config(op, T, 4096, 11008, 32, DTYPES[dt])
                    src = ast_source(op, DTYPES[dt], cfg, expert_size=32)
                    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                       options={"num_warps": cfg.num_warps,
                                                "num_stages": cfg.num_stages, "ptx_version": 80})
                    md = k.metadata
                    ptx = k.asm["ptx"]
                    entry = {"T": T, "shared": md.shared,
                             "global_scratch": getattr(md, "global_scratch_size", 0),
                             "profile_scratch": getattr(md, "profile_scratch_size", 0),
                             "entry": f".entry {md.name}(" in ptx, "ptxas": None}
                    if T == 1:
                        ptxas = bundled_ptxas(arch)
                        path = Path(tmp) / f"{name}-{T}.ptx"
                        path.write_text(ptx)
                        gpu = "sm_90a" if arch == 90 else "sm_80"
                        r = subprocess.run([ptxas, f"-arch={gpu}", str(path), "-o",
                                            str(path.with_suffix(".o"))],
                                           capture_output=True, text=True)
                        entry["ptxas"] = r.returncode == 0 or r.stderr
                    res["configs"].append(entry)
            except Exception:
                res["error"] = traceback.format_exc()
    return out


def bundled_ptxas(arch: int) -> str:
    """The ptxas Triton ships for `arch` (what its own compiler assembles with)."""
    from triton.backends.nvidia.compiler import get_ptxas

    path = get_ptxas(arch).path
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"Triton's bundled ptxas for sm_{arch} is missing ({path!r})")
    return path


REAL_SHAPES = {"llama2-7b": (4096, 11008, 32), "smollm2": (576, 1536, 32)}


def _run_interpret_real():
    """One token through the default launch configs at real shapes (LLaMA2-7B's is ≈3 min
    under the interpreter), outputs NaN-poisoned first; fp32 and fp16."""
    import lte_convert.plugins.triton_dispatch as tk

    out = {}
    for name, (d, F, s) in REAL_SHAPES.items():
        for dt in ("fp32", "fp16"):
            p = problem(1, d, F, s, True, False, DTYPES[dt], "per_token", seed=d)
            h = torch.full((1, F), float("nan"), dtype=DTYPES[dt])
            tk.sparse_ffn_up(p["x"], p["mask"], p["w_gate"], p["w_up"], None, None,
                             expert_size=s, activation="silu", gated=True, out=h)
            h_ref = sparse_ffn_up_reference(p["x"], p["mask"], p["w_gate"], p["w_up"], None,
                                            None, s, "silu", True)
            y = torch.full((1, d), float("nan"), dtype=DTYPES[dt])
            tk.sparse_ffn_down(h_ref, p["mask"], p["w_down_t"], None, expert_size=s, out=y)
            y_ref = sparse_ffn_down_reference(h_ref, p["mask"], p["w_down_t"], None, s)
            out[f"{name}-{dt}"] = {"h_rel": rel(h, h_ref), "y_rel": rel(y, y_ref),
                                   "compact": launch_config("down", 1, d, F, s,
                                                            DTYPES[dt]).compact}
    return out


def _subprocess(flag):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, __file__, flag], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"{flag} subprocess failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------
pytestmark = pytest.mark.skipif(
    __name__ != "__main__" and __import__("importlib").util.find_spec("triton") is None,
    reason="triton is not installed (pip install triton)")


@pytest.fixture(scope="module")
def interpreted():
    return _subprocess("--interpret")


@pytest.fixture(scope="module")
def aot():
    return _subprocess("--aot")


@pytest.mark.slow
def test_default_configs_at_real_shapes_under_the_interpreter():
    """The one-token configs the GPU runs (compact down) at LLaMA2-7B and SmolLM2 shapes."""
    res = _subprocess("--interpret-real")
    assert set(res) == {f"{n}-{dt}" for n in REAL_SHAPES for dt in ("fp32", "fp16")}
    for name, r in res.items():
        tol = TOL[name.rsplit("-", 1)[1]]
        assert r["h_rel"] <= tol and r["y_rel"] <= tol and r["compact"] > 0, (name, r)


@pytest.mark.parametrize("case_id", KERNEL_IDS)
def test_up_and_down_match_reference(interpreted, case_id):
    r = interpreted[case_id]
    assert "error" not in r, r.get("error")
    dt, T_F, T_d = r["expected_meta"]
    assert r["h_meta"] == [dt, T_F] and r["y_meta"] == [dt, T_d]
    assert r["h_skipped_zero"], "skipped experts must give exactly 0 in h"
    tol = TOL[case_id.rsplit("-", 1)[1]]
    assert r["h_rel"] <= tol, r
    assert r["y_rel"] <= tol, r
    if (case_id.endswith(("off-gemv-fp32", "off-compact-fp32", "off-dot-fp32"))
            and "-d40-F96-s16-" not in case_id):
        assert r["y_zero"]


@pytest.mark.parametrize("name", WHOLE_OP_IDS)
def test_whole_op_dispatch_matches_reference(interpreted, name):
    r = interpreted[f"whole-{name}"]
    assert "error" not in r, r.get("error")
    assert r["rel"] <= TOL[name.rsplit("-", 1)[1]], r


@pytest.mark.parametrize("name", AOT_IDS)
def test_aot_compile_fits_plugin_rules(aot, name):
    r = aot[name]
    assert "error" not in r, r.get("error")
    for c in r["configs"]:
        assert c["entry"], c
        assert c["shared"] < 48 * 1024, c
        assert c["global_scratch"] == 0 and c["profile_scratch"] == 0, c
        assert c["ptxas"] is True or c["T"] != 1, c


def test_one_token_down_walks_active_experts_when_the_expert_size_allows():
    assert launch_config("down", 1, 4096, 11008, 32).compact == 512    # 344 experts
    assert launch_config("down", 1, 576, 1536, 32).compact == 64       # 48 experts
    assert launch_config("down", 1, 4096, 28672, 32).compact == 512    # 896: two pieces
    assert launch_config("down", 1, 4096, 11008 * 3, 96).compact == 0  # 96 not a power of 2
    assert launch_config("down", 16, 4096, 11008, 32).compact == 0
    assert "COMPACT" in launch_config("down", 1, 4096, 11008, 32).constexprs()
    assert "COMPACT" not in launch_config("up", 1, 4096, 11008, 32).constexprs()


def test_the_machine_tuned_configs_can_be_replaced():
    from dataclasses import replace

    from lte_convert.plugins import triton_configs

    assert triton_configs.tuning() is triton_configs.H200 and "H200" in triton_configs.H200.machine
    mine = LaunchConfig("up", 1, 8, 128, 2)
    other = replace(triton_configs.H200, machine="test GPU",
                    buckets=((1, mine, triton_configs.H200.buckets[0][2]),
                             *triton_configs.H200.buckets[1:]))
    before = launch_config("up", 1, 4096, 11008, 32)
    try:
        triton_configs.set_tuning(other)
        assert launch_config("up", 1, 4096, 11008, 32) == mine
        assert launch_config("up", 16, 4096, 11008, 32).block_t == 16
    finally:
        triton_configs.set_tuning(triton_configs.H200)
    assert launch_config("up", 1, 4096, 11008, 32) == before != mine


def test_launchers_reject_bad_inputs_with_the_shapes():
    from lte_convert.plugins import triton_dispatch

    p = problem(2, 16, 32, 16, True, False, torch.float32, "on", seed=0)
    with pytest.raises(ValueError, match=r"mask must be a contiguous bool tensor of shape "
                                         r"\(2, 2\), got torch.bool \(2, 3\)"):
        triton_dispatch.sparse_ffn_up(p["x"], torch.ones(2, 3, dtype=torch.bool), p["w_gate"],
                                      p["w_up"], None, None, expert_size=16, activation="silu",
                                      gated=True)
    with pytest.raises(ValueError, match=r"h must be a contiguous torch.float32 tensor "
                                         r"of shape \(2, 32\), got torch.float16 \(2, 32\)"):
        triton_dispatch.sparse_ffn_down(torch.zeros(2, 32, dtype=torch.float16), p["mask"],
                                        p["w_down_t"], None, expert_size=16)
    with pytest.raises(ValueError, match=r"compact a power of two >= block_f / expert_size "
                                         r"\(got 3\)"):
        triton_dispatch.sparse_ffn_down(torch.zeros(1, 32), p["mask"][:1], p["w_down_t"], None,
                                        expert_size=16, config=LaunchConfig("down", 1, 32, 16, 2,
                                                                            1, 3))


if __name__ == "__main__":
    runs = {"--interpret": _run_interpret, "--interpret-real": _run_interpret_real,
            "--aot": _run_aot}
    print(json.dumps(runs[sys.argv[1]]()))

"""samples/gpu_bench.py without a GPU: the overhead section's raw Triton launches pass the
kernels the arguments the launchers do (run under Triton's interpreter in a subprocess, as
tests/plugins/test_triton_kernels.py explains)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
SNIPPET = """
import torch
from samples import gpu_bench as gb
from lte_convert.plugins.reference import sparse_ffn_reference
gb.DEV, gb.DTYPE = "cpu", torch.float32
d, F, s = gb.OVERHEAD_SHAPE
w = gb.weights(d, F)
x = torch.randn(1, d)
mask = gb.random_mask(1, F // s, 0.5, 0)
y = gb.raw_launches(x, mask, w, s)()
ref = sparse_ffn_reference(x, mask, w["w_gate"], w["w_up"], w["w_down_t"], None, None, None,
                           s, "silu")
print(gb.rel_err(y, ref), int(mask.sum()), F // s)
"""


def test_raw_launches_match_the_reference_op():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", SNIPPET], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rel, active, experts = out.stdout.split()
    assert float(rel) <= 1e-5
    assert int(active) == int(experts) // 2

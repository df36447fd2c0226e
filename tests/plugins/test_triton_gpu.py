"""The Triton kernels and the op's dispatch (plugins/triton_dispatch.py) on a CUDA GPU against
plugins/reference.py: the device correctness check, `pytest -m gpu` (results/gpu.md's
prepared checks run it first).

Shapes (LLaMA2-7B, SmolLM2, BERT-like, d=1000), dtypes (bf16, fp16, fp32), gated or not,
biases, every activation, expert sizes 16/32/64, token counts 1…300 and masks (all off, all
on, one expert, per token). Every kernel output is poisoned with NaN first, so an element a
kernel forgets to write fails; the down kernel gets an h with values where the mask is off
(it must ignore them). A CUDA graph is replayed after the mask changed in place (the mask is
read on the device). Tolerance: relative error ≤ 1e-2 in bf16/fp16, ≤ 1e-5 in fp32; the whole
op (its own dispatch) 2x that.
"""
from __future__ import annotations

import pytest
import torch

from lte_convert.plugins.reference import sparse_ffn_down_reference, sparse_ffn_up_reference
from tests.plugins.triton_problems import problem, rel

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU: the Triton kernels run on the device "
                                        "(tests/plugins/test_triton_kernels.py checks them on "
                                        "CPU under Triton's interpreter)")]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
SHAPES = [  # (d, F, expert size, gated, bias, activation, dtype, token counts, masks)
    (4096, 11008, 32, True, False, "silu", torch.bfloat16, (1, 3, 16, 64, 300),
     ("off", "on", "one", "per_token")),
    (576, 1536, 32, True, False, "silu", torch.bfloat16, (1, 5, 40, 257), ("per_token", "on")),
    (576, 1536, 32, True, False, "silu", torch.float16, (1, 16, 100), ("per_token", "one")),
    (768, 3072, 32, False, True, "gelu", torch.float16, (1, 7, 70), ("per_token", "on")),
    (1000, 2048, 64, True, True, "gelu_tanh", torch.bfloat16, (1, 9, 33), ("per_token",)),
    (256, 512, 16, False, False, "relu", torch.float32, (1, 4, 20, 65), ("per_token", "on")),
    (4096, 11008, 32, True, True, "silu", torch.float32, (1, 17), ("per_token",)),
]
CASES = [(d, F, s, gated, bias, act, dtype, T, masks)
         for d, F, s, gated, bias, act, dtype, Ts, kinds in SHAPES for T in Ts for masks in kinds]
IDS = [f"d{d}-F{F}-s{s}-{'gated' if g else 'plain'}{'-bias' if b else ''}-{a}-"
       f"{str(dt)[6:]}-T{T}-{m}" for d, F, s, g, b, a, dt, T, m in CASES]


@pytest.fixture(scope="module")
def tk():
    pytest.importorskip("triton")
    from lte_convert.plugins import triton_dispatch
    return triton_dispatch


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernels_and_op_match_reference(tk, case):
    d, F, s, gated, bias, act, dtype, T, masks = case
    seed = CASES.index(case)
    p = problem(T, d, F, s, gated, bias, dtype, masks, seed, device="cuda",
                paired=gated and seed % 2 == 0)
    x, mask = p["x"], p["mask"]
    h = torch.full((T, F), float("nan"), dtype=dtype, device="cuda")
    tk.sparse_ffn_up(x, mask, p["w_gate"], p["w_up"], p["b_gate"], p["b_up"], expert_size=s,
                     activation=act, gated=gated, out=h)
    h_ref = sparse_ffn_up_reference(x, mask, p["w_gate"], p["w_up"], p["b_gate"], p["b_up"], s,
                                    act, gated)
    h_in = torch.randn(T, F, device="cuda",
                       generator=torch.Generator("cuda").manual_seed(seed)).to(dtype)
    y = torch.full((T, d), float("nan"), dtype=dtype, device="cuda")
    tk.sparse_ffn_down(h_in, mask, p["w_down_t"], p["b_down"], expert_size=s, out=y)
    y_ref = sparse_ffn_down_reference(h_in, mask, p["w_down_t"], p["b_down"], s)
    y_op = tk.sparse_ffn(x, mask, p["w_gate"], p["w_up"], p["w_down_t"], p["b_gate"], p["b_up"],
                         p["b_down"], expert_size=s, activation=act)
    y_op_ref = sparse_ffn_down_reference(h_ref, mask, p["w_down_t"], p["b_down"], s)

    assert (h[~mask.repeat_interleave(s, dim=1)] == 0).all(), "skipped experts' h is not 0"
    tol = TOL[dtype]
    if masks == "off":
        assert (h == 0).all()
    else:
        assert rel(h, h_ref) <= tol
    if masks == "off" and not bias:
        assert (y == 0).all() and (y_op == 0).all()
    else:
        assert rel(y, y_ref) <= tol
        assert rel(y_op, y_op_ref) <= 2 * tol


def test_cuda_graph_reads_the_mask_on_device(tk):
    d, F, s = 576, 1536, 32
    p = problem(2, d, F, s, True, False, torch.bfloat16, "per_token", 5, device="cuda",
                paired=True)
    x, mask = p["x"], p["mask"]

    def op():
        return tk.sparse_ffn(x, mask, p["w_gate"], p["w_up"], p["w_down_t"], None, None, None,
                             expert_size=s, activation="silu")
    op()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = op()
    for seed in (6, 7):
        mask.copy_(problem(2, d, F, s, True, False, torch.bfloat16, "per_token", seed,
                           device="cuda")["mask"])
        graph.replay()
        torch.cuda.synchronize()
        ref = sparse_ffn_down_reference(
            sparse_ffn_up_reference(x, mask, p["w_gate"], p["w_up"], None, None, s, "silu",
                                    True), mask, p["w_down_t"], None, s)
        assert rel(y, ref) <= 1e-2

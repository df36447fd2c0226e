"""plugins/ops.py: the lte custom ops (opcheck, torch.compile, autograd, CUDA when present),
the entry point LTE modules call, and the errors bad inputs get."""
import pytest
import torch
from torch.library import opcheck

import lte_convert.plugins  # noqa: F401  (registers torch.ops.lte)
from lte_convert.plugins import ops
from lte_convert.plugins.reference import (sparse_ffn_down_reference, sparse_ffn_reference,
                               sparse_ffn_up_reference)
from lte_convert.plugins.spec import FFNShape

D, F, S = 24, 96, 16
E = F // S


def weights(gated=True, bias=True, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
    return [r(F, D) if gated else None, r(F, D), r(F, D), r(F) if gated and bias else None,
            r(F) if bias else None, r(D) if bias else None]


def inputs(lead=(2, 3), seed=1, **kw):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, D, generator=g)
    mask = torch.rand(*lead, E, generator=g) < 0.5
    return x, mask, weights(**kw)


@pytest.mark.parametrize("gated,bias", [(True, True), (True, False), (False, True)])
def test_opcheck_all_ops(gated, bias):
    x, mask, (wg, wu, wd, bg, bu, bd) = inputs(gated=gated, bias=bias)
    opcheck(torch.ops.lte.sparse_ffn, (x, mask, wg, wu, wd, bg, bu, bd, S, "silu"))
    opcheck(torch.ops.lte.sparse_ffn_up, (x, mask, wg, wu, bg, bu, S, "gelu"))
    h = torch.randn(2, 3, F)
    opcheck(torch.ops.lte.sparse_ffn_down, (h, mask, wd, bd, S))


def test_ops_match_reference():
    x, mask, (wg, wu, wd, bg, bu, bd) = inputs()
    y = torch.ops.lte.sparse_ffn(x, mask, wg, wu, wd, bg, bu, bd, S, "silu")
    torch.testing.assert_close(
        y, sparse_ffn_reference(x, mask, wg, wu, wd, bg, bu, bd, S, "silu"), rtol=1e-5, atol=1e-5)
    h = torch.ops.lte.sparse_ffn_up(x, mask, wg, wu, bg, bu, S, "relu")
    torch.testing.assert_close(
        h, sparse_ffn_up_reference(x, mask, wg, wu, bg, bu, S, "relu", True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        torch.ops.lte.sparse_ffn_down(h, mask, wd, bd, S),
        sparse_ffn_down_reference(h, mask, wd, bd, S), rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph():
    x, mask, w = inputs()
    shape = FFNShape(d=D, d_ff=F, expert_size=S, activation="silu", gated=True)

    def f(x, mask):
        return ops.sparse_ffn(x * 2, mask, *w, shape) + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, mask), f(x, mask))
    x2, mask2, _ = inputs(lead=(5,), seed=3)                       # new shape: recompiles
    torch.testing.assert_close(compiled(x2, mask2), f(x2, mask2))


def test_torch_compile_inductor():
    x, mask, w = inputs()
    fn = torch.compile(lambda x, m: torch.ops.lte.sparse_ffn(x, m, *w, S, "silu"),
                       fullgraph=True)
    torch.testing.assert_close(fn(x, mask),
                               sparse_ffn_reference(x, mask, *w, S, "silu"), rtol=1e-5, atol=1e-5)


def test_autograd_matches_reference():
    x, mask, w = inputs()
    x.requires_grad_()
    for t in w:
        t.requires_grad_()
    leaves = [x, w[0], w[1], w[2], w[3], w[4], w[5]]
    g = torch.autograd.grad(torch.ops.lte.sparse_ffn(x, mask, *w, S, "silu").square().sum(),
                            leaves)
    g_ref = torch.autograd.grad(sparse_ffn_reference(x, mask, *w, S, "silu").square().sum(),
                                leaves)
    for a, b in zip(g, g_ref):                  # gradients reach 3e5: relative to the norm
        assert float((a - b).norm() / b.norm()) <= 1e-5


def test_entry_point_runs_the_op_and_checks_gating():
    x, mask, w = inputs()
    shape = FFNShape(d=D, d_ff=F, expert_size=S, activation="silu", gated=True)
    torch.testing.assert_close(ops.sparse_ffn(x, mask, *w, shape),
                               torch.ops.lte.sparse_ffn(x, mask, *w, S, "silu"))
    with pytest.raises(ValueError, match="shape says gated=False but w_gate is given"):
        ops.sparse_ffn(x, mask, *w, FFNShape(D, F, S, "silu", gated=False))


def test_torch_export_keeps_the_op_and_computes_it():
    """torch.export keeps lte.sparse_ffn as one op (no ONNX placeholder): the exported program
    computes what eager PyTorch computes."""
    x, mask, w = inputs(lead=(3,))
    shape = FFNShape(d=D, d_ff=F, expert_size=S, activation="silu", gated=True)

    class M(torch.nn.Module):
        def forward(self, x, mask):
            return ops.sparse_ffn(x, mask, *w, shape)

    program = torch.export.export(M(), (x, mask))
    assert "lte.sparse_ffn" in str(program.graph) and "SparseFFN" not in str(program.graph)
    out = program.module()(x, mask)
    assert out.abs().max() > 0
    torch.testing.assert_close(out, M()(x, mask))


# ---------------------------------------------------------------------------------------------
# Bad inputs: a ValueError naming what was expected and what was given
# ---------------------------------------------------------------------------------------------
def _call(x, mask, w, act="silu", s=S):
    return torch.ops.lte.sparse_ffn(x, mask, *w, s, act)


def test_error_wrong_dtype():
    x, mask, w = inputs()
    with pytest.raises(ValueError, match=r"x has dtype torch.float64; expected one of"):
        _call(x.double(), mask, w)
    w_bf = list(w)
    w_bf[1] = w[1].bfloat16()
    with pytest.raises(ValueError, match=r"w_up has dtype torch.bfloat16 but x has torch.float32"):
        _call(x, mask, w_bf)
    with pytest.raises(ValueError, match=r"mask has dtype torch.int64; expected torch.bool"):
        _call(x, mask.long(), w)


def test_error_wrong_expert_count():
    x, mask, w = inputs()
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3, 5\); expected \(2, 3, 6\)"):
        _call(x, mask[..., :5], w)
    with pytest.raises(ValueError, match=r"w_up has 96 rows, not a multiple of expert_size=7"):
        _call(x, mask, w, s=7)


def test_error_mismatched_shapes():
    x, mask, w = inputs()
    with pytest.raises(ValueError, match=r"mask has shape \(3, 2, 6\); expected \(2, 3, 6\)"):
        _call(x, mask.transpose(0, 1).contiguous(), w)
    with pytest.raises(ValueError, match=r"w_gate has shape \(96, 25\); expected \(96, 24\)"):
        _call(x, mask, [torch.randn(F, D + 1)] + w[1:])
    with pytest.raises(ValueError, match=r"b_down has shape \(23,\); expected \(24,\)"):
        _call(x, mask, w[:5] + [torch.randn(D - 1)])


def test_error_transposed_w_down():
    x, mask, w = inputs()
    w_t = w[:2] + [w[2].t().contiguous()] + w[3:]
    with pytest.raises(ValueError, match=r"w_down_t has shape \(24, 96\); expected \(96, 24\) "
                                         r"\(W_down must be stored transposed"):
        _call(x, mask, w_t)
    h = torch.randn(2, 3, F)
    with pytest.raises(ValueError, match=r"w_down_t has shape|h has shape"):
        torch.ops.lte.sparse_ffn_down(h, mask, w[2].t().contiguous(), None, S)


def test_error_non_contiguous_weights():
    x, mask, w = inputs()
    w_nc = [torch.randn(D, F).t()] + w[1:]                       # right shape, wrong layout
    with pytest.raises(ValueError, match=r"w_gate is not contiguous"):
        _call(x, mask, w_nc)


def test_error_unknown_activation():
    x, mask, w = inputs()
    with pytest.raises(ValueError, match=r"activation 'swish' is not supported; expected one of "
                                         r"silu, gelu, gelu_tanh, relu"):
        _call(x, mask, w, act="swish")


def test_non_contiguous_x_and_mask_are_fine():
    x, mask, w = inputs(lead=(4, 3))
    xt, mt = x.transpose(0, 1), mask.transpose(0, 1)
    torch.testing.assert_close(_call(xt, mt, w), sparse_ffn_reference(xt, mt, *w, S, "silu"),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_cuda_matches_reference(tokens):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, D, generator=g).bfloat16().cuda()
    mask = (torch.rand(tokens, E, generator=g) < 0.5).cuda()
    w = weights(dtype=torch.bfloat16, device="cuda")
    y = torch.ops.lte.sparse_ffn(x, mask, *w, S, "silu")
    ref = sparse_ffn_reference(x, mask, *w, S, "silu")
    assert float((y.float() - ref.float()).norm() / ref.float().norm()) <= 1e-2


# ---------------------------------------------------------------------------------------------
# Wiring: a converted, folded model runs its FFNs through the op
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_folded_model_generate_runs_the_op(family):
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode

    from lte_convert.converter.checkpoint import fold
    from lte_convert.converter.surgery import convert_model, lte_modules, set_mode
    from tests.tiny_models import random_ids, tiny_model

    model = convert_model(tiny_model(family)[0], expert_size=8)
    hard = copy.deepcopy(model)
    set_mode(hard, "hard")                      # σ(z) > τ on the unfolded routers, masked dense
    fold(model)                                 # z' > 0 with the same selection, through the op
    ids = random_ids(batch=2, seq=6)

    class Calls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Calls.count += func is torch.ops.lte.sparse_ffn.default
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Calls():
        out = model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    n_layers = len(lte_modules(model))
    assert Calls.count == n_layers * 3          # every layer, prefill + 2 decode steps
    with torch.no_grad():
        torch.testing.assert_close(model(out).logits, hard(out).logits, rtol=1e-4, atol=1e-4)


def test_folded_model_compiled_static_cache_generate_matches_eager():
    """CUDA-graph decoding (docs/kernels.md): on CUDA, generate(cache_implementation="static")
    compiles the forward by itself (mode "reduce-overhead"). The same path, forced on CPU
    with a full graph, traces the op and gives the eager tokens."""
    from transformers import CompileConfig

    from lte_convert.converter.checkpoint import fold
    from lte_convert.converter.surgery import convert_model
    from tests.tiny_models import random_ids, tiny_model

    model = convert_model(tiny_model("llama")[0], expert_size=8).eval()
    fold(model, [0.0] * len(model.model.layers))
    ids = random_ids(batch=1, seq=6)
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True          # transformers compiles on CUDA only
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             cache_implementation="static", compile_config=compile_config)
    assert torch.equal(out, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1   # it did compile


# ---------------------------------------------------------------------------------------------
# `lte-convert bench` (lte_convert/commands/bench.py over plugins/bench.py): runs, writes its JSON
# ---------------------------------------------------------------------------------------------
def test_bench_command_writes_json(tmp_path, capsys):
    import json

    from click.testing import CliRunner

    from lte_convert.commands.bench import bench
    out = tmp_path / "b.json"
    result = CliRunner().invoke(bench, ["--shapes", "smollm2", "--tokens", "1,3", "--sparsity",
                                        "0,0.75", "--layers", "2", "--reps", "2", "--device",
                                        "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["tokens"], r["sparsity"]) for r in rows] == [(1, 0.0), (1, 0.75), (3, 0.0),
                                                            (3, 0.75)]
    for r in rows:
        assert r["dense_ms"] > 0 and r["sparse_ms"] > 0 and 0 < r["union_density"] <= 1
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["sparse_ms"])
    assert rows[0]["union_density"] == 1.0 and rows[1]["union_density"] < 0.5
    assert all(r["gate_up_paired"] for r in rows)
    result = CliRunner().invoke(bench, ["--shapes", "smollm2", "--tokens", "1", "--sparsity",
                                        "0.5", "--layers", "2", "--reps", "1", "--device",
                                        "cpu", "--unpaired", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["rows"][0]["gate_up_paired"] is False


def test_bench_command_unknown_shape_is_a_user_error():
    from lte_convert.cli import main
    with pytest.raises(SystemExit) as e:
        main(["bench", "--shapes", "gpt5", "--device", "cpu"])
    assert e.value.code == 2

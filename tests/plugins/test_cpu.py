"""plugins/cpu.py against the reference: every mask pattern, gated or not, biases or not,
fp32 and bf16, odd sizes and ragged batches; and proof that skipped experts are not read."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lte_convert.plugins import cpu, cpu_plan, cpu_tuning
from lte_convert.plugins.reference import (sparse_ffn_down_reference, sparse_ffn_reference,
                               sparse_ffn_up_reference)
from lte_convert.plugins.spec import ACTIVATIONS

# The rule (plugins/spec.py): fp32 accumulation, h rounded once, y rounded once. Against the
# reference that leaves, in fp16/bf16, each element of h within one rounding (2u·|h|, u the
# unit roundoff; plus a floor of fp32 summation-order noise) and y within u in norm.
U = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
TOL = {torch.float32: 1e-5, torch.float16: U[torch.float16], torch.bfloat16: U[torch.bfloat16]}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def one_rounding(out, ref):
    """Every element within one rounding to ref's dtype of the reference (fp16/bf16)."""
    if ref.dtype == torch.float32:
        return True
    u = U[ref.dtype]
    out, ref = out.float(), ref.float()
    floor = 64 * U[torch.float32] * float(ref.abs().max())
    return bool(((out - ref).abs() <= 2 * u * ref.abs() + floor).all())


def use_constants(monkeypatch, **fields):
    """Plan with cpu_tuning.FALLBACK's fields replaced (calibration is off in the tests)."""
    monkeypatch.setattr(cpu_tuning, "FALLBACK",
                        dataclasses.replace(cpu_tuning.FALLBACK, **fields))
    cpu_tuning.forget()


@pytest.fixture(autouse=True)
def bytes_only_cost_model(monkeypatch):
    """With free calls the cost model always picks the sparse blocks (never merging gaps):
    the tiny test FFNs would otherwise go dense. test_cost_model_choices covers the rest."""
    use_constants(monkeypatch, fp32_call_us=0.0, half_call_us=0.0, plan_us=0.0)
    yield
    cpu_tuning.forget()


def rel_err(out, ref):
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def weights(d, F, gated, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(dtype)  # noqa: E731
    return dict(w_gate=r(F, d) if gated else None, w_up=r(F, d), w_down_t=r(F, d),
                b_gate=r(F) if gated and bias else None, b_up=r(F) if bias else None,
                b_down=r(d) if bias else None)


def make_mask(kind, lead, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "off":
        return torch.zeros(*lead, E, dtype=torch.bool)
    if kind == "on":
        return torch.ones(*lead, E, dtype=torch.bool)
    if kind == "one":
        m = torch.zeros(*lead, E, dtype=torch.bool)
        m[..., E // 2] = True
        return m
    p = {"random": 0.5, "sparse": 0.15, "dense": 0.95}[kind]
    return torch.rand(*lead, E, generator=g) < p


def check_all(x, mask, w, s, act):
    """The whole op, the up half and the down half against the reference."""
    tol = TOL[x.dtype]
    ref = sparse_ffn_reference(x, mask, **w, expert_size=s, activation=act)
    out = cpu.sparse_ffn(x, mask, **w, expert_size=s, activation=act)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) <= tol if ref.norm() > 0 else torch.equal(out, ref)
    gated = w["w_gate"] is not None
    h_ref = sparse_ffn_up_reference(x, mask, w["w_gate"], w["w_up"], w["b_gate"], w["b_up"], s,
                                    act, gated)
    h = cpu.sparse_ffn_up(x, mask, w["w_gate"], w["w_up"], w["b_gate"], w["b_up"], s, act)
    assert h.shape == h_ref.shape
    assert rel_err(h, h_ref) <= tol if h_ref.norm() > 0 else torch.equal(h, h_ref)
    assert one_rounding(h, h_ref), (h - h_ref).abs().max()
    # The down half masks h itself: give it an unmasked h to prove that.
    h_full = torch.randn_like(h_ref)
    y_ref = sparse_ffn_down_reference(h_full, mask, w["w_down_t"], w["b_down"], s)
    y = cpu.sparse_ffn_down(h_full, mask, w["w_down_t"], w["b_down"], s)
    assert rel_err(y, y_ref) <= tol if y_ref.norm() > 0 else torch.equal(y, y_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated,bias", [(True, False), (True, True), (False, True),
                                        (False, False)])
@pytest.mark.parametrize("kind", ["off", "on", "one", "random", "sparse", "dense"])
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3), (1, 1)])
def test_matches_reference(dtype, gated, bias, kind, lead):
    d, F, s = 40, 320, 16
    w = weights(d, F, gated, bias, dtype)
    x = torch.randn(*lead, d).to(dtype)
    check_all(x, make_mask(kind, lead, F // s), w, s, "silu")


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activations(act):
    d, F, s = 33, 96, 8
    w = weights(d, F, True, True, torch.float32)
    x = torch.randn(4, d)
    check_all(x, make_mask("random", (4,), F // s), w, s, act)


def test_real_model_shapes():
    """SmolLM2's FFN (576 / 1536, 48 experts of 32), one token and a small batch."""
    w = weights(576, 1536, True, False, torch.float32)
    for lead in [(1,), (4,)]:
        x = torch.randn(*lead, 576)
        check_all(x, make_mask("random", lead, 48, seed=len(lead)), w, 32, "silu")


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 70), E=st.integers(1, 12), s=st.sampled_from([1, 3, 8, 32]),
       tokens=st.integers(1, 9), p=st.floats(0, 1), gated=st.booleans(), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_hypothesis_shapes(d, E, s, tokens, p, gated, bias, seed):
    w = weights(d, E * s, gated, bias, torch.float32, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g)
    mask = torch.rand(tokens, E, generator=g) < p
    check_all(x, mask, w, s, "gelu")


@pytest.mark.parametrize("tokens", [1, 3])
def test_inactive_experts_are_not_read(tokens):
    """NaN in every expert no token selected: a kernel that read them would return NaN."""
    d, F, s = 24, 256, 16
    E = F // s
    w = weights(d, F, True, True, torch.float32)
    mask = torch.zeros(tokens, E, dtype=torch.bool)
    mask[:, [1, 2, 5, 9]] = True
    mask[0, 12] = True                                    # in the union through token 0 only
    union = mask.any(0).repeat_interleave(s)
    poisoned = {k: v.clone() if v is not None else None for k, v in w.items()}
    for k in ("w_gate", "w_up", "w_down_t"):
        poisoned[k][~union] = float("nan")
    for k in ("b_gate", "b_up"):
        poisoned[k][~union] = float("nan")
    x = torch.randn(tokens, d)
    out = cpu.sparse_ffn(x, mask, **poisoned, expert_size=s, activation="silu")
    ref = sparse_ffn_reference(x, mask, **w, expert_size=s, activation="silu")
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= 1e-5


def test_plan_runs():
    union = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    plans = cpu_plan.blocks(union, 2, (0, 1, 2))
    starts, runs, experts, merged = plans[0]
    assert starts == (0, 6, 12) and runs == (4, 2, 6) and not merged
    assert cpu_plan.rows_of(experts, 2).tolist() == [0, 1, 2, 3, 6, 7, 12, 13, 14, 15, 16, 17]
    assert experts.tolist() == [0, 1, 3, 6, 7, 8]
    starts, runs, experts, merged = plans[1]                            # merges the 1-gap
    assert starts == (0, 12) and runs == (8, 6) and merged
    assert experts.tolist() == [0, 1, 2, 3, 6, 7, 8]
    starts, runs, experts, merged = plans[2]                            # one block
    assert starts == (0,) and runs == (18,)
    assert cpu_plan.rows_of(experts, 2).tolist() == list(range(18))
    starts, runs, experts, _ = cpu_plan.blocks(torch.tensor([False, True, False]), 3)[0]
    assert starts == (3,) and runs == (3,) and cpu_plan.rows_of(experts, 3).tolist() == [3, 4, 5]
    starts, runs, experts, _ = cpu_plan.blocks(torch.zeros(4, dtype=torch.bool), 3)[0]
    assert starts == () and runs == () and experts.numel() == 0


def paired(w):
    """The weights with W_gate and W_up moved into one [2, F, d] storage, as LTEFFN does."""
    pair = torch.stack([w["w_gate"], w["w_up"]])
    return {**w, "w_gate": pair[0], "w_up": pair[1]}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["on", "one", "random", "sparse"])
@pytest.mark.parametrize("lead", [(1,), (2,), (3,), (9,), (160,)])
def test_paired_weights_match_reference(dtype, kind, lead):
    """Paired W_gate/W_up (one bmm per block) and batches up to and past _bmm_batch (the one
    block over every row) against the reference."""
    w = paired(weights(40, 320, True, True, dtype))
    x = torch.randn(*lead, 40).to(dtype)
    check_all(x, make_mask(kind, lead, 20, seed=5), w, 16, "silu")


@pytest.mark.parametrize("calls", ["default", "costly"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["one", "random", "sparse"])
@pytest.mark.parametrize("lead", [(1,), (3,)])
def test_cost_model_choices(calls, dtype, kind, lead, monkeypatch):
    """Default call costs (tiny FFNs go dense) and costly calls (every gap merged)."""
    costly = calls == "costly"
    use_constants(monkeypatch, fp32_call_us=1e6 if costly else 2.0,
                  half_call_us=1e6 if costly else 12.0, plan_us=0.0 if costly else 10.0)
    w = weights(40, 320, True, True, dtype)
    x = torch.randn(*lead, 40).to(dtype)
    check_all(x, make_mask(kind, lead, 40, seed=3), w, 8, "silu")


def fallback(F_, d, dtype=torch.float32):
    return cpu_tuning.Constants().tuning(d, F_, dtype)


def test_gap_cost_model_at_real_shapes():
    """With the fallback constants fp32 never computes a skipped expert at SmolLM2 or
    LLaMA2-7B shapes; bf16 does at SmolLM2's (small rows, costly oneDNN calls), not at 7B's."""
    for F_, d in [(1536, 576), (11008, 4096)]:
        t = fallback(F_, d)
        for up in cpu_plan.UP_KERNELS:
            for bag in (False, True):
                assert cpu_plan.max_gap(t, up, bag, 2, 32) == 0, (F_, up, bag)
    assert cpu_plan.max_gap(fallback(1536, 576, torch.bfloat16), "mm", True, 2, 32) == 3
    assert cpu_plan.max_gap(fallback(11008, 4096, torch.bfloat16), "mm", True, 2, 32) == 0


def test_sparse_path_at_real_shapes():
    """The fallback constants keep the sparse blocks for one fp32 token at SmolLM2 and
    LLaMA2-7B shapes at 50% sparsity, paired or not; a full union is one block (nothing
    merged: only a batch's tokens are masked, each by its own experts) for one token and
    small fp32 batches (n ≤ 2 or n·d ≤ small_nd), dense (None) past them or for bf16
    batches."""
    for F_, d in [(1536, 576), (11008, 4096)]:
        E = F_ // 32
        union = torch.arange(E) % 4 < 2                           # half on, in pairs
        for paired in (False, True):
            plan = cpu_plan.choose(union, 1, F_, d, 32, True, paired, True, fallback(F_, d))
            assert plan.runs == (64,) * (E // 4) and plan.starts == tuple(range(0, F_, 128))
            assert plan.merged is False and plan.up == ("pair" if paired else "halves")
    half = torch.arange(48) % 2 == 0
    bf16 = fallback(1536, 576, torch.bfloat16)
    assert cpu_plan.choose(half, 2, 1536, 576, 32, True, True, False, bf16) is None
    full = torch.ones(48, dtype=torch.bool)
    t = fallback(1536, 576)
    for n in range(1, 11):                                     # 576 wide: up to 10 tokens
        plan = cpu_plan.choose(full, n, 1536, 576, 32, True, False, True, t)
        assert plan.starts == (0,) and plan.runs == (1536,) and plan.merged is False
    assert cpu_plan.choose(full, 11, 1536, 576, 32, True, False, True, t) is None
    full = torch.ones(344, dtype=torch.bool)
    for n, d, one_block in [(2, 4096, True), (4, 4096, False), (4, 1536, True),
                            (4, 2048, False), (8, 576, True), (16, 576, False)]:
        plan = cpu_plan.choose(full, n, 11008, d, 32, True, False, True, fallback(11008, d))
        assert (plan is not None) is one_block, (n, d)
    plan = cpu_plan.choose(full[:48], 1, 1536, 576, 32, True, True, False, bf16)  # one token
    assert plan.starts == (0,) and plan.runs == (1536,) and plan.merged is False

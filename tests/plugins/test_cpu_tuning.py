"""plugins/cpu_tuning.py and the plan it drives (plugins/cpu_plan.py): the plan follows the
measured numbers (the faster of two measured ways wins), the cache file is used only when it
was written for this host and holds well-formed numbers, and calibration can be turned off
or overridden. No timing is asserted: speed is measured by `lte-convert bench`."""
import dataclasses
import json
import math
import threading

import pytest
import torch

from lte_convert.plugins import cpu, cpu_plan, cpu_tuning
from lte_convert.plugins.cpu_plan import Kernel
from lte_convert.plugins.reference import sparse_ffn_reference

SMOL = (576, 1536)                                   # d, F


def tuning(**gbps):
    """The fallback tuning of SmolLM2's shape with some kernels' GB/s replaced."""
    t = cpu_tuning.Constants().tuning(*SMOL, torch.float32)
    row_bytes = SMOL[0] * 4
    for name, rate in gbps.items():
        k = getattr(t, name)
        rows = 2 * SMOL[1] if name == "pair" else SMOL[1]
        row_ns = row_bytes / rate
        t = dataclasses.replace(t, **{name: Kernel(k.call_us, row_ns,
                                                   k.call_us + rows * row_ns * 1e-3)})
    return t


@pytest.fixture
def calibrating(tmp_path, monkeypatch):
    """Calibration on, the cache in tmp_path, measure() replaced by a counter that returns
    a known tuning (the real measurement is exercised by test_measure_smoke)."""
    monkeypatch.setenv("LTE_CONVERT_CACHE", str(tmp_path))
    monkeypatch.setenv(cpu_tuning.ENV_CALIBRATE, "1")
    calls = []

    def fake_measure(d, F_, dtype, reps=None):
        calls.append((d, F_, dtype))
        return dataclasses.replace(tuning(), source=f"measured #{len(calls)}")
    monkeypatch.setattr(cpu_tuning, "measure", fake_measure)
    cpu_tuning.forget()
    yield calls
    cpu_tuning.forget()


def half_union(E=48):
    return torch.arange(E) % 4 < 2                    # half on, in runs of two experts


# ---------------------------------------------------------------------------------------
# The plan follows the measurements
# ---------------------------------------------------------------------------------------

def test_faster_up_kernel_wins():
    """A host where bmm streams fast (the AVX-512 VM) gets bmm blocks; one where the GEMV
    is faster (the AVX2 host of issue 14) gets torch.mm blocks, paired weights or not."""
    d, F_ = SMOL
    bmm_fast = tuning(pair=35, halves=35, mm=17, linear=17)
    gemv_fast = tuning(pair=10, halves=10, mm=16, linear=16)
    for paired, bmm_kernel in ((True, "pair"), (False, "halves")):
        plan = cpu_plan.choose(half_union(), 1, F_, d, 32, True, paired, True, bmm_fast)
        assert plan.up == bmm_kernel
        plan = cpu_plan.choose(half_union(), 1, F_, d, 32, True, paired, True, gemv_fast)
        assert plan.up == "mm"


def test_faster_down_kernel_wins():
    d, F_ = SMOL
    plan = cpu_plan.choose(half_union(), 1, F_, d, 32, True, True, True,
                           tuning(bag=40, mm_down=10))
    assert plan.bag is True
    plan = cpu_plan.choose(half_union(), 1, F_, d, 32, True, True, True,
                           tuning(bag=5, mm_down=30))
    assert plan.bag is False


def test_dense_when_the_blocks_lose():
    """Sparsity 0 on a host where every block kernel is slower than F.linear: dense (None);
    where bmm is faster: one block over every row. At 0.5 the blocks win on both."""
    d, F_ = SMOL
    full = torch.ones(48, dtype=torch.bool)
    slow_blocks = tuning(pair=10, halves=10, mm=14, bag=14, linear=17, mm_down=17)
    assert cpu_plan.choose(full, 1, F_, d, 32, True, True, True, slow_blocks) is None
    plan = cpu_plan.choose(full, 1, F_, d, 32, True, True, True, tuning())
    assert plan.runs == (F_,) and plan.up == "pair"
    assert cpu_plan.choose(half_union(), 1, F_, d, 32, True, True, True, slow_blocks).runs


def test_plans_are_not_shared():
    """Plans are tuples and fresh tensors: what one call (or thread) does with its plan
    cannot change another's (issue 12: the plan cache handed out shared mutable lists)."""
    d, F_ = SMOL
    full, t = torch.ones(48, dtype=torch.bool), tuning()
    a = cpu_plan.choose(full, 1, F_, d, 32, True, True, True, t)
    with pytest.raises(AttributeError):
        a.runs.append(1)
    a.rows.zero_()
    a.experts.zero_()
    b = cpu_plan.choose(full, 1, F_, d, 32, True, True, True, t)
    assert b.runs == (F_,) and b.rows.tolist() == list(range(F_))
    assert b.experts.tolist() == list(range(48))
    results = []

    def worker():
        for _ in range(50):
            p = cpu_plan.choose(half_union(), 1, F_, d, 32, True, True, True, t)
            results.append((p.starts, p.runs, p.rows.sum().item()))
            p.rows.zero_()
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(set(results)) == 1


def test_a_full_union_is_the_full_plan_or_dense():
    """Sparsity 0 (every expert active) plans no blocks: the full plan, which masks nothing
    for one token (and masks each token's experts for a batch), or dense."""
    d, F_ = SMOL
    full = torch.ones(48, dtype=torch.bool)
    for n in (1, 2):
        plan = cpu_plan.choose(full, n, F_, d, 32, True, True, True, tuning())
        assert plan.starts == (0,) and plan.runs == (F_,) and plan.merged is False
    slow_full = tuning(pair=10, halves=10, mm=10, bag=10, mm_down=10, linear=17)
    assert cpu_plan.choose(full, 1, F_, d, 32, True, True, True, slow_full) is None


@pytest.mark.parametrize("kind", ["bmm_fast", "gemv_fast", "dense"])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("density", [0.5, 0.98, 1.0])
def test_each_choice_computes_the_reference(kind, tokens, density, monkeypatch):
    """Whatever the numbers choose, the op's output is the reference's: at sparsity 0.5,
    with a few experts off, and at sparsity 0."""
    t = {"bmm_fast": tuning(), "gemv_fast": tuning(pair=10, halves=10, mm=16, bag=10),
         "dense": tuning(pair=1, halves=1, mm=1, bag=1, mm_down=1)}[kind]
    monkeypatch.setattr(cpu_tuning, "get", lambda d, F_, dtype: t)
    g = torch.Generator().manual_seed(0)
    d, F_ = SMOL
    w = [torch.randn(F_, d, generator=g) / d ** 0.5 for _ in range(3)]
    pair = torch.stack(w[:2])
    x = torch.randn(tokens, d, generator=g)
    mask = torch.rand(tokens, 48, generator=g) < density
    out = cpu.sparse_ffn(x, mask, pair[0], pair[1], w[2], None, None, None, 32, "silu")
    ref = sparse_ffn_reference(x, mask, pair[0], pair[1], w[2], None, None, None, 32, "silu")
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Fitting the measured points
# ---------------------------------------------------------------------------------------

def test_fit_recovers_call_and_row_cost():
    pts = {r: 3.0 + r * 0.05 for r in (32, 64, 128, 256)} | {1536: 80.0}
    k = cpu_tuning.fit(pts, 1)
    assert k.call_us == pytest.approx(3.0) and k.row_ns == pytest.approx(50.0)
    assert k.full_us == 80.0
    k = cpu_tuning.fit({r: 3.0 + 2 * r * 0.05 for r in (32, 64)} | {512: 60.0}, 2)  # a pair
    assert k.call_us == pytest.approx(3.0) and k.row_ns == pytest.approx(50.0)


def test_fit_survives_noise():
    """A slope lost in noise (larger blocks measured faster) still gives costs ≥ 0."""
    k = cpu_tuning.fit({32: 10.0, 64: 9.0, 128: 8.0, 256: 7.0, 1536: 90.0}, 1)
    assert k.call_us >= 0 and k.row_ns > 0 and math.isfinite(k.row_ns)


# ---------------------------------------------------------------------------------------
# The cache file
# ---------------------------------------------------------------------------------------

def test_first_use_measures_once_and_caches(calibrating):
    t = cpu_tuning.get(*SMOL, torch.float32)
    assert t.source == "measured #1" and len(calibrating) == 1
    assert cpu_tuning.get(*SMOL, torch.float32) is t                   # memory
    cpu_tuning.forget()
    assert cpu_tuning.get(*SMOL, torch.float32) == t                    # the file
    assert len(calibrating) == 1
    key = cpu_tuning._key(torch.float32)
    assert cpu_tuning.read_cache(cpu_tuning.cache_file(key), key)["576x1536"].source == \
        "measured #1"


@pytest.mark.parametrize("content", [
    b"", b"{", b"\x00\xff garbage", b"[]", b'{"key": null, "shapes": {}}',
])
def test_corrupt_cache_file_is_ignored(calibrating, content):
    path = cpu_tuning.cache_file(cpu_tuning._key(torch.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    assert cpu_tuning.get(*SMOL, torch.float32).source == "measured #1"
    cpu_tuning.forget()                                  # the file was replaced by a good one
    assert cpu_tuning.get(*SMOL, torch.float32).source == "measured #1"
    assert len(calibrating) == 1


def _written(calibrating):
    cpu_tuning.get(*SMOL, torch.float32)
    key = cpu_tuning._key(torch.float32)
    path = cpu_tuning.cache_file(key)
    cpu_tuning.forget()
    return path, key, json.loads(path.read_text())


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf"), "fast", None])
def test_malformed_numbers_are_ignored(calibrating, bad):
    path, key, data = _written(calibrating)
    data["shapes"]["576x1536"]["bag"]["row_ns"] = bad
    path.write_text(json.dumps(data))
    assert cpu_tuning.read_cache(path, key) == {}
    assert cpu_tuning.get(*SMOL, torch.float32).source == "measured #2"


@pytest.mark.parametrize("field,value", [("cpu", "Intel Xeon Platinum 8480+"),
                                         ("torch", "2.11.0+cu128"), ("threads", 64),
                                         ("aten_capability", "ZVECTOR"), ("version", 0)])
def test_foreign_cache_file_is_ignored(calibrating, field, value):
    """A file written for another host, torch, thread count or format (copied over, or
    the same name by chance) is not trusted."""
    path, key, data = _written(calibrating)
    data["key"][field] = value
    data["shapes"]["576x1536"]["pair"]["full_us"] = 0.0      # would make pair always win
    path.write_text(json.dumps(data))
    assert cpu_tuning.read_cache(path, key) == {}
    assert cpu_tuning.get(*SMOL, torch.float32).source == "measured #2"


def test_the_key_names_the_host():
    key = cpu_tuning._key(torch.bfloat16)
    assert key["dtype"] == "bfloat16" and key["threads"] == torch.get_num_threads()
    assert key["torch"] == torch.__version__ and key["aten_capability"]
    assert cpu_tuning.cache_file(key) != cpu_tuning.cache_file(cpu_tuning._key(torch.float32))


def test_unwritable_cache_keeps_the_numbers_in_memory(calibrating, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LTE_CONVERT_CACHE", str(blocker))
    cpu_tuning.forget()
    with pytest.warns(UserWarning, match="could not cache"):
        t = cpu_tuning.get(*SMOL, torch.float32)
    assert t.source.startswith("measured") and cpu_tuning.get(*SMOL, torch.float32) is t


# ---------------------------------------------------------------------------------------
# Off switch, overrides, the real measurement
# ---------------------------------------------------------------------------------------

def test_off_uses_the_constants(tmp_path, monkeypatch):
    monkeypatch.setenv("LTE_CONVERT_CACHE", str(tmp_path))
    monkeypatch.setenv(cpu_tuning.ENV_CALIBRATE, "0")
    cpu_tuning.forget()
    t = cpu_tuning.get(*SMOL, torch.float32)
    assert t == cpu_tuning.FALLBACK.tuning(*SMOL, torch.float32)
    assert "fallback" in t.source and not any(tmp_path.iterdir())


def test_constants_can_be_overridden(tmp_path, monkeypatch):
    path = tmp_path / "host.json"
    path.write_text(json.dumps({"fp32_gbps": {"pair": 10, "halves": 10, "mm": 16,
                                              "linear": 16, "bag": 20, "mm_down": 16},
                                "small_nd": 0, "source": "my AVX2 box"}))
    monkeypatch.setenv(cpu_tuning.ENV_CALIBRATE, "0")
    monkeypatch.setenv(cpu_tuning.ENV_CONSTANTS, str(path))
    cpu_tuning.forget()
    t = cpu_tuning.get(*SMOL, torch.float32)
    assert t.source == "my AVX2 box" and t.small_nd == 0
    assert cpu_plan.choose(half_union(), 1, SMOL[1], SMOL[0], 32, True, True, True,
                           t).up == "mm"
    cpu_tuning.forget()


def test_measure_smoke():
    """The real measurement (one pass per point, one thread: a 2-thread region stalls for
    seconds on a loaded 2-core machine) gives finite, non-negative numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = cpu_tuning.measure(64, 256, torch.float32, reps=1)
    finally:
        torch.set_num_threads(threads)
    for name in cpu_tuning.KERNELS:
        k = getattr(t, name)
        assert all(math.isfinite(v) and v >= 0 for v in (k.call_us, k.row_ns, k.full_us))
        assert k.full_us > 0
    assert t.plan_us > 0 and "measured" in t.source


def test_calibrate_measures_now_and_caches(calibrating):
    """`lte-convert bench --calibrate`: measured again even when the cache has the shape."""
    cpu_tuning.get(*SMOL, torch.float32)
    t = cpu_tuning.calibrate(*SMOL, torch.float32)
    assert t.source == "measured #2" and cpu_tuning.get(*SMOL, torch.float32) is t
    cpu_tuning.forget()
    assert cpu_tuning.get(*SMOL, torch.float32).source == "measured #2"

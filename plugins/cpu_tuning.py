"""Calibration of the CPU op's plan (plugins/cpu_plan.py) on the host where it runs.

The plan's cost model needs, per FFN shape (d, F), dtype and thread count, the cost of each
way to call the kernels (cpu_plan.Tuning: a per-call cost, a per-row cost and the cost of all
F rows, for torch.bmm, torch.mm, F.linear and embedding_bag) and of the planning itself.
Which is fastest differs between hosts: on the 2-core AVX-512 development VM a batch-2
torch.bmm streams one token's weights ≈2x faster than the GEMV behind F.linear; on an AVX2
host of the same size it was the other way round (issue 14). So they are measured:

    get(d, F, dtype)   the Tuning of this shape for torch's current thread count: from memory,
                       else from the cache file, else measured now (≈1–3 s) and cached
    calibrate(...)     measure now and cache (`lte-convert bench --calibrate`)

Measuring: every kernel streams weights from a buffer several times the last-level cache
(so no call finds its rows in cache), in blocks of 32 to 256 rows (fitted as call_us +
rows · row_ns) and of all F rows; each number is the fastest of REPS passes of ≈8 MB (or
one call on all F rows), the kernels interleaved so that load from other processes hits
them alike, and the fastest because a pass that was descheduled measures the scheduler.

Cache: one JSON file per host (CPU model and flags, torch, MKL, oneDNN, ATen's CPU
capability), dtype and thread count in <cache_dir>/cpu-tuning/ (lte_convert.default
.cache_dir(), $LTE_CONVERT_CACHE), one entry per shape. A file that does not parse, was
written for another host or version, or holds numbers that are not finite and ≥ 0 is
ignored (and replaced on the next calibration), never trusted.

Off switch and overrides: LTE_CONVERT_CPU_CALIBRATE=0 never measures; the op then uses
FALLBACK (the constants measured on the development VM). LTE_CONVERT_CPU_CONSTANTS=FILE.json
overrides FALLBACK's fields (same names, see Constants).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import statistics
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lte_convert.plugins import cpu_plan
from lte_convert.plugins.cpu_plan import Kernel, Tuning

VERSION = 1
ENV_CALIBRATE = "LTE_CONVERT_CPU_CALIBRATE"
ENV_CONSTANTS = "LTE_CONVERT_CPU_CONSTANTS"
REPS = 9
PASS_BYTES = 8 << 20
BLOCK_ROWS = (32, 64, 128, 256)
KERNELS = ("pair", "halves", "mm", "linear", "bag", "mm_down")


@dataclass(frozen=True)
class Constants:
    """The cost model's numbers when nothing is measured: streaming rates (GB/s) and per-call
    costs (µs) of each kernel, by dtype class. Measured on the 2-core AMD EPYC development
    VM (AVX-512, torch 2.13.0+cpu, MKL 2024.2), 2026-11-28, one thread; results/cpu_bench.md
    (run 2 and the fp32/bf16 notes) has the measurements."""
    fp32_gbps: tuple = (("pair", 35.0), ("halves", 35.0), ("mm", 17.0), ("linear", 17.0),
                        ("bag", 32.0), ("mm_down", 17.0))
    half_gbps: tuple = (("pair", 6.0), ("halves", 6.0), ("mm", 12.0), ("linear", 12.0),
                        ("bag", 27.0), ("mm_down", 7.0))
    fp32_call_us: float = 2.0
    half_call_us: float = 12.0
    plan_us: float = 10.0
    small_nd: int = 6144
    dense_union: float = 0.9
    source: str = "fallback constants (2-core AMD EPYC AVX-512 development VM, 2026-11-28)"

    def tuning(self, d: int, F_: int, dtype: torch.dtype) -> Tuning:
        fp32 = dtype == torch.float32
        gbps = dict(self.fp32_gbps if fp32 else self.half_gbps)
        call = self.fp32_call_us if fp32 else self.half_call_us
        row_bytes = d * torch.finfo(dtype).bits / 8
        kernels = {}
        for name in KERNELS:
            row_ns = row_bytes / gbps[name]                       # GB/s = bytes per ns
            full_rows = 2 * F_ if name == "pair" else F_
            kernels[name] = Kernel(call, row_ns, call + full_rows * row_ns * 1e-3)
        return Tuning(**kernels, plan_us=self.plan_us, small_nd=self.small_nd,
                      dense_union=self.dense_union, source=self.source)


FALLBACK = Constants()


def constants() -> Constants:
    """FALLBACK with the fields of $LTE_CONVERT_CPU_CONSTANTS (a JSON object) replaced."""
    path = os.environ.get(ENV_CONSTANTS)
    if not path:
        return FALLBACK
    fields = json.loads(Path(path).read_text())
    fields = {k: tuple(map(tuple, v.items())) if isinstance(v, dict) else v
              for k, v in fields.items()}
    return dataclasses.replace(FALLBACK, **fields)


# ---------------------------------------------------------------------------------------
# The host
# ---------------------------------------------------------------------------------------

def _cpuinfo() -> dict:
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            info.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return info


def _llc_bytes() -> int:
    """The largest cache's size (sysfs), else 32 MiB."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        m = re.fullmatch(r"(\d+)([KMG]?)", f.read_text().strip())
        if m:
            sizes.append(int(m[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m[2]])
    return max(sizes, default=32 * 2**20)


def host() -> dict:
    """What the numbers depend on: CPU model and ISA flags, cores, caches, torch and its math
    libraries, the SIMD level ATen dispatches to, and the thread count."""
    info = _cpuinfo()
    flags = info.get("flags", "").split()
    config = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([\d.]+)", config)
    onednn = re.search(r"MKL-DNN (v[\d.]+)", config)
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(),
            "cpu_family": info.get("cpu family", ""), "cpu_model": info.get("model", ""),
            "isa": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))),
            "flags_sha": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16],
            "logical_cpus": os.cpu_count(), "llc_bytes": _llc_bytes(),
            "torch": torch.__version__, "mkl": mkl[1] if mkl else None,
            "onednn": onednn[1] if onednn else None,
            "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def _key(dtype: torch.dtype) -> dict:
    h = host()
    return {"version": VERSION, "dtype": str(dtype).replace("torch.", ""),
            **{k: h[k] for k in ("cpu", "cpu_family", "cpu_model", "flags_sha",
                                 "logical_cpus", "torch", "mkl", "onednn",
                                 "aten_capability", "threads")}}


# ---------------------------------------------------------------------------------------
# The cache file
# ---------------------------------------------------------------------------------------

def cache_file(key: dict) -> Path:
    from lte_convert.default import cache_dir
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "cpu-tuning" / f"{key['dtype']}-t{key['threads']}-{digest}.json"


def _entry_to_tuning(entry) -> Tuning | None:
    """A cached entry as a Tuning, or None when it is not a well-formed set of numbers."""
    try:
        kernels = {}
        for name in KERNELS:
            values = [float(entry[name][f]) for f in ("call_us", "row_ns", "full_us")]
            if not all(math.isfinite(v) and v >= 0 for v in values):
                return None
            kernels[name] = Kernel(*values)
        plan_us = float(entry["plan_us"])
        if not (math.isfinite(plan_us) and plan_us >= 0):
            return None
        return Tuning(**kernels, plan_us=plan_us, source=str(entry["source"]))
    except (KeyError, TypeError, ValueError):
        return None


def _tuning_to_entry(t: Tuning) -> dict:
    return {**{name: dataclasses.asdict(getattr(t, name)) for name in KERNELS},
            "plan_us": t.plan_us, "source": t.source}


def read_cache(path: Path, key: dict) -> dict:
    """{shape: Tuning} of a cache file written for `key`; {} for a missing, unreadable,
    corrupt or foreign file (and without the entries that are not well formed)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("key") != key or \
            not isinstance(data.get("shapes"), dict):
        return {}
    out = {}
    for shape, entry in data["shapes"].items():
        t = _entry_to_tuning(entry)
        if t is not None:
            out[shape] = t
    return out


def write_cache(path: Path, key: dict, shape: str, t: Tuning) -> None:
    """Add one shape's numbers to the cache file (atomic; the file's other valid entries are
    kept). A cache folder that cannot be written leaves the numbers in memory only."""
    from lte_convert.atomic import atomic_path
    try:
        shapes = {s: _tuning_to_entry(v) for s, v in read_cache(path, key).items()}
        shapes[shape] = _tuning_to_entry(t)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps({"key": key, "shapes": shapes}, indent=1))
    except OSError as e:
        warnings.warn(f"lte.SparseFFN: could not cache the CPU calibration in {path} ({e}); "
                      "it is kept for this process only.", stacklevel=2)


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------

def _even(r: int) -> int:
    return max(2, r - r % 2)


def _passes(d: int, F_: int, dtype: torch.dtype):
    """({(kernel, rows): fn}, sizes): fn() calls that kernel on PASS_BYTES of blocks of `rows`
    rows (at least one block) and returns the number of calls. The blocks come from a
    buffer [2, R, d] of at least F rows and 3x the last-level cache per matrix, every pass
    continuing where the last one ended, so no block is still in cache when it is read."""
    elem = torch.finfo(dtype).bits // 8
    R = _even(max(F_, -(-3 * _llc_bytes() // (d * elem)), -(-(64 << 20) // (d * elem))))
    w = torch.empty(2, R, d, dtype=dtype).fill_(0.01)
    x = torch.full((1, d), 0.5, dtype=dtype)
    xt = x.t()                                       # [d, 1], strides (1, d): MKL's fast path
    xt2 = xt.expand(2, -1, -1)
    h = torch.full((1, R), 0.5, dtype=dtype)
    idx, off = torch.arange(R), torch.zeros(1, dtype=torch.long)
    calls = {
        "pair": lambda b, r: torch.bmm(w[:, b:b + r], xt2),
        "halves": lambda b, r: torch.bmm(w[0, b:b + r].view(2, -1, d), xt2),
        "mm": lambda b, r: torch.mm(w[0, b:b + r], xt),
        "linear": lambda b, r: F.linear(x, w[0, b:b + r]),
        "bag": lambda b, r: F.embedding_bag(idx[b:b + r], w[0], off,
                                            per_sample_weights=h[0, b:b + r], mode="sum"),
        "mm_down": lambda b, r: torch.mm(h[:, b:b + r], w[0, b:b + r]),
    }
    sizes = sorted({_even(min(r, F_)) for r in BLOCK_ROWS} | {_even(F_)})
    cursor = [0]

    def make(call, r):
        count = max(1, min(256, PASS_BYTES // (r * d * elem)))

        def fn():
            b = cursor[0]
            for _ in range(count):
                if b + r > R:
                    b = 0
                call(b, r)
                b += r
            cursor[0] = b
            return count
        return fn
    return {(name, r): make(call, r) for name, call in calls.items() for r in sizes}, sizes


def _plan_us(F_: int) -> float:
    """µs of planning one call: a random half of max(F/32, 8) experts in blocks, rows."""
    E = max(F_ // 32, 8)
    union = torch.rand(E, generator=torch.Generator().manual_seed(0)) < 0.5
    times = []
    for _ in range(50):
        t = time.perf_counter()
        _, _, experts, _ = cpu_plan.blocks(union, 32)[0]
        cpu_plan.rows_of(experts, 32)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def fit(points: dict[int, float], per_call_rows: int) -> Kernel:
    """Kernel from {rows: µs per call}: call_us + rows · row_ns fitted by least squares to the
    block sizes (rows per matrix, × per_call_rows for a pair), full_us the largest point (all
    F rows); a slope lost in noise leaves every µs to the rows."""
    sizes = sorted(points)
    full = points[sizes[-1]]
    blocks = sizes[:-1] or sizes
    rs = [per_call_rows * r for r in blocks]
    ts = [points[r] for r in blocks]
    mean_r, mean_t = statistics.fmean(rs), statistics.fmean(ts)
    var = sum((r - mean_r) ** 2 for r in rs)
    slope = sum((r - mean_r) * (t - mean_t) for r, t in zip(rs, ts)) / var if var else 0.0
    call_us = mean_t - slope * mean_r
    if slope <= 0 or call_us < 0:
        call_us, slope = max(min(call_us, min(ts)), 0.0), max(slope, 0.0)
        if slope == 0.0:
            slope = max(ts[-1] - call_us, 1e-9) / rs[-1]
    return Kernel(call_us, slope * 1e3, full)


@torch.no_grad()
def measure(d: int, F_: int, dtype: torch.dtype, reps: int | None = None) -> Tuning:
    """Measure the Tuning of one shape now (torch's current thread count), REPS passes."""
    passes, sizes = _passes(d, F_, dtype)
    for fn in passes.values():                                    # warm-up
        fn()
    times = {k: [] for k in passes}
    for _ in range(reps or REPS):
        for k, fn in passes.items():
            t = time.perf_counter()
            n = fn()
            times[k].append((time.perf_counter() - t) / n * 1e6)
    kernels = {}
    for name in KERNELS:
        points = {r: min(times[(name, r)]) for r in sizes}
        kernels[name] = fit(points, 2 if name == "pair" else 1)
    h = host()
    source = (f"measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {h['cpu']} "
              f"({h['aten_capability']}, {h['threads']} threads, torch {h['torch']})")
    return Tuning(**kernels, plan_us=_plan_us(F_), source=source)


# ---------------------------------------------------------------------------------------
# What the op asks for
# ---------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_MEMORY: dict[tuple, Tuning] = {}


def enabled() -> bool:
    return os.environ.get(ENV_CALIBRATE, "1").strip().lower() not in ("0", "false", "off", "no")


def _memory_key(d, F_, dtype):
    env = os.environ
    return (d, F_, dtype, torch.get_num_threads(), env.get(ENV_CALIBRATE),
            env.get(ENV_CONSTANTS), env.get("LTE_CONVERT_CACHE"))


def _with_rules(t: Tuning) -> Tuning:
    """Measured numbers with the batch rules of constants() (small_nd, dense_union)."""
    c = constants()
    return dataclasses.replace(t, small_nd=c.small_nd, dense_union=c.dense_union)


def calibrate(d: int, F_: int, dtype: torch.dtype) -> Tuning:
    """Measure this shape now, cache it (file and memory) and return it."""
    t = measure(d, F_, dtype)
    key = _key(dtype)
    write_cache(cache_file(key), key, f"{d}x{F_}", t)
    t = _with_rules(t)
    with _LOCK:
        _MEMORY[_memory_key(d, F_, dtype)] = t
    return t


def get(d: int, F_: int, dtype: torch.dtype) -> Tuning:
    """The Tuning the op plans with: the constants when calibration is off; else this host's
    measured numbers, from memory, the cache file, or measured now (first use)."""
    mkey = _memory_key(d, F_, dtype)
    t = _MEMORY.get(mkey)
    if t is not None:
        return t
    with _LOCK:
        t = _MEMORY.get(mkey)
        if t is None:
            if enabled():
                key = _key(dtype)
                path = cache_file(key)
                t = read_cache(path, key).get(f"{d}x{F_}")
                if t is None:
                    t = measure(d, F_, dtype)
                    write_cache(path, key, f"{d}x{F_}", t)
                t = _with_rules(t)
            else:
                t = constants().tuning(d, F_, dtype)
            _MEMORY[mkey] = t
    return t


def forget() -> None:
    """Drop the numbers held in memory (the next call reads the cache file or measures)."""
    with _LOCK:
        _MEMORY.clear()

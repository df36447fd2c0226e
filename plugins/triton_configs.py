"""Launch configurations of the Triton kernels (plugins/triton_kernels.py): block sizes,
warps, stages and grid per op and problem size, the one choice both launchers use (PyTorch in
plugins/triton_dispatch.py, TensorRT ahead of time in trt_plugins/aot.py).

`launch_config(op, T, d, F, expert_size, dtype)` returns the `LaunchConfig`; any config is
correct for any T (the grid covers all tokens), T only picks the fastest. Shared memory of
every config is < 48 KiB (checked in tests). The configurations are machine-tuned: `H200`
names where they were measured, and `set_tuning` replaces them. Plain Python: importing it
needs no Triton.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch


def _cdiv(a, b):
    """triton.cdiv: also for trt_plugins/aot.py's symbolic sizes (+ and // only)."""
    return (a + b - 1) // b


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


@dataclass(frozen=True)
class LaunchConfig:
    """Constexpr block sizes and launch parameters of one kernel for one problem size.

    up:   grid = (cdiv(F, block_f), cdiv(T, block_t))
    down: grid = (cdiv(d, block_d), cdiv(T, block_t))

    compact (down, block_t == 1 only; the down kernel's COMPACT constexpr): 0 walks all F rows
    (predicated per row); > 0 walks the active experts only, reading the mask `compact`
    experts (a power of two) at a time; needs block_f % expert_size == 0 and a power-of-two
    expert_size.
    """

    op: str                # "up" or "down"
    block_t: int
    block_f: int
    block_d: int
    num_warps: int
    num_stages: int = 1
    compact: int = 0

    def grid(self, T: int, d: int, F: int) -> tuple[int, int]:
        if self.op == "up":
            return (_cdiv(F, self.block_f), _cdiv(T, self.block_t))
        return (_cdiv(d, self.block_d), _cdiv(T, self.block_t))

    def constexprs(self) -> dict:
        c = {"BLOCK_T": self.block_t, "BLOCK_F": self.block_f, "BLOCK_D": self.block_d}
        return c if self.op == "up" else dict(c, COMPACT=self.compact)


MAX_MASK_PIECE = 512     # experts of the mask one compact down program holds at a time


def compact_piece(F: int, expert_size: int, block_f: int) -> int:
    """The `compact` value for a one-token down config: 0 when the compact path cannot run
    (expert size not a power of two or not dividing block_f), else the mask piece size."""
    if expert_size & (expert_size - 1) or block_f % expert_size:
        return 0
    piece = min(MAX_MASK_PIECE, _next_power_of_2(max(F // expert_size, 1)))
    return max(piece, block_f // expert_size)


@dataclass(frozen=True)
class Tuning:
    """The launch configurations measured fastest on one machine. Every config is correct on
    every GPU (the grid covers all tokens and rows); on another GPU they may only be slower,
    so a tuning names the machine it comes from. Override with `set_tuning`."""

    machine: str
    buckets: tuple            # (max T, or None for the rest; up config; down config), T ascending
    small_d: int              # d below this: one token uses small_d_one_token (up, down)
    small_d_one_token: tuple
    walk_all_down: LaunchConfig   # one token, down, when the compact path cannot run
    dense_min_tokens: int     # from this many tokens on, triton_dispatch.sparse_ffn runs cuBLAS


H200 = Tuning(
    machine="NVIDIA H200, Triton 3.6, bf16 (results/gpu.md run 1; small d: SmolLM2-135M)",
    buckets=(
        (1, LaunchConfig("up", 1, 16, 256, 8), LaunchConfig("down", 1, 512, 32, 8)),
        (16, LaunchConfig("up", 16, 32, 128, 4, 3), LaunchConfig("down", 16, 128, 32, 4, 4)),
        (64, LaunchConfig("up", 64, 64, 32, 4, 3), LaunchConfig("down", 64, 64, 64, 4, 2)),
        (None, LaunchConfig("up", 64, 128, 32, 8, 2), LaunchConfig("down", 64, 32, 128, 8, 3)),
    ),
    small_d=2048,
    small_d_one_token=(LaunchConfig("up", 1, 8, 512, 4), LaunchConfig("down", 1, 512, 16, 8)),
    walk_all_down=LaunchConfig("down", 1, 512, 16, 8),
    dense_min_tokens=17,
)
_tuning = H200


def tuning() -> Tuning:
    return _tuning


def set_tuning(t: Tuning) -> None:
    """Use `t` for every launch from now on. Call it before the first launch or TensorRT
    engine build of the process: trt_plugins/aot.py caches its compiled tactics."""
    global _tuning
    _tuning = t
    launch_config.cache_clear()


@lru_cache(maxsize=None)
def launch_config(op: str, T: int, d: int, F: int, expert_size: int,
                  dtype: torch.dtype = torch.bfloat16) -> LaunchConfig:
    """The config both launchers (PyTorch here, TensorRT AOT) use for `op` at T tokens.

    Any config is correct for any T (the grid covers all tokens); T only picks the fastest,
    by the current `tuning()`. Small models (d < small_d) have their own one-token configs.
    One-token down configs walk the active experts only (`compact`, see LaunchConfig) when
    the expert size allows. fp32 halves the K block of the tl.dot configs so shared memory
    stays the same, and uses 16 columns per compact down program.
    """
    assert op in ("up", "down"), op
    t = _tuning
    for max_t, up, down in t.buckets:
        if max_t is None or T <= max_t:
            cfg = up if op == "up" else down
            break
    if cfg.block_t == 1 and d < t.small_d:
        cfg = t.small_d_one_token[op == "down"]
    if op == "down" and cfg.block_t == 1:
        cfg = replace(cfg, compact=compact_piece(F, expert_size, cfg.block_f))
        if cfg.compact == 0:
            cfg = t.walk_all_down
    if dtype == torch.float32 and cfg.block_t > 1:
        cfg = replace(cfg, block_d=max(16, cfg.block_d // 2) if op == "up" else cfg.block_d,
                      block_f=max(16, cfg.block_f // 2) if op == "down" else cfg.block_f)
    if dtype == torch.float32 and cfg.compact:
        cfg = replace(cfg, block_d=min(16, cfg.block_d))     # fp32 tiles: twice the registers
    return cfg


def launch_configs(op: str, d: int, F: int, expert_size: int,
                   dtype: torch.dtype = torch.bfloat16) -> tuple[LaunchConfig, ...]:
    """Every distinct config launch_config picks for `op` at some T (TensorRT tactics)."""
    seen = []
    for max_t, _, _ in _tuning.buckets:
        cfg = launch_config(op, max_t or 1 << 16, d, F, expert_size, dtype)
        if cfg not in seen:
            seen.append(cfg)
    return tuple(seen)

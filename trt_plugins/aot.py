"""Ahead-of-time compilation of the sparse-FFN Triton kernels for TensorRT (no TensorRT here).

TensorRT's AOT plugin (`tensorrt.plugin.aot_impl`, TensorRT >= 10.9) takes, per I/O type
combination and tactic, one kernel as PTX plus how to launch it:

    (kernel_name, ptx, KernelLaunchParams(grid, block, shared_mem), SymIntExprs(scalars))

and calls it as  kernel(<input pointers>, <int32 scalars>, <output pointers>, <hidden>)
where <hidden> are the scratch pointers Triton >= 3.3 appends to every kernel; TensorRT
passes null for them, so a kernel must need no scratch memory. This module computes all of
that as plain data (a `Launch`) from the one kernel source, plugins/triton_kernels.py
(launch configurations: plugins/triton_configs.py):

    launch_configs (plugins)  ──►  constexprs, num_warps, num_stages, grid (one per tactic)
    triton.compile(ASTSource, GPUTarget("cuda", arch, 32))  ──►  PTX + metadata
    checks: scratch == 0, one CTA, shared memory < 48 KiB, parameter list as TensorRT calls it

Sizes that vary at run time (T = tokens = product of the leading dims of x or h) stay
symbolic: `LaunchConfig.grid` is evaluated on a `Sym("T")`, so grid and scalar arguments
come out as small expression trees (int | variable name | (op, a, b)) that
trt_plugins/plugin.py turns into trtp.SymInt32 and samples/gpu_ptx_check.py evaluates with ints. d, F and expert_size are build-time
constants (they come from the weights).

Rules this enforces (TensorRT's AOT contract): one kernel launch per plugin, scalar
arguments are int32 and sit between the input and output pointers, no workspace, no float
scalars. Mask: TensorRT plugins accept no BOOL tensors, so the engine builder casts the
ONNX bool mask to INT32 in front of the plugins; the kernels are compiled with an `*i32`
mask pointer here (PyTorch passes the bool mask as bytes).

Only `triton` is needed (no GPU, no TensorRT); tested with Triton 3.6 and 3.9.
"""
from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass, field

from lte_convert.errors import UserError
from lte_convert.plugins import spec

ARCHS = (80, 90)                    # PTX targets: sm_80 (Ampere, and JIT for 8.x / 10.x+), sm_90a (Hopper)
PTX_VERSION = 80                    # PTX ISA 8.0 (CUDA 12.0 drivers); the lowest sm_90a accepts
MAX_SHARED_BYTES = 48 * 1024        # above this a launch needs an opt-in AOT plugins cannot make
MASK_POINTER = "*i32"               # TensorRT hands the plugin an INT32 mask (see module docstring)


# ---------------------------------------------------------------------------------------------
# Symbolic integer expressions: int | str (a variable) | (op, a, b)
# ---------------------------------------------------------------------------------------------

_OPS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "floordiv": lambda a, b: a // b,
}


class Sym:
    """A traced integer: arithmetic on it records an expression tree instead of a value.

    Supports + - * // with ints and other Syms (what a grid or a scalar argument needs);
    comparisons, min/max and `int()` raise, because a value TensorRT only knows at run time
    cannot choose a kernel or a constexpr ahead of time.
    """

    def __init__(self, expr):
        self.expr = expr

    def _bin(self, op, other, swap=False):
        if isinstance(other, Sym):
            other = other.expr
        elif not isinstance(other, int):
            return NotImplemented
        a, b = (other, self.expr) if swap else (self.expr, other)
        return Sym(_fold(op, a, b))

    def __add__(self, o): return self._bin("add", o)
    def __radd__(self, o): return self._bin("add", o, swap=True)
    def __sub__(self, o): return self._bin("sub", o)
    def __rsub__(self, o): return self._bin("sub", o, swap=True)
    def __mul__(self, o): return self._bin("mul", o)
    def __rmul__(self, o): return self._bin("mul", o, swap=True)
    def __floordiv__(self, o): return self._bin("floordiv", o)
    def __rfloordiv__(self, o): return self._bin("floordiv", o, swap=True)

    def _refuse(self, *_):
        raise TypeError(f"{to_str(self.expr)} is only known when the engine runs; an AOT "
                        "launch config may use + - * // on it, not compare it or branch on it.")

    __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __int__ = __index__ = _refuse

    def __repr__(self):
        return f"Sym({to_str(self.expr)})"


def _fold(op, a, b):
    if isinstance(a, int) and isinstance(b, int):
        return _OPS[op](a, b)
    if (op in ("add", "sub") and b == 0) or (op in ("mul", "floordiv") and b == 1):
        return a
    if (op == "add" and a == 0) or (op == "mul" and a == 1):
        return b
    if op in ("add", "sub") and isinstance(b, int) and isinstance(a, tuple) \
            and a[0] == "add" and isinstance(a[2], int):          # (x + c1) ± c2 -> x + c
        return _fold("add", a[1], a[2] + (b if op == "add" else -b))
    return (op, a, b)


def evaluate(expr, env: dict, wrap=lambda v: v):
    """Value of `expr` with variables from `env`; `wrap` turns int constants into the
    caller's number type (e.g. trtp.SymInt32), so the arithmetic happens in that type."""
    if isinstance(expr, int):
        return wrap(expr)
    if isinstance(expr, str):
        return env[expr]
    op, a, b = expr
    return _OPS[op](evaluate(a, env, wrap), evaluate(b, env, wrap))


def to_str(expr) -> str:
    if not isinstance(expr, tuple):
        return str(expr)
    op, a, b = expr
    sym = {"add": "+", "sub": "-", "mul": "*", "floordiv": "//"}[op]
    return f"({to_str(a)} {sym} {to_str(b)})"


def as_expr(value):
    """A launch-config value (int or Sym) as a plain expression."""
    if isinstance(value, Sym):
        return value.expr
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an int or a symbolic size, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# One compiled kernel and how to launch it
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Launch:
    """Everything the TensorRT plugin returns from aot_impl, as plain data."""

    op: str                                   # spec.OP_UP or spec.OP_DOWN
    arch: int                                 # 80 or 90
    dtype: str                                # "fp16" | "bf16" | "fp32"
    tactic: int
    kernel_name: str                          # the .entry symbol in `ptx`
    ptx: str
    grid: tuple                               # 3 expressions in T
    block: int                                # threads per CTA (num_warps * 32)
    shared_mem: int                           # bytes of dynamic shared memory
    scalars: tuple                            # ((kernel parameter name, expression), ...) in order
    inputs: tuple                             # spec input names, in pointer order
    outputs: tuple                            # spec output names, in pointer order
    hidden_pointers: int                      # trailing scratch pointers TensorRT passes as null
    signature: dict = field(default_factory=dict)   # Triton signature it was compiled with
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4

    def kernel_args(self, pointers: dict, env: dict) -> list:
        """The full argument list TensorRT builds: input pointers, int32 scalars, output
        pointers, then null scratch pointers. `pointers` maps spec names to addresses."""
        return ([pointers[n] for n in self.inputs]
                + [evaluate(e, env) for _, e in self.scalars]
                + [pointers[n] for n in self.outputs]
                + [0] * self.hidden_pointers)


def ptx_params(ptx: str, kernel_name: str) -> list[str]:
    """The .param types of the kernel's .entry in `ptx`, in order (e.g. ['u64', 'u32'])."""
    m = re.search(r"\.entry\s+" + re.escape(kernel_name) + r"\s*\((.*?)\)", ptx, re.S)
    assert m, f"no .entry {kernel_name} in the PTX"
    return re.findall(r"\.param\s+\.(\w+)", m.group(1))


def compile_kernel(fn, signature: dict, constexprs: dict, *, arch: int, num_warps: int,
                   num_stages: int | None = None, divisible: tuple = ()):
    """triton.compile for a target, without a GPU. Returns the CompiledKernel.

    `signature` types every runtime parameter ('*fp16', 'i32', ...). `divisible` names the
    parameters known to be multiples of 16: ints, or pointers 16-byte aligned (Triton's JIT
    specialises on both; it lets the compiler emit 16-byte vector loads).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full = dict(signature)
    full.update({k: "constexpr" for k in constexprs})
    order = [n for n in fn.arg_names if n in full]
    assert len(order) == len(full) == len(fn.arg_names), (
        f"{fn.__name__}: signature names {sorted(full)} != kernel parameters {fn.arg_names}")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(order) if n in divisible}
    options = {"num_warps": num_warps, "ptx_version": PTX_VERSION, "enable_fp_fusion": True}
    if num_stages is not None:
        options["num_stages"] = num_stages
    src = ASTSource(fn, signature={n: full[n] for n in order}, constexprs=dict(constexprs),
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


class AotRuleError(Exception):
    """A compiled kernel breaks a TensorRT AOT rule (scratch, CTAs, shared memory, TMA)."""


def check_compiled(kernel, name: str) -> None:
    """The AOT rules a compiled kernel must meet; AotRuleError says which one failed."""
    md = kernel.metadata
    scratch = (getattr(md, "global_scratch_size", 0) or 0,
               getattr(md, "profile_scratch_size", 0) or 0)
    if scratch != (0, 0):
        raise AotRuleError(
            f"{name}: Triton wants scratch memory (global, profile) = {scratch} bytes; "
            "TensorRT passes null scratch pointers to AOT kernels.")
    if getattr(md, "num_ctas", 1) != 1:
        raise AotRuleError(f"{name}: num_ctas={md.num_ctas}; AOT kernels run one CTA per program")
    if md.shared >= MAX_SHARED_BYTES:
        raise AotRuleError(
            f"{name}: {md.shared} bytes of shared memory; AOT plugin launches get less than "
            f"{MAX_SHARED_BYTES} without an opt-in. Use smaller tiles or fewer stages.")
    if getattr(md, "tensordesc_meta", None):
        raise AotRuleError(f"{name}: uses TMA descriptors, which AOT plugins cannot pass")


def build_launch(op: str, fn, *, arch: int, dtype: str, tactic: int, inputs: tuple,
                 outputs: tuple, scalars: dict, constexprs: dict, grid: tuple, num_warps: int,
                 num_stages: int | None = None) -> Launch:
    """Compile `fn` (parameters: input pointers, int32 scalars, output pointers, constexprs)
    and describe its launch. `scalars` maps each scalar parameter name to an int or Sym,
    `grid` is 1..3 ints or Syms."""
    params = list(fn.arg_names)
    n_in, n_sc, n_out = len(inputs), len(scalars), len(outputs)
    runtime = params[:n_in + n_sc + n_out]
    assert set(params[n_in + n_sc + n_out:]) == set(constexprs), (
        f"{fn.__name__}: parameters after the pointers {params[n_in + n_sc + n_out:]} must be "
        f"exactly the constexprs {sorted(constexprs)}")
    assert list(scalars) == runtime[n_in:n_in + n_sc], (
        f"{fn.__name__}: scalar parameters {runtime[n_in:n_in + n_sc]} must come right after "
        f"the {n_in} input pointers, in the order {list(scalars)}")
    pointer_names = runtime[:n_in] + runtime[n_in + n_sc:]
    assert pointer_names == [f"{n}_ptr" for n in list(inputs) + list(outputs)], (
        f"{fn.__name__}: pointer parameters {pointer_names} must follow the spec's order "
        f"{list(inputs)} then {list(outputs)} (named <name>_ptr)")
    signature = {}
    for name, role in zip(runtime, list(inputs) + ["int32"] * n_sc + list(outputs)):
        if role == "int32":
            signature[name] = "i32"
        elif role == "mask":
            signature[name] = MASK_POINTER
        else:
            signature[name] = "*" + dtype
    # Weights and biases are engine constants, allocated aligned: promise 16-byte alignment
    # (vectorised loads of the bytes that dominate). Activations (x, mask, h, y) promise
    # nothing: TensorRT may hand a plugin a view into a larger buffer.
    divisible = tuple(f"{n}_ptr" for n in inputs if n.startswith(("w_", "b_"))) + tuple(
        k for k, v in scalars.items() if isinstance(v, int) and v % 16 == 0)
    kernel = compile_kernel(fn, signature, constexprs, arch=arch, num_warps=num_warps,
                            num_stages=num_stages, divisible=divisible)
    tag = f"{op}[sm_{arch}, {dtype}, tactic {tactic}]"
    check_compiled(kernel, tag)
    name = kernel.metadata.name
    ptx = kernel.asm["ptx"]
    types = ptx_params(ptx, name)
    visible = n_in + n_sc + n_out
    want = ["u64"] * n_in + ["u32"] * n_sc + ["u64"] * n_out
    assert types[:visible] == want, f"{tag}: PTX parameters {types[:visible]} != {want}"
    assert all(t == "u64" for t in types[visible:]), f"{tag}: unexpected hidden params {types}"
    grid = tuple(as_expr(g) for g in grid) + (1,) * (3 - len(grid))
    return Launch(op=op, arch=arch, dtype=dtype, tactic=tactic, kernel_name=name, ptx=ptx,
                  grid=grid, block=kernel.metadata.num_warps * 32,
                  shared_mem=kernel.metadata.shared,
                  scalars=tuple((k, as_expr(v)) for k, v in scalars.items()),
                  inputs=tuple(inputs), outputs=tuple(outputs),
                  hidden_pointers=len(types) - visible, signature=signature,
                  constexprs=dict(constexprs), num_warps=kernel.metadata.num_warps)


# ---------------------------------------------------------------------------------------------
# The lte ops: tactics and compiled launches
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def configs(op: str, *, d: int, F: int, expert_size: int, dtype: str) -> tuple:
    """The distinct LaunchConfigs plugins.triton_configs.launch_config picks for any T.

    Each is correct for every T (it only changes speed), so each is one TensorRT tactic:
    tactic i (1-based, TensorRT wants positive ids) is configs(...)[i - 1], and TensorRT
    times them at the profile's opt shape and keeps the fastest.
    """
    from lte_convert.plugins.triton_configs import launch_configs

    return tuple(launch_configs(spec.KERNEL_OPS[op], d, F, expert_size,
                                spec.DTYPE_BY_NAME[dtype]))


def tactics(op: str, *, arch: int, dtype: str, d: int, F: int, expert_size: int,
            activation: str = "silu", gated: int = 1) -> list[int]:
    """Tactic ids (1-based) whose kernel meets the AOT rules on `arch`; the others are left
    out with a warning (see docs/kernels-trt-notes.md). Compiles each (cached)."""
    n = len(configs(op, d=d, F=F, expert_size=expert_size, dtype=dtype))
    ok = []
    for tactic in range(1, n + 1):
        try:
            compile_op(op, arch=arch, dtype=dtype, tactic=tactic, d=d, F=F,
                       expert_size=expert_size, activation=activation, gated=gated)
            ok.append(tactic)
        except AotRuleError as e:
            warnings.warn(f"lte TensorRT plugin: tactic {tactic} left out: {e}", stacklevel=2)
    assert ok, f"{op}: no launch config meets the AOT rules on sm_{arch} ({dtype})"
    return ok


def compile_op(op: str, *, arch: int, dtype: str, tactic: int, d: int, F: int,
               expert_size: int, activation: str = "silu", gated: int = 1) -> Launch:
    """The PTX and launch of spec.OP_UP / spec.OP_DOWN for one target, dtype and tactic.

    activation/gated matter for OP_UP only. Biases are always inputs (zeros when the model
    has none, plugins/spec.py), so HAS_BIAS is 1. Cached per distinct kernel.
    """
    if op != spec.OP_UP:
        activation, gated = "silu", 1
    return _compile_op(op, arch, dtype, tactic, d, F, expert_size, activation, int(gated))


@functools.lru_cache(maxsize=None)
def _compile_op(op, arch, dtype, tactic, d, F, expert_size, activation, gated) -> Launch:
    from lte_convert.plugins import triton_kernels as tk

    assert arch in ARCHS and dtype in spec.DTYPE_BY_NAME, (arch, dtype)
    assert activation in spec.ACTIVATIONS, activation
    cfgs = configs(op, d=d, F=F, expert_size=expert_size, dtype=dtype)
    assert 1 <= tactic <= len(cfgs), f"{op}: tactic {tactic} not in 1..{len(cfgs)}"
    cfg = cfgs[tactic - 1]
    T = Sym("T")
    common = dict(arch=arch, dtype=dtype, tactic=tactic, scalars={"T": T, "D": d, "F": F},
                  grid=cfg.grid(T, d, F), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if op == spec.OP_UP:
        return build_launch(op, tk.sparse_ffn_up_kernel, inputs=spec.UP_INPUTS,
                            outputs=spec.UP_OUTPUTS,
                            constexprs={"EXPERT_SIZE": expert_size,
                                        "ACTIVATION": spec.ACTIVATION_CODES[activation],
                                        "GATED": int(gated), "HAS_BIAS": 1, **cfg.constexprs()},
                            **common)
    assert op == spec.OP_DOWN, op
    return build_launch(op, tk.sparse_ffn_down_kernel, inputs=spec.DOWN_INPUTS,
                        outputs=spec.DOWN_OUTPUTS,
                        constexprs={"EXPERT_SIZE": expert_size, "HAS_BIAS": 1,
                                    **cfg.constexprs()},
                        **common)


def assemble(launch: Launch, ptxas: str = "ptxas") -> dict:
    """Assemble the launch's PTX with `ptxas -v` for its target (a check that needs the CUDA
    toolkit, not a GPU). Returns registers per thread, spill bytes and static shared memory;
    raises RuntimeError with ptxas' message when it fails."""
    import subprocess
    import tempfile

    target = "sm_90a" if launch.arch == 90 else f"sm_{launch.arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = f"{tmp}/k.ptx"
        with open(src, "w") as f:
            f.write(launch.ptx)
        r = subprocess.run([ptxas, f"-arch={target}", "-v", src, "-o", f"{tmp}/k.cubin"],
                           capture_output=True, text=True)
    report = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed for {launch.op} sm_{launch.arch}: {report.strip()}")
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, report)) else 0  # noqa: E731
    return {"entry": re.search(r"entry function '(\w+)'", report).group(1),
            "registers": num(r"Used (\d+) registers"),
            "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"),
            "static_shared": num(r"(\d+) bytes smem")}


# ---------------------------------------------------------------------------------------------
# Which PTX a GPU runs
# ---------------------------------------------------------------------------------------------

def ptx_arch(major: int, minor: int) -> int:
    """The PTX target for a GPU of compute capability major.minor.

    sm_90a PTX runs on 9.0 only; sm_80 PTX is JIT-compiled by the driver for 8.x and for
    newer GPUs (10.x, 12.x). Older GPUs (Volta, Turing) are refused with a UserError.
    """
    if (major, minor) == (9, 0):
        return 90
    if major >= 8:
        return 80
    raise UserError(
        f"This GPU has compute capability {major}.{minor}; the lte plugin's PTX targets sm_80 "
        "and newer (Ampere, Ada, Hopper, Blackwell). Build and run the engine on such a GPU, "
        "or serve the model with ONNX Runtime (the ONNX file runs anywhere).")


@functools.lru_cache(maxsize=1)
def current_device_capability() -> tuple[int, int]:
    """Compute capability of CUDA device 0 through the driver API (ctypes, no torch needed)."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise UserError(f"No CUDA driver found ({e}); building a TensorRT engine needs an "
                        "NVIDIA GPU with its driver installed.") from None
    major, minor = ctypes.c_int(), ctypes.c_int()
    dev = ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(dev), 0) != 0:
        raise UserError("The CUDA driver found no usable GPU (cuInit/cuDeviceGet failed); "
                        "check nvidia-smi and CUDA_VISIBLE_DEVICES.")
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)   # COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)   # COMPUTE_CAPABILITY_MINOR
    return major.value, minor.value

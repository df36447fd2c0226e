"""trt_plugins/aot.py on CPU: the exact PTX the TensorRT plugin returns, assembled by ptxas,
and its launch data checked against the kernel's signature and plugins' launch_config."""
import re
import shutil

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from lte_convert.errors import UserError  # noqa: E402
from lte_convert.plugins import spec  # noqa: E402
from lte_convert.plugins import triton_kernels as tk  # noqa: E402
from lte_convert.trt_plugins import aot  # noqa: E402

D, F, S = 576, 1536, 32                   # SmolLM2-135M's FFN
OPS = {spec.OP_UP: (tk.sparse_ffn_up_kernel, spec.UP_INPUTS, spec.UP_OUTPUTS, "up"),
       spec.OP_DOWN: (tk.sparse_ffn_down_kernel, spec.DOWN_INPUTS, spec.DOWN_OUTPUTS, "down")}
PTXAS = shutil.which("ptxas")


@pytest.mark.skipif(PTXAS is None, reason="ptxas (CUDA toolkit) is not on PATH")
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", list(spec.DTYPE_BY_NAME))
@pytest.mark.parametrize("arch", aot.ARCHS)
def test_every_tactic_assembles_and_fits_a_launch(op, dtype, arch):
    """Each tactic's PTX assembles for its target; registers × threads and shared memory fit
    one CTA's limits, so cuLaunchKernel with the plugin's launch params cannot be refused."""
    tactics = aot.tactics(op, arch=arch, dtype=dtype, d=D, F=F, expert_size=S)
    assert tactics
    for tactic in tactics:
        launch = aot.compile_op(op, arch=arch, dtype=dtype, tactic=tactic, d=D, F=F, expert_size=S)
        report = aot.assemble(launch)
        assert report["entry"] == launch.kernel_name
        assert report["registers"] * launch.block <= 65536, (report, launch.block)
        assert report["static_shared"] + launch.shared_mem < aot.MAX_SHARED_BYTES
        assert re.search(r"^\.version 8\.0$", launch.ptx, re.M)      # PTX ISA of CUDA 12.0 drivers
        assert re.search(rf"^\.target sm_{arch}a?$", launch.ptx, re.M)


@pytest.mark.skipif(PTXAS is None, reason="ptxas (CUDA toolkit) is not on PATH")
@pytest.mark.parametrize("activation,gated", [("gelu", 0), ("gelu_tanh", 1), ("relu", 0)])
def test_up_variants_assemble(activation, gated):
    launch = aot.compile_op(spec.OP_UP, arch=90, dtype="bf16", tactic=1, d=D, F=F,
                            expert_size=S, activation=activation, gated=gated)
    assert launch.constexprs["ACTIVATION"] == spec.ACTIVATION_CODES[activation]
    assert launch.constexprs["GATED"] == gated
    assert aot.assemble(launch)["entry"] == launch.kernel_name


def test_every_launch_config_meets_the_aot_rules():
    """No config of plugins' launch_config is left out of the TensorRT tactics (48 KiB of
    shared memory, no scratch): otherwise TensorRT serves some T with a slower kernel."""
    broken = []
    for op in OPS:
        for dtype in spec.DTYPE_BY_NAME:
            n = len(aot.configs(op, d=D, F=F, expert_size=S, dtype=dtype))
            for arch in aot.ARCHS:
                for tactic in range(1, n + 1):
                    try:
                        aot.compile_op(op, arch=arch, dtype=dtype, tactic=tactic, d=D, F=F,
                                       expert_size=S)
                    except aot.AotRuleError as e:
                        broken.append(str(e))
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("op", list(OPS))
def test_launch_data_matches_kernel_signature_and_launch_config(op):
    fn, inputs, outputs, kop = OPS[op]
    for tactic, cfg in enumerate(aot.configs(op, d=D, F=F, expert_size=S, dtype="fp16"), 1):
        launch = aot.compile_op(op, arch=90, dtype="fp16", tactic=tactic, d=D, F=F, expert_size=S)
        # The parameter list TensorRT builds: input pointers, int32 scalars, output pointers,
        # then one null per hidden scratch pointer; the PTX .entry has exactly these params.
        params = aot.ptx_params(launch.ptx, launch.kernel_name)
        n_in, n_sc, n_out = len(inputs), len(launch.scalars), len(outputs)
        assert params == ["u64"] * n_in + ["u32"] * n_sc + ["u64"] * n_out + ["u64"] * launch.hidden_pointers
        assert launch.hidden_pointers >= 1                      # Triton >= 3.3's global scratch
        runtime = [n for n in fn.arg_names if n not in launch.constexprs]
        assert runtime == [f"{n}_ptr" for n in inputs] + [n for n, _ in launch.scalars] + \
            [f"{n}_ptr" for n in outputs]
        assert launch.signature["mask_ptr"] == "*i32"        # TensorRT gives an INT32 mask
        assert all(launch.signature[f"{n}_ptr"] == "*fp16" for n in inputs + outputs if n != "mask")
        ptrs = {n: 1000 + i for i, n in enumerate(inputs + outputs)}
        for T in (1, 2, 15, 16, 17, 64, 65, 1000, 4097):
            env = {"T": T}
            args = launch.kernel_args(ptrs, env)
            assert len(args) == len(params)
            assert args[n_in:n_in + n_sc] == [T, D, F]
            assert args[n_in + n_sc + n_out:] == [0] * launch.hidden_pointers
            grid = tuple(aot.evaluate(g, env) for g in launch.grid)
            assert grid == tuple(cfg.grid(T, D, F)) + (1,), (T, grid)
        assert launch.block == cfg.num_warps * 32
        assert {k: launch.constexprs[k] for k in cfg.constexprs()} == cfg.constexprs()


class _OnlyLeftOps:
    """A number type with +, -, *, // on its left side only, like trtp.SymInt32."""

    def __init__(self, v):
        self.v = v

    def __add__(self, o): return _OnlyLeftOps(self.v + o.v)
    def __sub__(self, o): return _OnlyLeftOps(self.v - o.v)
    def __mul__(self, o): return _OnlyLeftOps(self.v * o.v)
    def __floordiv__(self, o): return _OnlyLeftOps(self.v // o.v)


def test_expressions_evaluate_in_a_symint_like_type():
    T = aot.Sym("T")
    exprs = [aot.as_expr(e) for e in (triton.cdiv(T, 16), 3 * T + 1, (T * 64 - 1) // 7, T // 1 + 0)]
    for t in (1, 5, 100):
        got = [aot.evaluate(e, {"T": _OnlyLeftOps(t)}, wrap=_OnlyLeftOps).v for e in exprs]
        assert got == [-(-t // 16), 3 * t + 1, (t * 64 - 1) // 7, t]
    assert aot.to_str(aot.as_expr((T + 16 - 1) // 16)) == "((T + 15) // 16)"


def test_runtime_sizes_cannot_choose_a_kernel():
    T = aot.Sym("T")
    with pytest.raises(TypeError, match="only known when the engine runs"):
        T <= 16
    with pytest.raises(TypeError, match="only known when the engine runs"):
        max(T, 4)


def test_ptx_arch_per_gpu():
    assert aot.ptx_arch(9, 0) == 90
    assert [aot.ptx_arch(*cc) for cc in ((8, 0), (8, 6), (8, 9), (10, 0), (12, 0))] == [80] * 5
    with pytest.raises(UserError, match="compute capability 7.5.*sm_80"):
        aot.ptx_arch(7, 5)


@triton.jit
def _big_tile_kernel(w_a_ptr, n, out_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, n):
        a = tl.load(w_a_ptr + k * BLOCK * BLOCK + i[:, None] * BLOCK + i[None, :])
        acc = tl.dot(a, a, acc)
    tl.store(out_ptr + i[:, None] * BLOCK + i[None, :], acc.to(out_ptr.dtype.element_ty))


def test_shared_memory_over_48k_is_refused():
    """The check runs on the compiler's own numbers: a 128×128 fp16 tl.dot pipeline needs
    more than 48 KiB of shared memory and must not become a TensorRT tactic."""
    with pytest.raises(aot.AotRuleError, match="bytes of shared memory"):
        aot.build_launch("Big", _big_tile_kernel, arch=80, dtype="fp16", tactic=1,
                         inputs=("w_a",), outputs=("out",), scalars={"n": aot.Sym("T")},
                         constexprs={"BLOCK": 128}, grid=(1,), num_warps=4, num_stages=3)

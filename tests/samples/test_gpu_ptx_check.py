"""samples/gpu_ptx_check.py without a GPU: what it plans, and that the argument list it
passes to cuLaunchKernel has one value of the right width per PTX parameter."""
import numpy as np
import pytest

pytest.importorskip("triton")

from lte_convert.plugins import spec  # noqa: E402
from samples import gpu_ptx_check as g  # noqa: E402
from lte_convert.trt_plugins import aot  # noqa: E402


def test_plan_covers_every_target_dtype_op_and_tactic_of_the_main_case():
    rows = g.plan(native_arch=90)
    main = {(op, arch, dtype, t) for case, op, arch, dtype, t, _ in rows if case.every_target}
    for op in (spec.OP_UP, spec.OP_DOWN):
        for dtype in spec.DTYPE_BY_NAME:
            n = len(aot.configs(op, d=576, F=1536, expert_size=32, dtype=dtype))
            for arch in aot.ARCHS:
                assert {(op, arch, dtype, t) for t in range(1, n + 1)} <= main
    assert all(arch == 90 for case, _, arch, *_ in rows if not case.every_target)


@pytest.mark.parametrize("unaligned", [False, True])
def test_launch_args_match_the_ptx_parameters(unaligned):
    case = g.CASES[2]                                  # odd d: no divisibility on D
    launch = aot.compile_op(spec.OP_UP, arch=80, dtype="fp16", tactic=1, d=case.d, F=case.F,
                            expert_size=case.expert_size, activation=case.activation,
                            gated=case.gated)
    t, ref, mask, out = g.make_inputs(case, 5, "fp16", "cpu", unaligned=unaligned)
    grid, block, smem, args = g.launch_args(launch, t, out, 5)
    width = {"u64": np.uint64, "u32": np.int32}
    assert [type(a) for a in args] == [width[p] for p in aot.ptx_params(launch.ptx, launch.kernel_name)]
    assert args[0] == t["x"].data_ptr() and args[1] == t["mask"].data_ptr()
    assert [int(a) for a in args[6:9]] == [5, case.d, case.F]          # T, D, F
    assert args[9] == out["h_out"].data_ptr() and all(a == 0 for a in args[10:])
    assert (t["x"].data_ptr() % 16 != 0) == unaligned
    cfg = aot.configs(spec.OP_UP, d=case.d, F=case.F, expert_size=case.expert_size, dtype="fp16")[0]
    assert grid == tuple(cfg.grid(5, case.d, case.F)) + (1,) and block == (launch.block, 1, 1)
    assert smem == launch.shared_mem


def test_kernel_inputs_differ_from_the_reference_only_where_the_op_must_not_look():
    case = g.CASES[0]
    t, ref, mask, _ = g.make_inputs(case, 3, "fp32", "cpu", unaligned=True)
    rows_on = mask.repeat_interleave(case.expert_size, dim=1)
    dead = ~rows_on.any(0)
    assert dead.any() and not dead.all()
    for w in ("w_gate", "w_up", "w_down_t"):
        assert t[w][dead].isnan().all() and t[w][~dead].equal(ref[w][~dead])
    assert t["h"][rows_on].equal(ref["h"][rows_on]) and (t["h"][~rows_on] != 0).all()
    assert (ref["h"][~rows_on] == 0).all() and t["mask"].bool().equal(mask)

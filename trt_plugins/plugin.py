"""TensorRT plugins `lte::SparseFFNUp` and `lte::SparseFFNDown` (tensorrt.plugin, AOT).

Importing this module registers both plugins with TensorRT's plugin registry; do it in the
process that parses the ONNX file and builds the engine (trt_plugins/builder.py does). The
engine then carries the compiled kernels: it runs without Python (`trtexec --loadEngine`,
the C++ runtime) and without this module. Needs TensorRT >= 10.9 (`tensorrt.plugin.aot_impl`).

Per plugin, in TensorRT's order:
    register   output descriptor: h [..., F] (up) or y [..., d] (down), in x's / h's dtype
    autotune   I/O types (FP16|BF16|FP32 for data, INT32 for the mask) and the tactics
    aot_impl   (kernel name, PTX, KernelLaunchParams, SymIntExprs) from trt_plugins/aot.py

The ONNX nodes carry a bool mask; TensorRT plugins take no BOOL tensors, so the builder
inserts Cast(mask -> INT32) in front of them (see builder.prepare_onnx).

Inputs and attributes come from plugins/spec.py: each function's signature is built from
spec.UP_INPUTS / spec.UP_ATTRS (and the DOWN ones), so names, order and types are the
spec's, and tensorrt.plugin validates them as if they were written out.
"""
from __future__ import annotations

import inspect
from typing import List, Tuple, Union

import tensorrt as trt
import tensorrt.plugin as trtp

from lte_convert.errors import UserError
from lte_convert.plugins import spec
from lte_convert.trt_plugins import aot

if not hasattr(trtp, "aot_impl"):
    raise ImportError(f"TensorRT {trt.__version__} has no tensorrt.plugin.aot_impl; the lte "
                      "plugins need TensorRT >= 10.9 (pip install 'tensorrt>=10.9').")

DATA_TYPES = {getattr(trt, spec.LONG_NAMES[dtype]): spec.SHORT_NAMES[dtype]
              for dtype in spec.DTYPES}
IO_DATA = "FP16|BF16|FP32"          # dependent: every data tensor has the same type
IO_MASK = "INT32"

_P = inspect.Parameter


def _signature(inputs, attrs, *, extra=(), ret=inspect.Signature.empty):
    params = [_P(n, _P.POSITIONAL_OR_KEYWORD, annotation=trtp.TensorDesc) for n in inputs]
    params += [_P(n, _P.POSITIONAL_OR_KEYWORD, annotation=t) for n, t in attrs.items()]
    params += [_P(n, _P.POSITIONAL_OR_KEYWORD, annotation=t) for n, t in extra]
    return inspect.Signature(params, return_annotation=ret)


def _with_signature(sig):
    """Give a (*args, **kwargs) function `sig`; it receives its arguments bound by name."""
    def wrap(body):
        def fn(*args, **kwargs):
            return body(sig.bind(*args, **kwargs).arguments)
        fn.__signature__ = sig
        fn.__name__ = body.__name__
        return fn
    return wrap


def _constant(expr, what):
    if expr.is_fake or not expr.is_constant:
        raise UserError(f"lte plugin: {what} must be known when the engine is built (weights "
                        "stored as ONNX initializers); it is dynamic in this network. "
                        "Re-export the model with lte-convert export.")
    return expr.constant_value()


def _tokens(desc):
    """T = product of the leading dims of a [..., C] tensor, as a TensorRT expression."""
    dims = list(desc.shape_expr)
    t = dims[0]
    for e in dims[1:-1]:
        t = t * e
    return trtp.SymInt32(t)


def _define(op, inputs, attrs, weight, out_dim):
    """Register, autotune and aot_impl for `op`. The output is inputs[0] with its last dim
    replaced by `weight`.shape[out_dim]; `weight` ([F, d]) gives the kernel's static sizes."""
    name = spec.qualified(op)
    first = inputs[0]
    with_outputs = [("outputs", Tuple[trtp.TensorDesc])]

    @_with_signature(_signature(inputs, attrs, ret=trtp.TensorDesc))
    def desc(a):
        x, w = a[first], a[weight]
        return trtp.from_shape_expr(tuple(list(x.shape_expr)[:-1]) + (w.shape_expr[out_dim],),
                                    dtype=x.dtype)

    def sizes(a):
        """aot.compile_op's keyword arguments for these descriptors and attributes."""
        x = a[first]
        if x.dtype not in DATA_TYPES:
            raise UserError(f"lte plugin {name}: input {first} has type {x.dtype}; supported: "
                            "float16, bfloat16, float32. Re-export the model in one of them.")
        w = a[weight]
        F, d = (_constant(w.shape_expr[i], f"{weight}.shape[{i}]") for i in (0, 1))
        last = _constant(x.shape_expr[-1], f"{first}.shape[-1]")
        if last != (d if op == spec.OP_UP else F):
            raise UserError(f"lte plugin {name}: {first} has last dim {last} but {weight} is "
                            f"[{F}, {d}]. The ONNX node's inputs are inconsistent; re-export.")
        kw = {n: t(a[n]) for n, t in attrs.items()}          # plain int / str
        bad = (kw["expert_size"] <= 0 or F % kw["expert_size"]
               or kw.get("activation", "silu") not in spec.ACTIVATIONS
               or kw.get("gated", 1) not in (0, 1))
        if bad:
            raise UserError(f"lte plugin {name}: attributes {kw} do not fit {weight} [{F}, {d}] "
                            f"(expert_size must divide {F}; activation one of "
                            f"{', '.join(spec.ACTIVATIONS)}; gated 0 or 1). Re-export the model.")
        return dict(arch=aot.ptx_arch(*aot.current_device_capability()),
                    dtype=DATA_TYPES[x.dtype], d=d, F=F, **kw)

    @_with_signature(_signature(inputs, attrs, extra=with_outputs,
                                ret=List[trtp.AutoTuneCombination]))
    def autotune(a):
        io = ", ".join([IO_MASK if n == "mask" else IO_DATA for n in inputs] + [IO_DATA])
        return [trtp.AutoTuneCombination(io, "LINEAR", aot.tactics(op, **sizes(a)))]

    @_with_signature(_signature(inputs, attrs, extra=with_outputs + [("tactic", int)],
                                ret=Tuple[Union[str, bytes], Union[str, bytes],
                                          trtp.KernelLaunchParams, trtp.SymIntExprs]))
    def aot_impl(a):
        tactic = int(a["tactic"]) or 1           # 0 = TensorRT's default tactic: our first
        launch = aot.compile_op(op, tactic=tactic, **sizes(a))
        env = {"T": _tokens(a[first])}
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = (
            aot.evaluate(g, env, wrap=trtp.SymInt32) for g in launch.grid)
        params.block_x = launch.block
        params.shared_mem = launch.shared_mem
        scalars = trtp.SymIntExprs.from_tuple(
            [trtp.SymInt32(aot.evaluate(e, env, wrap=trtp.SymInt32)) for _, e in launch.scalars])
        return launch.kernel_name, launch.ptx, params, scalars

    trtp.register(name)(desc)
    trtp.autotune(name)(autotune)
    trtp.aot_impl(name)(aot_impl)


# h [..., F] = up(x [..., d], ...): F from w_up [F, d];  y [..., d] = down(h [..., F], ...): d from w_down_t
_define(spec.OP_UP, spec.UP_INPUTS, spec.UP_ATTRS, weight="w_up", out_dim=0)
_define(spec.OP_DOWN, spec.DOWN_INPUTS, spec.DOWN_ATTRS, weight="w_down_t", out_dim=1)

"""ONNX (with lte::SparseFFNUp/Down nodes) -> TensorRT engine (.plan).

    model.onnx ─► prepare_onnx: find the LTE nodes, check their dtype, Cast(mask -> INT32)
               ─► OnnxParser (plugins registered by importing trt_plugins.plugin)
               ─► strongly typed network: precision = the ONNX file's types
               ─► two optimisation profiles over the named dynamic dims (batch, seq, ...):
                  "decode" (seq = 1, a non-empty cache) and "prefill" (the seq range, an
                  empty cache at opt); a file without a cache gets "prefill" only
               ─► build_serialized_network ─► model.plan, written atomically

The ONNX side (prepare_onnx, profile_shapes) is plain `onnx` and runs anywhere; only
`build_engine` needs TensorRT (>= 10.9) and a GPU of compute capability >= 8.0.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from lte_convert.atomic import atomic_path
from lte_convert.errors import UserError
from lte_convert.plugins import spec

MIN_TENSORRT = (10, 9)
INSTALL_HINT = (
    "Install TensorRT >= 10.9 for your CUDA version on a machine with an NVIDIA GPU, e.g. "
    "`pip install 'lte-convert[tensorrt]'` or `pip install 'tensorrt-cu12>=10.9'` (the wheels "
    "download from NVIDIA's index), then rerun. Without TensorRT, validate and serve the ONNX "
    "file with ONNX Runtime (`lte-convert validate model.onnx --reference CHECKPOINT`).")

# Default ranges (min, opt, max) for the dynamic dims the exporter names.
DEFAULT_DIMS = {
    "batch": (1, 1, 4),
    "seq": (1, 64, 512),
    "past_seq": (0, 64, 512),
}
# Dims that are sums of others: the attention mask covers past + new tokens.
DERIVED_DIMS = {"total_seq": ("seq", "past_seq")}

LTE_OPS = (spec.OP_UP, spec.OP_DOWN)
DATA_TYPES = {spec.ONNX_ELEM_TYPES[dtype]: spec.SHORT_NAMES[dtype] for dtype in spec.DTYPES}


@dataclass
class Prepared:
    model: onnx.ModelProto        # the graph TensorRT parses (masks cast to INT32)
    n_lte_nodes: int
    dtypes: set                   # data types of the LTE nodes ("fp16", ...)


# ---------------------------------------------------------------------------------------------
# ONNX side (no TensorRT)
# ---------------------------------------------------------------------------------------------

def _is_lte(node) -> bool:
    return node.op_type in LTE_OPS and node.domain == spec.NAMESPACE


def _elem_types(model) -> dict:
    """name -> ONNX element type for graph inputs, initializers and typed values."""
    g = model.graph
    types = {i.name: i.data_type for i in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def prepare_onnx(model: onnx.ModelProto, *, allow_dense: bool = False) -> Prepared:
    """The graph TensorRT should parse, and what it contains. Does not modify `model`.

    - counts the lte::SparseFFNUp/Down nodes; none -> UserError unless allow_dense;
    - checks each has plugin_namespace="lte" (how the parser finds the plugin) and adds
      aot=1 (use the ahead-of-time implementation, so the engine needs no Python);
    - checks the weights' dtype is fp16, bf16 or fp32;
    - inserts one Cast(mask -> INT32) per distinct mask tensor: TensorRT plugins take no
      BOOL inputs.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    lte = [n for n in g.node if _is_lte(n)]
    if not lte:
        if allow_dense:
            return Prepared(out, 0, set())
        raise UserError(
            "This ONNX file has no lte::SparseFFNUp/SparseFFNDown nodes: it is a plain (dense) "
            "model, so the engine would not skip any experts. Export the folded LTE checkpoint "
            "with `lte-convert export CHECKPOINT --out model.onnx`, or pass --allow-dense to "
            "build this dense model anyway.")
    types = _elem_types(out)
    dtypes = set()
    for n in lte:
        attrs = {a.name: a for a in n.attribute}
        ns = attrs.get(spec.PLUGIN_NAMESPACE_ATTR)
        if ns is None or ns.s.decode() != spec.NAMESPACE:
            raise UserError(
                f"Node {n.name!r} ({n.op_type}) lacks the string attribute "
                f"{spec.PLUGIN_NAMESPACE_ATTR}={spec.NAMESPACE!r} that TensorRT's ONNX parser "
                "needs to map it to the plugin. Re-export the model with this lte-convert.")
        weight = n.input[3] if n.op_type == spec.OP_UP else n.input[2]     # w_up / w_down_t
        t = types.get(weight)
        if t is not None and t not in DATA_TYPES:
            raise UserError(
                f"Node {n.name!r} has weights of type {TensorProto.DataType.Name(t)}; the lte "
                "TensorRT plugin supports float16, bfloat16 and float32. Re-export with "
                "`lte-convert export --dtype fp16` (or bf16, fp32).")
        if t is not None:
            dtypes.add(DATA_TYPES[t])
        if "aot" not in attrs:
            n.attribute.append(helper.make_attribute("aot", 1))

    casts, nodes = {}, []
    for n in g.node:
        if _is_lte(n):
            mask = n.input[1]
            if mask not in casts:
                casts[mask] = f"{mask}__int32"
                nodes.append(helper.make_node("Cast", [mask], [casts[mask]],
                                              name=f"{mask}__to_int32", to=TensorProto.INT32))
            n.input[1] = casts[mask]
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return Prepared(out, len(lte), dtypes)


def parse_range(text: str, what: str) -> tuple[int, int, int]:
    """'1:64:512' -> (1, 64, 512), checked min <= opt <= max; 'N' -> (N, N, N)."""
    parts = text.split(":")
    if len(parts) == 1:
        parts = parts * 3
    try:
        lo, opt, hi = (int(p) for p in parts)
    except ValueError:
        lo = opt = hi = None
    if len(parts) != 3 or lo is None or not 0 <= lo <= opt <= hi:
        raise UserError(f"{what}={text!r} is not a range MIN:OPT:MAX of integers with "
                        "0 <= MIN <= OPT <= MAX (e.g. 1:64:512), nor a single integer.")
    return lo, opt, hi


def profile_shapes(model: onnx.ModelProto, dims: dict | None = None) -> dict:
    """input name -> (min, opt, max) shapes for one optimisation profile.

    Fixed dims keep their value; a named dynamic dim takes its range from `dims`
    (name -> (min, opt, max)), else DEFAULT_DIMS; total_seq = seq + past_seq. Unnamed or
    unknown dynamic dims are a UserError that lists them and how to set them.
    """
    ranges = {**DEFAULT_DIMS, **(dims or {})}
    for name, parts in DERIVED_DIMS.items():
        if name not in ranges and all(p in ranges for p in parts):
            ranges[name] = tuple(sum(ranges[p][i] for p in parts) for i in range(3))
    init = {i.name for i in model.graph.initializer}
    shapes, missing = {}, []
    for inp in model.graph.input:
        if inp.name in init:
            continue
        lo, opt, hi = [], [], []
        for axis, dim in enumerate(inp.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                r = (dim.dim_value,) * 3
            elif dim.dim_param in ranges:
                r = ranges[dim.dim_param]
            else:
                missing.append(f"{inp.name}[{axis}] ({dim.dim_param or 'unnamed'})")
                continue
            for lst, v in zip((lo, opt, hi), r):
                lst.append(v)
        shapes[inp.name] = (tuple(lo), tuple(opt), tuple(hi))
    if missing:
        raise UserError(
            f"No range for the dynamic dims {', '.join(missing)}. Give one per dim name with "
            "--dim NAME=MIN:OPT:MAX (known names and defaults: "
            + ", ".join(f"{k}={':'.join(map(str, v))}" for k, v in DEFAULT_DIMS.items())
            + "; total_seq = seq + past_seq).")
    return shapes


def optimization_profiles(model: onnx.ModelProto, dims: dict | None = None) -> dict:
    """profile name -> profile_shapes(...) for each optimisation profile of the engine.

    "decode": one new token (seq = 1:1:1) on a cache of past_seq = max(1, min):opt:max, so
    TensorRT times the lte plugins' tactics at T = batch_opt tokens — the one-token configs
    of plugins.triton_kernels.launch_config (GEMV up, compacting down).
    "prefill": the seq range with past_seq at its min for opt (an empty cache, a prompt of
    seq_opt tokens): the tl.dot configs for blocks of tokens. Both cover the whole past_seq
    range; a file without past_seq (no KV cache) gets "prefill" only. The runner picks the
    first profile whose ranges hold the call's shapes (trt_plugins/runner.py).
    """
    ranges = {**DEFAULT_DIMS, **(dims or {})}
    names = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim}
    profiles = {}
    if "past_seq" in names and "seq" in names:
        lo, opt, hi = ranges["past_seq"]
        profiles["decode"] = profile_shapes(
            model, {**ranges, "seq": (1, 1, 1), "past_seq": (max(1, lo), max(1, opt), max(1, hi))})
        ranges = {**ranges, "past_seq": (lo, lo, hi)}
    profiles["prefill"] = profile_shapes(model, ranges)
    return profiles


# ---------------------------------------------------------------------------------------------
# TensorRT side
# ---------------------------------------------------------------------------------------------

def import_tensorrt():
    """The tensorrt module, or a UserError that says how to install it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise UserError(f"TensorRT is not installed here ({e}). {INSTALL_HINT}") from None
    version = tuple(int(v) for v in re.findall(r"\d+", trt.__version__)[:2])
    if version < MIN_TENSORRT:
        raise UserError(f"TensorRT {trt.__version__} is too old: the lte plugin's ahead-of-time "
                        f"kernels need TensorRT >= 10.9. {INSTALL_HINT}")
    return trt


def make_logger(trt, verbose=False):
    """A trt.ILogger that prints warnings (everything with verbose) and keeps the errors."""
    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors = []

        def log(self, severity, msg):
            level = int(severity)               # INTERNAL_ERROR 0, ERROR 1, WARNING 2, INFO 3, ...
            if level <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            if verbose or level <= int(trt.ILogger.Severity.WARNING):
                print(f"[TensorRT] {msg}", flush=True)

    return Logger()


def build_engine(onnx_path, engine_path, *, dims: dict | None = None, allow_dense=False,
                 workspace_gib: float | None = None, overwrite=False, verbose=False) -> dict:
    """Build `engine_path` from `onnx_path`; returns a summary (nodes, dtypes, shapes, bytes).

    dims: dim name -> (min, opt, max) overriding DEFAULT_DIMS. The engine file is written
    atomically: on any error nothing is left at `engine_path`.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise UserError(f"ONNX file {onnx_path} does not exist.")
    if engine_path.exists() and not overwrite:
        raise UserError(f"{engine_path} already exists; pass --overwrite to replace it.")
    model = onnx.load(str(onnx_path), load_external_data=False)
    prepared = prepare_onnx(model, allow_dense=allow_dense)
    profiles = optimization_profiles(model, dims)

    trt = import_tensorrt()
    if prepared.n_lte_nodes:
        from lte_convert.trt_plugins import aot

        aot.ptx_arch(*aot.current_device_capability())    # refuses GPUs older than sm_80
        import lte_convert.trt_plugins.plugin  # noqa: F401  (registers lte::SparseFFNUp/Down)

    logger = make_logger(trt, verbose)
    builder = trt.Builder(logger)
    flags = trt.NetworkDefinitionCreationFlag
    # strongly typed: every tensor keeps the ONNX file's type (TensorRT 11: always so)
    network = builder.create_network(
        1 << int(flags.STRONGLY_TYPED) if hasattr(flags, "STRONGLY_TYPED") else 0)
    parser = trt.OnnxParser(network, logger)
    if hasattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE"):      # TensorRT >= 10.15
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    if not parser.parse(prepared.model.SerializeToString(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse {onnx_path}: {errors}")
    plugins = sum(network.get_layer(i).type == trt.LayerType.PLUGIN_V3
                  for i in range(network.num_layers))
    if plugins < prepared.n_lte_nodes:
        raise UserError(
            f"TensorRT {trt.__version__} turned only {plugins} of the {prepared.n_lte_nodes} lte "
            "nodes into plugins (it expanded the others' ONNX function bodies, which compute "
            "every expert). Use TensorRT >= 10.9, whose parser maps nodes with "
            "plugin_namespace='lte' to the registered plugins.")

    config = builder.create_builder_config()
    for shapes in profiles.values():                 # profile index = order of `profiles`
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            profile.set_shape(name, *shapes[name])
        config.add_optimization_profile(profile)
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path}: "
                        + ("; ".join(logger.errors) or "no error message (rerun with --verbose)"))
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(plan))
    return {"lte_nodes": prepared.n_lte_nodes, "dtypes": sorted(prepared.dtypes),
            "profiles": profiles, "shapes": profiles["prefill"],
            "bytes": engine_path.stat().st_size}

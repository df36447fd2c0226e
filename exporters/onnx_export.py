"""Export a folded LTE model to ONNX: custom FFN node pairs with their function bodies.

    LTE checkpoint ─► load (dtype) ─► check it fits the dtype ─► wrap (KV cache or not)
        ─► torch.onnx.export(dynamo=True, opset 19, dynamic batch/seq axes)
        ─► fold constants, drop unused nodes, constants become initializers
        ─► count the lte nodes (a silent fallback exporter drops them) ─► attach the functions
        ─► metadata ─► save to a temporary file (external data past the threshold)
        ─► onnx.checker on it ─► rename onto --out (an existing --out only with overwrite)

Every folded LTEFFN becomes router MatMul/Add → Greater(0) (a bool mask of static shape) →
lte::SparseFFNUp → lte::SparseFFNDown (exporters/symbolic.py); the FFN weights are graph
initializers in the kernel layout ([F, d], W_down transposed) under their module names.

Memory: the exported graph's initializers are views of the model's parameters, and
ONNXProgram.save streams them to disk, so peak memory is about the model's size in the
export dtype plus tracing overhead (measured in results/exporters.md) — never a second copy
through a ModelProto, which doubles it and fails past 2 GB.

Graph clean-up: torch.onnx's own `optimize=True` (onnxscript's optimizer, whose pattern
rewriter tries every rule on every node, twice) took 89 of the 149 s that exporting SmolLM2
took on 2 CPU cores; constant folding and dead-node removal alone take under a second. The
file has more nodes (4,550 against 2,395) and the same outputs bit for bit; ONNX Runtime fuses
at session creation either way (decode step 38.6 vs 38.0 ms, the same session time).
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer
import torch

from lte_convert.atomic import atomic_path, fsync
from lte_convert.checks import check_writable
from lte_convert.errors import UserError
from lte_convert.exporters import functions, metadata, symbolic, wrappers
from lte_convert.plugins import spec

OPSET = functions.OPSET
TWO_GB = 2 * 1024**3
# Below 2 GiB by a margin: the protobuf limit counts the graph and metadata too.
EXTERNAL_DATA_THRESHOLD = TWO_GB - 64 * 1024**2


def data_path(onnx_path: Path) -> Path:
    """Where ONNXProgram.save puts external data: beside the model, `<name>.data`."""
    return onnx_path.with_name(onnx_path.name + ".data")


def check_fits_dtype(model, dtype: torch.dtype) -> None:
    """UserError when a parameter is not finite in `dtype` (e.g. |w| > 65504 in fp16)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(
                f"The model does not fit {spec.LONG_NAMES[dtype]}: parameter {name} has values "
                f"that are not finite in that dtype (the largest finite {spec.LONG_NAMES[dtype]} "
                f"is {torch.finfo(dtype).max:.4g}). Export with --dtype fp32 or bf16 instead.")


def _check_outputs_finite(wrapper, kwargs, dtype):
    with torch.no_grad():
        out = wrapper(**kwargs)
    logits = out[0] if isinstance(out, tuple) else out
    if not torch.isfinite(logits).all():
        raise UserError(
            f"The model does not fit {spec.LONG_NAMES[dtype]}: its outputs overflow (inf/NaN) on a "
            f"sample input in that dtype. Export with --dtype fp32 (or bf16) instead.")


def count_custom_nodes(model: ir.Model) -> dict[str, int]:
    counts = {spec.OP_UP: 0, spec.OP_DOWN: 0}
    for node in model.graph.all_nodes():
        if node.domain == spec.NAMESPACE and node.op_type in counts:
            counts[node.op_type] += 1
    return counts


def _attach_functions(model: ir.Model) -> None:
    for proto in functions.functions():
        fn = ir.serde.deserialize_function(proto)
        model.functions[fn.identifier()] = fn


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)


def export_model(model, out, *, info: dict | None = None, kv_cache: bool = True,
                 external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                 fingerprint: str = "", overwrite: bool = False) -> dict:
    """Export a folded LTE model (in its current dtype) to `out`. Returns a summary dict.

    An existing `out` is refused unless overwrite=True. kv_cache applies to decoders only
    (encoders never have one). External data is used when
    the initializers exceed `external_data_threshold` bytes (at most EXTERNAL_DATA_THRESHOLD:
    a single ONNX file cannot exceed 2 GiB).
    """
    from lte_convert.converter.surgery import lte_modules

    out = Path(out)
    modules = lte_modules(model)
    if not modules:
        raise UserError("The model has no LTE FFNs; export takes an LTE checkpoint (made by "
                        "`lte-convert train` or `lte-convert run`), not a plain Hugging Face model.")
    not_folded = [i for i, m in modules if m.mode != "folded"]
    if not_folded:
        raise UserError(f"The LTE FFNs of layers {not_folded} are not folded (mode "
                        f"{modules[0][1].mode!r}); only folded routers export to the sparse op. "
                        "Run `lte-convert fold CKPT` first, then export the folded checkpoint.")
    check_writable(out, overwrite)
    dtype = model.dtype
    check_fits_dtype(model, dtype)
    kv_cache = kv_cache and wrappers.is_decoder(model)
    n_layers = model.config.get_text_config().num_hidden_layers
    wrapper = (wrappers.WithCache if kv_cache else wrappers.Plain)(model).eval()
    kwargs, shapes = wrappers.sample_inputs(model, kv_cache, model.config.get_text_config().vocab_size)
    _check_outputs_finite(wrapper, kwargs, dtype)

    # torch.onnx logs a warning per torchvision op it cannot register; they are noise here
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings(), symbolic.onnx_schemas():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, (), kwargs=kwargs, dynamo=True, dynamic_shapes=shapes,
            input_names=wrappers.input_names(n_layers, kv_cache),
            output_names=wrappers.output_names(n_layers, kv_cache),
            opset_version=OPSET, verbose=False, optimize=False,
            custom_translation_table=symbolic.translation_table())
    graph = program.model
    onnxscript.optimizer.fold_constants(graph)
    ir.passes.Sequential(
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
    )(graph)

    counts = count_custom_nodes(graph)
    if counts != {spec.OP_UP: len(modules), spec.OP_DOWN: len(modules)}:
        raise RuntimeError(
            f"The exported graph has {counts[spec.OP_UP]} {spec.OP_UP} and "
            f"{counts[spec.OP_DOWN]} {spec.OP_DOWN} nodes, expected {len(modules)} of each (one "
            "pair per LTE FFN). torch.onnx.export fell back to a mode in which the custom op is "
            "not emitted; re-run with TORCH_LOGS=onnx to see why the first attempt failed.")
    _attach_functions(graph)
    props = metadata.build(model, modules, info or {}, dtype=spec.LONG_NAMES[dtype],
                           kv_cache=kv_cache, fingerprint=fingerprint)
    graph.metadata_props.update(props)

    size = _initializer_bytes(graph)
    external = size > min(external_data_threshold, EXTERNAL_DATA_THRESHOLD)
    with atomic_path(out) as tmp:
        program.save(tmp, external_data=external)
        del program, graph
        _check(tmp, out)
        tmp_data = data_path(tmp)
        if external:
            # the data goes in first: the .onnx that points at it appears last (on exit)
            fsync(tmp_data)
            os.replace(tmp_data, data_path(out))
        elif tmp_data.exists():
            tmp_data.unlink()
    if not external and data_path(out).exists():
        data_path(out).unlink()        # a stale file from an earlier external-data export
    return {"path": str(out), "data_path": str(data_path(out)) if external else None,
            "bytes": size, "external_data": external, "kv_cache": kv_cache,
            "dtype": spec.LONG_NAMES[dtype], "custom_nodes": counts, "metadata": props}


def _check(tmp: Path, out: Path) -> None:
    """onnx.checker on the written (temporary) file, before it is renamed to `out`."""
    try:
        onnx.checker.check_model(str(tmp))
    except onnx.checker.ValidationError as e:
        raise RuntimeError(f"The exported graph for {out} fails onnx.checker, so it was not "
                           f"written: {e}") from e


def export_checkpoint(ckpt, out, *, dtype: str = "fp32", kv_cache: bool = True,
                      external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                      overwrite: bool = False, trust_remote_code: bool = False) -> dict:
    """`lte-convert export`: load an LTE checkpoint in `dtype` and export it."""
    from lte_convert.converter.checkpoint import load_lte_model

    ckpt = Path(ckpt)
    if dtype not in spec.DTYPE_BY_NAME:
        raise UserError(f"Unknown dtype {dtype!r}; expected one of "
                        f"{', '.join(spec.DTYPE_BY_NAME)}.")
    check_writable(Path(out), overwrite)
    model, info = load_lte_model(ckpt, dtype=spec.DTYPE_BY_NAME[dtype],
                                 trust_remote_code=trust_remote_code)
    model.eval()
    return export_model(model, out, info=info, kv_cache=kv_cache, overwrite=overwrite,
                        external_data_threshold=external_data_threshold,
                        fingerprint=metadata.checkpoint_fingerprint(ckpt))

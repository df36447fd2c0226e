"""Backends that `lte-convert validate` compares: anything with `name` and `run(feeds)`.

    class Backend(Protocol):
        name: str
        def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

`feeds` are the ONNX file's inputs by name (int64 ids/masks/positions; past keys/values as
float32 — a backend casts them to its own dtype). It returns the ONNX outputs by name in
any float dtype, plus optionally `lte_mask.{k}` [..., E] bool: the k-th LTE FFN's expert mask
(graph order), for counting flipped expert decisions. trt_plugins.runner.EngineRunner is one
(the TensorRT engine); here are ONNX Runtime and the PyTorch reference.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from lte_convert.exporters import wrappers
from lte_convert.plugins import spec

MASK_PREFIX = "lte_mask."


class Backend(Protocol):
    name: str

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


# ---------------------------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------------------------
def mask_tensors(proto: onnx.ModelProto) -> list[str]:
    """Names of the mask inputs of the SparseFFNUp nodes, in graph order."""
    return [n.input[1] for n in proto.graph.node
            if n.domain == spec.NAMESPACE and n.op_type == spec.OP_UP]


def _bf16_to_fp32_tensor(t: onnx.TensorProto) -> None:
    if t.data_type == TensorProto.BFLOAT16:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))


def _upcast_graph(graph: onnx.GraphProto) -> None:
    """Every bfloat16 in the graph becomes float32 (types, initializers, constants, casts)."""
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        if vi.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    for t in graph.initializer:
        _bf16_to_fp32_tensor(t)
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                _bf16_to_fp32_tensor(a.t)
            elif a.type == onnx.AttributeProto.GRAPH:
                _upcast_graph(a.g)
            elif a.name == "to" and a.i == TensorProto.BFLOAT16:
                a.i = TensorProto.FLOAT


def providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtBackend:
    """ONNX Runtime on a validation copy of the file: masks exposed as extra outputs.

    bfloat16 files run as a float32 upcast copy (same weights, bf16 values made fp32):
    ONNX Runtime has no bf16 CPU kernels and its Python API no bf16 arrays. `upcast` says so.
    """

    name = "onnxruntime"

    def __init__(self, path, proto: onnx.ModelProto, masks: bool = True):
        import onnxruntime as ort

        path = Path(path)
        proto = onnx.ModelProto.FromString(proto.SerializeToString())   # no weights: cheap
        self.masks = mask_tensors(proto) if masks else []
        for k, name in enumerate(self.masks):
            proto.graph.output.append(onnx.helper.make_tensor_value_info(
                MASK_PREFIX + str(k), TensorProto.BOOL, None))
            proto.graph.node.append(onnx.helper.make_node(
                "Identity", [name], [MASK_PREFIX + str(k)]))
        self.upcast = any(i.type.tensor_type.elem_type == TensorProto.BFLOAT16
                          for i in proto.graph.output)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.providers = providers()
        if self.upcast:
            # the fp32 weights are new data: written (as external data) to a temporary folder
            with tempfile.TemporaryDirectory(prefix="lte-validate-") as tmp:
                copy = Path(tmp) / path.name
                onnx.load_external_data_for_model(proto, str(path.parent))
                _upcast_graph(proto.graph)
                onnx.save(proto, str(copy), save_as_external_data=True,
                          location=path.name + ".data", size_threshold=1024)
                del proto
                self.session = ort.InferenceSession(str(copy), opts, providers=self.providers)
        else:
            # the graph from memory, its external data read from beside the original file
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                          str(path.parent.resolve()))
            self.session = ort.InferenceSession(proto.SerializeToString(), opts,
                                                providers=self.providers)
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}

    def run(self, feeds):
        cast = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        f = {k: (np.asarray(v).astype(cast[self.input_types[k]])
                 if self.input_types[k] in cast else np.asarray(v))
             for k, v in feeds.items()}
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, f)))


# ---------------------------------------------------------------------------------------------
# PyTorch (the LTE model, whose folded FFNs run the plugins op)
# ---------------------------------------------------------------------------------------------
class TorchBackend:
    """The PyTorch model on the same feeds; masks from the LTE modules' routers (hooks)."""

    name = "pytorch"

    def __init__(self, model, kv_cache: bool):
        from lte_convert.converter.surgery import lte_modules

        self.model = model.eval()
        self.kv_cache = kv_cache
        self.decoder = wrappers.is_decoder(model)
        self.cache_kwarg = wrappers._cache_kwarg(model)
        self._lte = [m for _, m in lte_modules(model)]

    def _t(self, a, dtype=None):
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.model.device, dtype)

    @torch.no_grad()
    def run(self, feeds):
        masks = []
        hooks = [m.register_forward_hook(
            lambda mod, args, out: masks.append(mod.router_logits(args[0]) > 0))
            for m in self._lte]              # removed after the run: the model stays as it was
        try:
            res = self._run(feeds)
        finally:
            for h in hooks:
                h.remove()
        for k, m in enumerate(masks):
            res[MASK_PREFIX + str(k)] = m.cpu().numpy()
        return res

    def _run(self, feeds):
        kw = {"input_ids": self._t(feeds["input_ids"]),
              "attention_mask": self._t(feeds["attention_mask"])}
        if self.decoder:
            kw["use_cache"] = self.kv_cache
        if self.kv_cache:
            from transformers import DynamicCache

            kw["position_ids"] = self._t(feeds["position_ids"])
            n = sum(1 for k in feeds if k.startswith("past_key_values.") and k.endswith(".key"))
            past = [(self._t(feeds[f"past_key_values.{i}.key"], self.model.dtype),
                     self._t(feeds[f"past_key_values.{i}.value"], self.model.dtype))
                    for i in range(n)]
            kw[self.cache_kwarg] = DynamicCache(past) if past[0][0].shape[2] else DynamicCache()
        out = self.model(**kw)
        res = {"logits": out.logits.float().cpu().numpy()}
        if self.kv_cache:
            for i, layer in enumerate(wrappers.output_cache(out).layers):
                res[f"present.{i}.key"] = layer.keys.float().cpu().numpy()
                res[f"present.{i}.value"] = layer.values.float().cpu().numpy()
        return res

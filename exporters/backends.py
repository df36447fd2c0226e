"""Backends that `lte-convert validate` compares: anything with `name` and `run(feeds)`.

    class Backend(Protocol):
        name: str
        def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

`feeds` are the ONNX file's inputs by name (int64 ids/masks/positions; past keys/values as
float32 — a backend casts them to its own dtype). It returns the ONNX outputs by name in
any float dtype, plus optionally, per LTE FFN k (graph order), what validate's mask-forced
comparison and flip check read:

    lte_mask.{k}  [..., E] bool   the expert mask the backend computed
    lte_x.{k}     [..., d]        the FFN's input (what its router saw)
    lte_ffn.{k}   [..., d]        the FFN's output (where a wrong layer first shows)

trt_plugins.runner.EngineRunner is one (the TensorRT engine: no masks); here are ONNX
Runtime (all three, as extra graph outputs) and the PyTorch reference, which can also run with
the masks forced to another backend's (`run(feeds, force=[mask per LTE FFN])`).
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
X_PREFIX = "lte_x."
FFN_PREFIX = "lte_ffn."


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


def probe_tensors(proto: onnx.ModelProto) -> dict[str, str]:
    """Extra output name -> graph tensor: each LTE FFN's mask, input x and output y."""
    ups = [n for n in proto.graph.node if n.domain == spec.NAMESPACE and n.op_type == spec.OP_UP]
    downs = [n for n in proto.graph.node
             if n.domain == spec.NAMESPACE and n.op_type == spec.OP_DOWN]
    out = {}
    for k, (up, down) in enumerate(zip(ups, downs)):
        out.update({f"{MASK_PREFIX}{k}": up.input[1], f"{X_PREFIX}{k}": up.input[0],
                    f"{FFN_PREFIX}{k}": down.output[0]})
    return out


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
    """ONNX Runtime on a validation copy of the file: each LTE FFN's mask, input and output
    exposed as extra outputs (probe_tensors), unless masks=False.

    bfloat16 files run as a float32 upcast copy (same weights, bf16 values made fp32):
    ONNX Runtime has no bf16 CPU kernels and its Python API no bf16 arrays. `upcast` says so.
    """

    name = "onnxruntime"

    def __init__(self, path, proto: onnx.ModelProto, masks: bool = True):
        import onnxruntime as ort

        path = Path(path)
        proto = onnx.ModelProto.FromString(proto.SerializeToString())   # no weights: cheap
        self.masks = mask_tensors(proto) if masks else []
        model_type = proto.graph.output[0].type.tensor_type.elem_type     # logits: model dtype
        for out, name in (probe_tensors(proto) if masks else {}).items():
            elem = TensorProto.BOOL if out.startswith(MASK_PREFIX) else model_type
            proto.graph.output.append(onnx.helper.make_tensor_value_info(out, elem, None))
            proto.graph.node.append(onnx.helper.make_node("Identity", [name], [out]))
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
    """The PyTorch model on the same feeds. Hooks record each LTE FFN's mask, input and
    output; `run(feeds, force=masks)` makes every LTE FFN compute exactly the experts of
    `masks` (one bool array per LTE FFN, in order) instead of its router's choice. The hooks
    live only during `run`: the model is left as it was."""

    name = "pytorch"

    def __init__(self, model, kv_cache: bool):
        from lte_convert.converter.surgery import lte_modules

        self.model = model.eval()
        self.kv_cache = kv_cache
        self.decoder = wrappers.is_decoder(model)
        self.cache_kwarg = wrappers._cache_kwarg(model)
        self.modules = [m for _, m in lte_modules(model)]
        self._probes: dict = {}
        self._force = None

    def _hook(self) -> list:
        handles = []
        for k, m in enumerate(self.modules):
            handles.append(m.router.register_forward_hook(
                lambda mod, args, z, k=k: self._route(k, args[0], z)))
            handles.append(m.register_forward_hook(
                lambda mod, args, y, k=k: self._probes.__setitem__(FFN_PREFIX + str(k), y)))
        return handles

    def _route(self, k, x, z):
        """Record the router's input and decision; with `force`, replace the decision."""
        if self._force is not None:
            m = torch.from_numpy(np.asarray(self._force[k], bool)).to(z.device).reshape(z.shape)
            z = torch.where(m, 1.0, -1.0).to(z.dtype)
        self._probes[X_PREFIX + str(k)] = x
        self._probes[MASK_PREFIX + str(k)] = z > 0
        return z

    def _t(self, a, dtype=None):
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.model.device, dtype)

    @torch.no_grad()
    def run(self, feeds, force=None):
        self._probes.clear()
        self._force = force
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
        handles = self._hook()
        try:
            out = self.model(**kw)
        finally:
            self._force = None
            for h in handles:
                h.remove()
        res = {"logits": out.logits.float().cpu().numpy()}
        if self.kv_cache:
            for i, layer in enumerate(wrappers.output_cache(out).layers):
                res[f"present.{i}.key"] = layer.keys.float().cpu().numpy()
                res[f"present.{i}.value"] = layer.values.float().cpu().numpy()
        for k, v in self._probes.items():
            res[k] = v.cpu().numpy() if v.dtype == torch.bool else v.float().cpu().numpy()
        return res

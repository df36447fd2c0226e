"""Run a TensorRT engine (.plan) from Python: the engine backend of `lte-convert validate`.

Uses TensorRT's runtime and PyTorch CUDA tensors for the buffers; takes numpy arrays (cast
to the engine's input types; bfloat16 inputs as ml_dtypes.bfloat16 or float32) and returns
numpy arrays (bfloat16 outputs as float32): the `Backend` of exporters/backends.py. The lte plugins'
kernels are inside the engine (AOT), so nothing from trt_plugins.plugin is imported here:
running the engine proves it needs no Python plugin code.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lte_convert.errors import UserError
from lte_convert.trt_plugins.builder import import_tensorrt, make_logger


def _torch_dtype(trt, dt):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16,
             trt.bfloat16: torch.bfloat16, trt.int32: torch.int32, trt.int64: torch.int64,
             trt.int8: torch.int8, trt.uint8: torch.uint8, trt.bool: torch.bool}
    return table[dt]


def _to_torch(a: np.ndarray, dtype, device):
    import torch

    if a.dtype.name == "bfloat16":          # ml_dtypes: numpy has no bf16 of its own
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device=device, dtype=dtype).contiguous()


def _to_numpy(t) -> np.ndarray:
    """numpy copy; bfloat16 comes back as float32 (exact), which every consumer reads."""
    import torch

    return (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()


class EngineRunner:
    """Deserialize once, run many times: `EngineRunner("model.plan").run({"input_ids": ...})`."""

    name = "tensorrt"

    def __init__(self, engine_path):
        import torch

        self.trt = trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise UserError("Running a TensorRT engine needs a CUDA GPU and a CUDA build of "
                            "PyTorch; none is available here.")
        path = Path(engine_path)
        if not path.is_file():
            raise UserError(f"Engine file {path} does not exist; build it with "
                            "`lte-convert build model.onnx --engine model.plan`.")
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)             # must outlive the engine
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(
                f"TensorRT could not load {path}: {'; '.join(self.logger.errors)}. An engine "
                "only loads with the TensorRT version and GPU model it was built with; rebuild "
                "it on this machine.")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self.active_profile = 0

    def profile(self, index: int = 0) -> dict:
        """input name -> (min, opt, max) shapes of optimisation profile `index` (the builder
        writes "decode" first when the file has a KV cache, then "prefill")."""
        return {n: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, index))
                for n in self.inputs}

    def _pick_profile(self, shapes: dict) -> int:
        """The first optimisation profile whose ranges hold every input shape."""
        def holds(prof):
            return all(len(shapes[n]) == len(prof[n][0]) and all(
                a <= s <= b for s, a, b in zip(shapes[n], prof[n][0], prof[n][2]))
                for n in self.inputs)
        profiles = [self.profile(i) for i in range(self.engine.num_optimization_profiles)]
        for i, prof in enumerate(profiles):
            if holds(prof):
                return i
        raise UserError(
            "Input shapes " + ", ".join(f"{n} {tuple(shapes[n])}" for n in self.inputs)
            + " fit none of the engine's profiles ("
            + "; ".join(", ".join(f"{n} min {p[n][0]} max {p[n][2]}" for n in self.inputs)
                        for p in profiles)
            + "). Rebuild with wider ranges, e.g. `lte-convert build model.onnx --engine "
            "model.plan --batch 1:1:8 --seq 1:64:1024`.")

    def run(self, feeds: dict) -> dict:
        """numpy inputs by name -> numpy outputs by name (one synchronous execution)."""
        import torch

        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise UserError(f"The engine needs inputs {missing}; got {sorted(feeds)}.")
        dev = torch.device("cuda")
        # empty tensors (an empty KV cache) still get a valid address
        spare = torch.empty(256, dtype=torch.uint8, device=dev)
        address = lambda t: t.data_ptr() if t.numel() else spare.data_ptr()  # noqa: E731
        stream = torch.cuda.current_stream()
        index = self._pick_profile({n: np.shape(feeds[n]) for n in self.inputs})
        if index != self.active_profile:
            self.context.set_optimization_profile_async(index, stream.cuda_stream)
            self.active_profile = index
        keep = {}
        for n in self.inputs:
            a = np.asarray(feeds[n])
            keep[n] = _to_torch(a, _torch_dtype(self.trt, self.engine.get_tensor_dtype(n)), dev)
            self.context.set_input_shape(n, tuple(a.shape))
            self.context.set_tensor_address(n, address(keep[n]))
        outs = {}
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            outs[n] = torch.empty(shape, device=dev,
                                  dtype=_torch_dtype(self.trt, self.engine.get_tensor_dtype(n)))
            self.context.set_tensor_address(n, address(outs[n]))
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise UserError(f"TensorRT failed to run the engine: {'; '.join(self.logger.errors)}")
        stream.synchronize()
        return {n: _to_numpy(t) for n, t in outs.items()}

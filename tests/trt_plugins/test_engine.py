"""A real TensorRT engine from an exported tiny LTE model, against ONNX Runtime.

Needs the tensorrt package (>= 10.9) and a CUDA GPU: skipped otherwise, with the reason.
Run with `pytest -m tensorrt tests/trt_plugins/test_engine.py` on a GPU machine.
"""
import subprocess
import sys

import numpy as np
import onnx
import pytest

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (it needs an NVIDIA GPU: "
                                             "pip install 'tensorrt>=10.9')")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("TensorRT engines need a CUDA GPU; none is visible", allow_module_level=True)

from lte_convert.errors import UserError  # noqa: E402
from lte_convert.exporters.backends import OrtBackend  # noqa: E402
from lte_convert.exporters.validate import cache_layout, run_steps  # noqa: E402
from lte_convert.trt_plugins import builder  # noqa: E402
from lte_convert.trt_plugins.runner import EngineRunner  # noqa: E402

pytestmark = pytest.mark.tensorrt
# fp32 engines may use TF32 in TensorRT's own matmuls (its default); the plugin is fp32 IEEE
TOL = {"fp32": 1e-2, "fp16": 5e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DIMS = {"batch": (1, 2, 2), "seq": (1, 8, 16), "past_seq": (0, 8, 16)}


def export_tiny(path, dtype):
    from tests.tiny_models import tiny_model

    from lte_convert.converter.checkpoint import fold
    from lte_convert.converter.surgery import convert_model
    from lte_convert.exporters.onnx_export import export_model

    model, _ = tiny_model("llama")
    model = convert_model(model, expert_size=16)
    fold(model)
    export_model(model.to(DTYPES[dtype]).eval(), path)
    return path


@pytest.fixture(scope="module", params=list(DTYPES))
def built(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    src = export_tiny(folder / "tiny.onnx", request.param)
    plan = folder / "tiny.plan"
    summary = builder.build_engine(src, plan, dims=DIMS)
    return request.param, src, plan, summary


def test_engine_matches_onnxruntime_prefill_and_decode(built):
    dtype, src, plan, summary = built
    assert summary["lte_nodes"] == 4 and summary["dtypes"] == [dtype]
    proto = onnx.load(str(src), load_external_data=False)
    ids = np.random.default_rng(0).integers(4, 100, (2, 9))
    ort = run_steps(OrtBackend(src, proto, masks=False), ids, cache_layout(proto))
    eng = run_steps(EngineRunner(plan), ids, cache_layout(proto))
    for (step, _, a), (_, _, b) in zip(ort, eng):
        ref, got = a["logits"].astype(np.float32), b["logits"].astype(np.float32)
        err = np.abs(ref - got).max() / max(1.0, np.abs(ref).max())
        assert err < TOL[dtype], (step, err)
        assert (ref.argmax(-1) == got.argmax(-1)).mean() > 0.9, step


def test_engine_runs_without_the_python_plugin(built):
    """AOT: deserialising and running the engine needs no trt_plugins.plugin import."""
    _, src, plan, _ = built
    code = ("import sys, numpy as np; from lte_convert.trt_plugins.runner import EngineRunner; "
            f"r = EngineRunner({str(plan)!r}); "
            "feeds = {n: np.zeros(r.profile()[n][0], np.int64 if 'past' not in n else np.float32) "
            "for n in r.inputs}; feeds['attention_mask'][:] = 1; r.run(feeds); "
            "assert 'lte_convert.trt_plugins.plugin' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_shapes_outside_the_profile_are_a_user_error(built):
    _, _, plan, _ = built
    r = EngineRunner(plan)
    feeds = {n: np.zeros(r.profile()[n][2], np.int64) for n in r.inputs}
    feeds["input_ids"] = np.zeros((3, 1), np.int64)                # batch 3 > max 2
    with pytest.raises(UserError, match="outside the engine's profile"):
        r.run(feeds)

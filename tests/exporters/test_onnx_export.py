"""Export every family (tiny random models) and validate it against PyTorch through ORT.

One export per (family, KV cache) is shared by the structure and validation checks.
"""
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from lte_convert.errors import UserError
from lte_convert.exporters import metadata
from lte_convert.exporters.onnx_export import data_path, export_checkpoint
from lte_convert.exporters.validate import validate
from lte_convert.plugins import spec
from tests.exporters.conftest import tiny_checkpoint
from tests.tiny_models import FAMILIES, HIDDEN, LAYERS

ENCODERS = ("bert", "roberta")
DECODERS = tuple(f for f in FAMILIES if f not in ENCODERS)
ACTIVATION = {"gpt2": "gelu_tanh", "bert": "gelu", "roberta": "gelu", "opt": "relu",
              "gpt_neox": "gelu", "gemma": "gelu_tanh"}      # others: silu
CASES = [pytest.param(f, True, id=f"{f}-kv") for f in DECODERS] + [
    pytest.param(f, False, id=f"{f}-nokv") for f in FAMILIES]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = tiny_checkpoint(family, tmp_path_factory.mktemp("ckpt") / family)
        return made[family]
    return get


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    made = {}

    def get(family, kv):
        if (family, kv) not in made:
            out = tmp_path_factory.mktemp("onnx") / f"{family}-{int(kv)}.onnx"
            made[family, kv] = export_checkpoint(checkpoints(family), out, kv_cache=kv)
        return made[family, kv]
    return get


def _dims(vi):
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


@pytest.mark.parametrize("family,kv", CASES)
def test_export_and_validate(family, kv, checkpoints, exported):
    r = exported(family, kv)
    assert r["kv_cache"] == kv and not r["external_data"]
    m = onnx.load(r["path"])
    onnx.checker.check_model(m, full_check=True)
    assert {o.domain: o.version for o in m.opset_import}[""] >= 18

    # the custom node pair per layer, attributes from the spec, weights in kernel layout
    ups = [n for n in m.graph.node if n.domain == spec.NAMESPACE and n.op_type == spec.OP_UP]
    downs = [n for n in m.graph.node if n.domain == spec.NAMESPACE and n.op_type == spec.OP_DOWN]
    assert len(ups) == len(downs) == LAYERS
    attrs = {a.name: a for a in ups[0].attribute}
    assert attrs["activation"].s.decode() == ACTIVATION.get(family, "silu")
    assert attrs["gated"].i == int(family in ("llama", "mistral", "qwen2", "qwen3", "gemma"))
    assert attrs["plugin_namespace"].s.decode() == spec.NAMESPACE
    inits = {t.name: t for t in m.graph.initializer}
    w_down_t = inits[downs[0].input[2]]
    assert tuple(w_down_t.dims) == (160, HIDDEN)          # [F, d]: W_down transposed
    assert {(f.domain, f.name) for f in m.functions} == {
        (spec.NAMESPACE, spec.OP_UP), (spec.NAMESPACE, spec.OP_DOWN)}

    # names and dynamic axes as the ecosystem (optimum) has them
    ins = {i.name: _dims(i) for i in m.graph.input}
    outs = {o.name: _dims(o) for o in m.graph.output}
    assert ins["input_ids"] == ["batch", "seq"]
    assert outs["logits"][:2] == ["batch", "seq"]
    if kv:
        assert ins["attention_mask"] == ["batch", "total_seq"]
        assert ins["position_ids"] == ["batch", "seq"]
        for i in range(LAYERS):
            for k in ("key", "value"):
                d = ins[f"past_key_values.{i}.{k}"]
                assert d[0] == "batch" and d[2] == "past_seq" and isinstance(d[1], int)
                assert outs[f"present.{i}.{k}"][0] == "batch"
        assert len(ins) == 3 + 2 * LAYERS and len(outs) == 1 + 2 * LAYERS
    else:
        assert list(ins) == ["input_ids", "attention_mask"] and list(outs) == ["logits"]

    meta = metadata.read({p.key: p.value for p in m.metadata_props})
    assert meta["format"] == "lte-onnx" and meta["format_version"] == "1"
    assert meta["expert_size"] == "32" and meta["sparsity"] == [0.5] * LAYERS
    assert meta["source_model"] == f"tiny-{family}" and meta["model_type"] == family
    assert meta["kv_cache"] == str(int(kv)) and meta["dtype"] == "float32"

    rep = validate(r["path"], checkpoints(family), n=2, seq_len=12)
    assert rep["passed"], rep["failures"]
    assert rep["forced"][next(iter(rep["forced"]))]["max_abs"] < 1e-4
    assert list(rep["forced"]) == (["prefill", "decode 1", "decode 2", "decode 3"] if kv
                                   else ["full"])
    for s in rep["free"].values():
        assert s["top1_agreement"] == 1.0 and s["mask_differences_per_layer"] == [0] * LAYERS
    assert json.loads(open(rep["report_path"]).read())["passed"]


def test_external_data(checkpoints, tmp_path):
    out = tmp_path / "big" / "model.onnx"
    r = export_checkpoint(checkpoints("llama"), out, external_data_threshold=1024)
    assert r["external_data"] and data_path(out).is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    m = onnx.load(str(out), load_external_data=False)
    locs = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
    assert locs == {"model.onnx.data"}
    inline = [t.name for t in m.graph.initializer
              if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) > 1024]
    assert inline == [] and data_path(out).stat().st_size >= r["bytes"] * 0.9
    assert validate(out, checkpoints("llama"), n=2, seq_len=8)["passed"]
    # a later inline export to the same path leaves no stale data file behind
    export_checkpoint(checkpoints("llama"), out, kv_cache=False, overwrite=True)
    assert not data_path(out).exists()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision(dtype, checkpoints, tmp_path):
    out = tmp_path / f"{dtype}.onnx"
    r = export_checkpoint(checkpoints("llama"), out, dtype=dtype)
    want = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[dtype]
    m = onnx.load(str(out))
    down = next(n for n in m.graph.node if n.op_type == spec.OP_DOWN)
    w = next(t for t in m.graph.initializer if t.name == down.input[2])
    assert w.data_type == want and r["dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[dtype]
    assert {o.name: o.type.tensor_type.elem_type for o in m.graph.output}["logits"] == want
    rep = validate(out, checkpoints("llama"), n=2, seq_len=12)
    assert rep["passed"], rep["failures"]
    assert rep["compute_dtype"] == ("float16" if dtype == "fp16" else "bfloat16-upcast")


def test_model_not_fitting_dtype(tmp_path):
    import torch

    from tests.exporters.conftest import folded_checkpoint
    from tests.tiny_models import tiny_model

    model, _ = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, 0] = 1e6     # > fp16 max (65504)
    ckpt = folded_checkpoint(model, tmp_path / "ckpt")
    out = tmp_path / "out" / "m.onnx"
    with pytest.raises(UserError, match="does not fit float16.*self_attn.o_proj"):
        export_checkpoint(ckpt, out, dtype="fp16")
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_unfolded_checkpoint_refused(tmp_path):
    from lte_convert.converter.checkpoint import save_lte_checkpoint
    from lte_convert.converter.surgery import convert_model
    from tests.tiny_models import tiny_model

    model, _ = tiny_model("llama")
    convert_model(model)
    save_lte_checkpoint(model, tmp_path / "ckpt")
    with pytest.raises(UserError, match="not folded.*lte-convert fold"):
        export_checkpoint(tmp_path / "ckpt", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_weights_are_the_checkpoints(checkpoints, exported):
    """The ONNX initializers are the checkpoint's permuted FFN weights, W_down transposed."""
    from lte_convert.converter.checkpoint import load_lte_model
    from lte_convert.converter.surgery import lte_modules

    model, _ = load_lte_model(checkpoints("gpt2"))
    m = onnx.load(exported("gpt2", True)["path"])
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    ups = [n for n in m.graph.node if n.op_type == spec.OP_UP]
    downs = [n for n in m.graph.node if n.op_type == spec.OP_DOWN]
    for (_, ffn), up, down in zip(lte_modules(model), ups, downs):
        np.testing.assert_array_equal(inits[up.input[3]], ffn.w_up.detach().numpy())
        np.testing.assert_array_equal(inits[up.input[5]], ffn.b_up.detach().numpy())
        np.testing.assert_array_equal(inits[down.input[2]], ffn.w_down_t.detach().numpy())


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_existing_output_is_refused_without_overwrite(checkpoints, tmp_path):
    out = tmp_path / "notes.onnx"
    out.write_text("my notes, not ONNX")
    with pytest.raises(UserError, match="exists.*--overwrite"):
        export_checkpoint(checkpoints("llama"), out)
    assert out.read_text() == "my notes, not ONNX"
    export_checkpoint(checkpoints("llama"), out, overwrite=True, kv_cache=False)
    onnx.checker.check_model(str(out))


def test_a_file_failing_the_checker_never_reaches_the_output(checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous export")
    checked = []

    def check_model(path, *args, **kwargs):
        checked.append(path)
        raise onnx.checker.ValidationError("Nodes in a graph must be topologically sorted")

    monkeypatch.setattr(onnx.checker, "check_model", check_model)
    with pytest.raises(RuntimeError, match="fails onnx.checker.*topologically"):
        export_checkpoint(checkpoints("llama"), out, overwrite=True, external_data_threshold=1024)
    assert checked and checked[0] != str(out)                  # the temporary file was checked
    assert out.read_bytes() == b"the previous export" and not data_path(out).exists()
    assert _hidden(tmp_path) == []


def test_kill_9_during_export_is_cleaned_by_the_next_run(checkpoints, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "model.onnx"
    code = ("import os, signal, sys, onnx\n"
            "from lte_convert.exporters.onnx_export import export_checkpoint\n"
            "onnx.checker.check_model = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
            "export_checkpoint(sys.argv[1], sys.argv[2], external_data_threshold=1024)\n")
    r = subprocess.run([sys.executable, "-c", code, str(checkpoints("llama")), str(out)],
                       cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    (left,) = _hidden(tmp_path)                                # the .onnx and its .data
    assert sorted(os.listdir(tmp_path / left)) == ["model.onnx", "model.onnx.data"]
    assert not out.exists()
    export_checkpoint(checkpoints("llama"), out, kv_cache=False)
    assert _hidden(tmp_path) == [] and os.listdir(tmp_path) == ["model.onnx"]


def test_a_full_disk_leaves_nothing(checkpoints, small_disk, tmp_path):
    from lte_convert.errors import DiskFull

    disk = small_disk("1m")
    (disk / "other-files").write_bytes(b"\0" * (700 << 10))   # ~300 KB free: the file needs 800
    for threshold in (onnx_export_threshold(), 1024):
        with pytest.raises(DiskFull, match="disk is full.*model.onnx"):
            export_checkpoint(checkpoints("llama"), disk / "model.onnx",
                              external_data_threshold=threshold)
        assert sorted(p.name for p in disk.iterdir()) == ["other-files"]


def onnx_export_threshold():
    from lte_convert.exporters.onnx_export import EXTERNAL_DATA_THRESHOLD

    return EXTERNAL_DATA_THRESHOLD


def test_the_fingerprint_covers_the_ffn_weights(checkpoints, exported, tmp_path):
    """A checkpoint equal in lte.json and routers but with one FFN weight changed is not the
    reference of a file exported from the original."""
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(checkpoints("llama"), other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(k for k in weights if "mlp.down_proj.weight" in k)
    weights[name][0, 0] += 1.0
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert metadata.checkpoint_fingerprint(other) != metadata.checkpoint_fingerprint(
        checkpoints("llama"))
    with pytest.raises(UserError, match="exported from a different checkpoint"):
        validate(exported("llama", True)["path"], other, n=1, seq_len=4)

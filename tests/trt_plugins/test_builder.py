"""trt_plugins/builder.py and `lte-convert build`: the ONNX side (no TensorRT needed), and
the messages a user gets for bad input or a missing TensorRT."""
import importlib.util

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lte_convert.cli import main
from lte_convert.errors import UserError
from lte_convert.plugins import spec
from lte_convert.trt_plugins import builder

D, F, S = 8, 16, 4
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def lte_graph(weight_type=TensorProto.FLOAT16, namespace=True, lte=True) -> onnx.ModelProto:
    """x [batch, seq, D] -> router mask (bool) -> SparseFFNUp -> SparseFFNDown -> y, plus an
    attention_mask [batch, total_seq] input, as the exporter writes them."""
    np_type = helper.tensor_dtype_to_np_dtype(weight_type)
    w = lambda name, *shape: numpy_helper.from_array(np.ones(shape, np_type), name)  # noqa: E731
    inits = [w("w_r", D, F // S), w("zero", 1), w("w_gate", F, D), w("w_up", F, D),
             w("b_gate", F), w("b_up", F), w("w_down_t", F, D), w("b_down", D)]
    ns = {spec.PLUGIN_NAMESPACE_ATTR: spec.NAMESPACE} if namespace else {}
    nodes = [helper.make_node("MatMul", ["x", "w_r"], ["z"]),
             helper.make_node("Greater", ["z", "zero"], ["mask"])]
    if lte:
        nodes += [
            helper.make_node(spec.OP_UP, ["x", "mask", "w_gate", "w_up", "b_gate", "b_up"], ["h"],
                             domain=spec.NAMESPACE, expert_size=S, activation="silu", gated=1, **ns),
            helper.make_node(spec.OP_DOWN, ["h", "mask", "w_down_t", "b_down"], ["y"],
                             domain=spec.NAMESPACE, expert_size=S, **ns)]
    else:
        nodes += [helper.make_node("Relu", ["x"], ["y"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", weight_type, ["batch", "seq", D]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_seq"])],
        [helper.make_tensor_value_info("y", weight_type, ["batch", "seq", D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19),
                                                   helper.make_opsetid(spec.NAMESPACE, 1)])


def test_prepare_casts_each_mask_once_to_int32_and_asks_for_aot():
    model = lte_graph()
    before = model.SerializeToString()
    p = builder.prepare_onnx(model)
    assert model.SerializeToString() == before                    # input untouched
    assert (p.n_lte_nodes, p.dtypes) == (2, {"fp16"})
    nodes = list(p.model.graph.node)
    casts = [n for n in nodes if n.op_type == "Cast"]
    assert len(casts) == 1 and list(casts[0].input) == ["mask"]
    assert helper.get_node_attr_value(casts[0], "to") == TensorProto.INT32
    lte = [n for n in nodes if n.domain == spec.NAMESPACE]
    assert [n.input[1] for n in lte] == [casts[0].output[0]] * 2
    assert all(helper.get_node_attr_value(n, "aot") == 1 for n in lte)
    assert nodes.index(casts[0]) < nodes.index(lte[0])             # still topologically sorted
    onnx.checker.check_model(p.model)


@pytest.mark.parametrize("weight_type,name", [(TensorProto.FLOAT, "fp32"),
                                              (TensorProto.BFLOAT16, "bf16")])
def test_prepare_reports_the_files_precision(weight_type, name):
    assert builder.prepare_onnx(lte_graph(weight_type)).dtypes == {name}


def test_plain_model_is_refused_unless_allow_dense():
    with pytest.raises(UserError, match="no lte::SparseFFNUp.*--allow-dense"):
        builder.prepare_onnx(lte_graph(lte=False))
    assert builder.prepare_onnx(lte_graph(lte=False), allow_dense=True).n_lte_nodes == 0


def test_missing_plugin_namespace_is_refused():
    with pytest.raises(UserError, match="plugin_namespace='lte'"):
        builder.prepare_onnx(lte_graph(namespace=False))


def test_unsupported_weight_type_is_refused():
    with pytest.raises(UserError, match="DOUBLE.*float16, bfloat16 and float32"):
        builder.prepare_onnx(lte_graph(TensorProto.DOUBLE))


def test_profile_from_dim_names_with_defaults_and_overrides():
    shapes = builder.profile_shapes(lte_graph())
    assert shapes["x"] == ((1, 1, D), (1, 64, D), (4, 512, D))
    assert shapes["attention_mask"] == ((1, 1), (1, 128), (4, 1024))      # seq + past_seq
    shapes = builder.profile_shapes(lte_graph(), {"seq": (1, 1, 1), "batch": (2, 2, 2)})
    assert shapes["x"] == ((2, 1, D), (2, 1, D), (2, 1, D))
    assert shapes["attention_mask"] == ((2, 1), (2, 65), (2, 513))


def test_decode_and_prefill_profiles():
    """A file with a KV cache gets a decode profile (one token, non-empty cache) and a prefill
    profile (the seq range, empty cache at opt); without past_seq only prefill."""
    model = lte_graph()
    model.graph.input[1].type.tensor_type.shape.dim[1].dim_param = "past_seq"  # mask: past
    profiles = builder.optimization_profiles(model)
    assert list(profiles) == ["decode", "prefill"]
    assert profiles["decode"]["x"] == ((1, 1, D), (1, 1, D), (4, 1, D))
    assert profiles["decode"]["attention_mask"] == ((1, 1), (1, 64), (4, 512))
    assert profiles["prefill"]["x"] == ((1, 1, D), (1, 64, D), (4, 512, D))
    assert profiles["prefill"]["attention_mask"] == ((1, 0), (1, 0), (4, 512))
    assert list(builder.optimization_profiles(lte_graph())) == ["prefill"]


def test_unknown_dynamic_dim_names_the_input_and_the_option():
    model = lte_graph()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "s0"
    with pytest.raises(UserError, match=r"x\[1\] \(s0\).*--dim NAME=MIN:OPT:MAX"):
        builder.profile_shapes(model)
    assert builder.profile_shapes(model, {"s0": (1, 2, 3)})["x"][2] == (4, 3, D)


@pytest.mark.parametrize("text,want", [("4", (4, 4, 4)), ("0:64:512", (0, 64, 512))])
def test_parse_range(text, want):
    assert builder.parse_range(text, "--seq") == want


@pytest.mark.parametrize("text", ["3:2:1", "1:2", "a:b:c", "-1:0:1"])
def test_parse_range_rejects(text):
    with pytest.raises(UserError, match="--seq='.*MIN:OPT:MAX"):
        builder.parse_range(text, "--seq")


def _build(tmp_path, capsys, model, *extra):
    src, plan = tmp_path / "m.onnx", tmp_path / "m.plan"
    onnx.save(model, src)
    with pytest.raises(SystemExit) as e:
        main(["build", str(src), "--engine", str(plan), *extra])
    return e.value.code, " ".join(capsys.readouterr().err.split()), plan    # unwrap lines


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed: this checks the message without it")
def test_cli_without_tensorrt_says_how_to_install(tmp_path, capsys):
    code, err, plan = _build(tmp_path, capsys, lte_graph(), "--seq", "1:1:256")
    assert code == 2
    assert "TensorRT is not installed" in err and "pip install" in err and "10.9" in err
    assert not plan.exists() and not list(tmp_path.glob(".m.plan*"))


def test_cli_checks_the_file_before_tensorrt(tmp_path, capsys):
    code, err, plan = _build(tmp_path, capsys, lte_graph(lte=False))
    assert code == 2 and "plain (dense) model" in err and not plan.exists()
    code, err, _ = _build(tmp_path, capsys, lte_graph(), "--batch", "4:2:1")
    assert code == 2 and "--batch='4:2:1'" in err


@pytest.mark.slow
def test_prepare_and_profile_a_real_export(tmp_path):
    """The exporter's file (KV cache, fp16) as the builder sees it: 2 lte pairs, one INT32
    cast per layer's mask, every input covered by the default profile."""
    import torch
    from tests.tiny_models import tiny_model

    from lte_convert.converter.checkpoint import fold
    from lte_convert.converter.surgery import convert_model
    from lte_convert.exporters.onnx_export import export_model

    model, _ = tiny_model("llama")
    model = convert_model(model, expert_size=16)
    fold(model)
    export_model(model.to(torch.float16).eval(), tmp_path / "m.onnx")
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    p = builder.prepare_onnx(proto)
    assert (p.n_lte_nodes, p.dtypes) == (4, {"fp16"})
    casts = [n for n in p.model.graph.node if n.op_type == "Cast" and n.output[0].endswith("__int32")]
    assert len(casts) == 2
    shapes = builder.profile_shapes(proto)
    assert set(shapes) == {i.name for i in proto.graph.input}
    assert shapes["attention_mask"] == ((1, 1), (1, 128), (4, 1024))
    profiles = builder.optimization_profiles(proto)
    assert list(profiles) == ["decode", "prefill"]
    assert profiles["decode"]["input_ids"] == ((1, 1), (1, 1), (4, 1))
    assert profiles["decode"]["attention_mask"] == ((1, 2), (1, 65), (4, 513))
    assert profiles["prefill"]["attention_mask"] == ((1, 1), (1, 64), (4, 1024))

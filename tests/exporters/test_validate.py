"""`lte-convert validate` and `export` on good, perturbed and bad inputs (through the CLI)."""
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from lte_convert.cli import main
from lte_convert.exporters.onnx_export import data_path, export_checkpoint
from lte_convert.plugins import spec
from tests.exporters.conftest import tiny_checkpoint


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(checkpoint, exported file with KV cache) of a tiny Llama."""
    d = tmp_path_factory.mktemp("llama")
    ckpt = tiny_checkpoint("llama", d / "ckpt")
    return ckpt, export_checkpoint(ckpt, d / "model.onnx")["path"]


def _cli(args, capsys):
    """(exit code, stdout, stderr) of `lte-convert ARGS` in this process."""
    with pytest.raises(SystemExit) as e:
        main(args)
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _user_error(args, capsys, *patterns):
    code, _, err = _cli(args, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    text = " ".join(err[err.index("error: "):].split())    # after any progress bars
    for p in patterns:
        assert p in text, (p, text)


def test_validate_cli_passes(llama, capsys, tmp_path):
    ckpt, path = llama
    report = tmp_path / "r.json"
    code, out, _ = _cli(["validate", path, "--reference", str(ckpt), "-n", "2", "--seq-len",
                         "10", "--report", str(report)], capsys)
    assert code == 0, out
    assert "PASSED" in out and "prefill" in out and "decode" in out and "top-1" in out
    r = json.loads(report.read_text())
    assert r["passed"] and r["inputs"] == {"source": "random tokens", "n": 2, "seq_len": 10,
                                           "decode_steps": 3}
    assert r["verdict"] == "mask-forced" and "mask-forced" in out and "free-running" in out


def test_validate_fails_on_perturbed_file(llama, capsys, tmp_path):
    """One expert's down-projection scaled by 1.5 in the ONNX file: validate must fail."""
    ckpt, path = llama
    m = onnx.load(path)
    down = next(n for n in m.graph.node if n.op_type == spec.OP_DOWN)
    t = next(t for t in m.graph.initializer if t.name == down.input[2])
    w = numpy_helper.to_array(t).copy()
    w[:32] *= 1.5
    t.CopyFrom(numpy_helper.from_array(w, t.name))
    bad = tmp_path / "perturbed.onnx"
    onnx.save(m, str(bad))
    code, out, _ = _cli(["validate", str(bad), "-r", str(ckpt), "-n", "2", "--seq-len", "10"],
                        capsys)
    assert code == 1 and "FAILED" in out and "logits outside atol" in out
    assert "first divergence: layer 0 FFN output" in out
    r = json.loads((tmp_path / "perturbed.validation.json").read_text())
    assert not r["passed"] and r["forced"]["prefill"]["logits_outside"] > 0
    # the same file passes when the tolerance is loose enough: the threshold is what fails it
    code, out, _ = _cli(["validate", str(bad), "-r", str(ckpt), "-n", "2", "--seq-len", "10",
                         "--atol", "100"], capsys)
    assert code == 0, out


def test_not_an_onnx_file(llama, capsys, tmp_path):
    f = tmp_path / "notes.onnx"
    f.write_text("this is not a model\n" * 50)
    _user_error(["validate", str(f), "-r", str(llama[0])], capsys, "not a readable ONNX file")


def test_truncated_file(llama, capsys, tmp_path):
    data = open(llama[1], "rb").read()
    for frac in (0.5, 0.999):
        f = tmp_path / f"cut{frac}.onnx"
        f.write_bytes(data[: int(len(data) * frac)])
        code, _, err = _cli(["validate", str(f), "-r", str(llama[0])], capsys)
        assert code == 2 and "Traceback" not in err
        assert "truncated" in " ".join(err.split()), err


def test_truncated_external_data(llama, capsys, tmp_path):
    ckpt = llama[0]
    out = tmp_path / "ext.onnx"
    export_checkpoint(ckpt, out, kv_cache=False, external_data_threshold=1024)
    d = data_path(out)
    d.write_bytes(d.read_bytes()[:1000])
    _user_error(["validate", str(out), "-r", str(ckpt)], capsys, "is truncated")
    d.unlink()
    _user_error(["validate", str(out), "-r", str(ckpt)], capsys, "which is missing")


def test_onnx_not_from_this_tool(llama, capsys, tmp_path):
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    f = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(g), str(f))
    _user_error(["validate", str(f), "-r", str(llama[0])], capsys,
                "not produced by lte-convert")


def test_reference_does_not_match(llama, capsys, tmp_path):
    _, path = llama
    other = tiny_checkpoint("gpt2", tmp_path / "gpt2")
    _user_error(["validate", path, "-r", str(other)], capsys,
                "does not match the ONNX file", "model_type: file 'llama', checkpoint 'gpt2'")
    # same architecture, other weights and routers (another seed): caught by the digest
    again = tiny_checkpoint("llama", tmp_path / "llama-seed1", seed=1)
    _user_error(["validate", path, "-r", str(again)], capsys, "exported from a different checkpoint")


def test_export_output_not_writable(llama, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _user_error(["export", str(llama[0]), "--out", str(blocker / "model.onnx")], capsys,
                "Cannot write the output")
    _user_error(["export", str(llama[0]), "--out", str(tmp_path)], capsys, "is a folder")


def test_export_cli_dtype_overflow_leaves_nothing(capsys, tmp_path):
    import torch

    from tests.exporters.conftest import folded_checkpoint
    from tests.tiny_models import tiny_model

    model, _ = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.wte.weight[3, 0] = 1e5
    ckpt = folded_checkpoint(model, tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    _user_error(["export", str(ckpt), "--out", str(out / "m.onnx"), "--dtype", "fp16"], capsys,
                "does not fit float16", "--dtype fp32")
    assert list(out.iterdir()) == []


def test_flip_check_bounds_the_router_margin():
    """A flip within rounding of the threshold is allowed; one far from it is counted."""
    from lte_convert.exporters.validate import check_flips, flip_bound

    d = 8
    w = np.eye(3, d)                                   # z_e = x_e + b_e
    b = np.zeros(3)
    x = np.zeros((1, 4, d), np.float32)
    x[0, :, :3] = [[1.0, -1.0, 1e-9], [1.0, -1.0, -1e-9], [0.5, -0.5, 2.0], [1, 1, 1]]
    mask = x[..., :3] > 0
    mask[0, 0, 2] = False                              # |z| = 1e-9 of scale ~1e-9: far
    mask[0, 2, 1] = True                               # z = -0.5: far from 0
    bound = flip_bound(d, "float32")
    assert bound == pytest.approx(9 * 2.0 ** -24, rel=1e-6)
    [layer] = check_flips({"lte_mask.0": mask, "lte_x.0": x}, [(w, b)], bound)
    assert layer["flips"] == 2 and layer["far"] == 2 and layer["max_margin"] == 1.0
    # near the threshold: z = 1e-9 against a scale of 1 (x has another large entry)
    w2 = np.ones((1, d))
    x2 = np.zeros((1, 1, d), np.float32)
    x2[0, 0, :2] = [1.0, -1.0 + 1e-7]
    [layer] = check_flips({"lte_mask.0": np.zeros((1, 1, 1), bool), "lte_x.0": x2},
                          [(w2, np.zeros(1))], bound)
    assert layer["flips"] == 1 and layer["far"] == 0


def test_compare_forced_points_at_the_first_divergence():
    from lte_convert.exporters.validate import compare_forced, judge

    tol = {"atol": 1e-3, "rtol": 0.0, "max_flip_rate": 0.1, "min_top1": 0.9, "max_kl": 1e-3}
    ref = {"logits": np.zeros((1, 2, 5)), "present.0.key": np.zeros(3), "present.0.value":
           np.zeros(3), "present.1.key": np.zeros(3), "present.1.value": np.zeros(3),
           "lte_ffn.0": np.zeros((1, 2, 4)), "lte_ffn.1": np.zeros((1, 2, 4))}
    test = {k: v.copy() for k, v in ref.items()}
    good = compare_forced(ref, test, tol, [0, 1], 2)
    assert judge({"prefill": good}, None, {}, tol, 0, [0, 1]) == []
    test["lte_ffn.1"][0, 1, 0] = 1.0                   # layer 1's FFN is wrong ...
    test["logits"][0, 1] = 1.0                         # ... and so are the logits after it
    s = compare_forced(ref, test, tol, [0, 1], 2)
    assert s["first_divergence"] == "layer 1 FFN output (lte node pair 1)"
    assert s["logits_outside"] == 5 and s["first_outside"] == "sequence 0, token 1"
    [msg] = judge({"decode 2": s}, None, {}, tol, 0, [0, 1])
    assert msg.startswith("decode 2 (mask-forced): 5 logits outside") and "layer 1 FFN" in msg
    test["present.1.key"][0] = 1.0                     # layer 1's attention comes first
    s = compare_forced(ref, test, tol, [0, 1], 2)
    assert s["first_divergence"] == "layer 1 cache (present.1.key)"

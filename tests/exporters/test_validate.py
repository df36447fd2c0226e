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
    assert r["passed"] and r["inputs"] == {"source": "random tokens", "n": 2, "seq_len": 10}


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
    r = json.loads((tmp_path / "perturbed.validation.json").read_text())
    assert not r["passed"] and r["steps"]["prefill"]["out_of_tolerance_checked"] > 0
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


def test_export_refuses_an_existing_output(llama, capsys, tmp_path):
    out = tmp_path / "model.onnx"
    out.write_text("not ONNX")
    _user_error(["export", str(llama[0]), "--out", str(out)], capsys, f"{out} exists",
                "--overwrite")
    assert out.read_text() == "not ONNX"


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


def test_masks_flip_counting():
    """compare_step counts flips per layer; tokens from the first flip on are exempt (causal)."""
    from lte_convert.exporters.validate import compare_step, judge

    tol = {"atol": 1e-3, "rtol": 0.0, "max_flip_rate": 0.1}
    logits = np.zeros((2, 4, 5), np.float32)
    m0 = np.zeros((2, 4, 3), bool)
    ref = {"logits": logits, "lte_mask.0": m0, "lte_mask.1": m0}
    test_logits = logits.copy()
    test_logits[0, 2:] += 1.0                     # tokens 2, 3 of sequence 0 differ ...
    m1 = m0.copy()
    m1[0, 2, 1] = True                            # ... because a decision flipped at token 2
    test = {"logits": test_logits, "lte_mask.0": m0, "lte_mask.1": m1}
    s, first = compare_step(ref, test, tol)
    assert s["mask_flips_per_layer"] == [0, 1] and s["tokens_with_flips"] == 1
    assert s["tokens_exempt"] == 2 and list(first) == [2, np.inf]
    assert s["out_of_tolerance"] == 10 and s["out_of_tolerance_checked"] == 0
    assert judge({"full": s}, tol) == []
    assert judge({"full": s}, dict(tol, max_flip_rate=0.01))      # 1/48 flips > 1%
    # a later step of the same sequence stays exempt; the other sequence does not
    step2 = {"logits": np.ones((2, 1, 5), np.float32)}
    s2, _ = compare_step({"logits": np.zeros((2, 1, 5), np.float32)}, step2, tol, first, offset=4)
    assert s2["tokens_exempt"] == 1 and s2["out_of_tolerance_checked"] == 5
    # encoders: a flip anywhere exempts the whole sequence
    test_logits[0, 0] += 1.0
    s, _ = compare_step(ref, test, tol, causal=False)
    assert s["tokens_exempt"] == 4 and s["out_of_tolerance_checked"] == 0
    s, _ = compare_step(ref, test, tol, causal=True)              # token 0 precedes the flip
    assert s["out_of_tolerance_checked"] == 5 and judge({"full": s}, tol)


def test_export_to_a_full_disk_exits_3_with_nothing_left(llama, capsys, small_disk):
    disk = small_disk("1m")
    (disk / "other-files").write_bytes(b"\0" * (700 << 10))   # ~300 KB free: the file needs 800
    code, _, err = _cli(["export", str(llama[0]), "--out", str(disk / "model.onnx")], capsys)
    text = " ".join(err.split())
    assert code == 3 and "disk is full" in text and "Traceback" not in text, text
    assert sorted(p.name for p in disk.iterdir()) == ["other-files"]

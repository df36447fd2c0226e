"""evaluate_checkpoint: report, plots, FLOPs, sweep; measured perplexity vs a direct forward."""
from __future__ import annotations

import json
import math

import pytest
import torch

from lte_convert.converter.calibrate import calibrate
from lte_convert.converter.checkpoint import fold, load_lte_model, save_lte_checkpoint
from lte_convert.converter.data import pack, read_documents, spread
from lte_convert.commands.eval import evaluate_checkpoint
from lte_convert.converter.evaluate import ffn_flops_per_token, measure
from lte_convert.converter.surgery import convert_model, set_mode
from lte_convert.default import glassllm_model_dir, shakespeare_texts


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An untrained LTE checkpoint of glassllm (surgery's router init), calibrated to 0.5."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(glassllm_model_dir())
    model = AutoModelForCausalLM.from_pretrained(glassllm_model_dir()).eval()
    convert_model(model, 32, seed=0)
    set_mode(model, "hard")
    blocks = spread(pack(tok, read_documents(shakespeare_texts()[1][0]), 128), 16)
    cal = calibrate(model, blocks, 0.5)
    fold(model, [cal.offset] * 4)
    path = tmp_path_factory.mktemp("eval") / "ckpt"
    save_lte_checkpoint(model, path, {"target_sparsity": 0.5, "task": "clm"}, tokenizer=tok)
    return path


def test_report_plots_and_sweep(ckpt, tmp_path):
    heldout = shakespeare_texts()[1][0]
    r = evaluate_checkpoint(ckpt, [heldout], out_dir=tmp_path, sweep=[0.3, 0.7], max_blocks=16,
                            calib_blocks=16)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["perplexity"] == pytest.approx(r["perplexity"])
    assert abs(r["sparsity"] - 0.5) <= 0.002                  # same blocks as calibration
    assert 1 < r["perplexity"] < 1000 and 0 < r["accuracy"] < 1
    for p in r["sweep"]:
        assert abs(p["sparsity"] - p["target"]) <= 0.02
    assert r["sweep"][0]["perplexity"] < r["sweep"][1]["perplexity"]
    for png in ("layer_sparsity.png", "sweep.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_plain_model_is_evaluated_dense_on_the_same_blocks(ckpt, tmp_path):
    from lte_convert.loading import load_lm
    from lte_convert.default import glassllm_model_dir

    heldout = shakespeare_texts()[1][0]
    r = evaluate_checkpoint(glassllm_model_dir(), [heldout], out_dir=tmp_path, max_blocks=8)
    model, tok, _ = load_lm(glassllm_model_dir())
    blocks = spread(pack(tok, read_documents(heldout), 128), 8)
    want = measure(model, blocks)
    assert r["dense"] and r["ffn_flops_per_token"] is None and r["blocks"] == 8
    assert r["perplexity"] == pytest.approx(want.perplexity, rel=1e-6)
    lte = evaluate_checkpoint(ckpt, [heldout], out_dir=tmp_path / "lte", max_blocks=8)
    assert not lte["dense"] and lte["tokens"] == r["tokens"]          # the same blocks


def test_report_goes_beside_the_checkpoint(ckpt):
    """Without out_dir: <checkpoint>-eval/ beside it; the checkpoint folder is not touched."""
    before = sorted(p.name for p in ckpt.iterdir())
    r = evaluate_checkpoint(ckpt, [shakespeare_texts()[1][0]], max_blocks=2)
    beside = ckpt.with_name(ckpt.name + "-eval")
    assert sorted(p.name for p in ckpt.iterdir()) == before
    assert json.loads((beside / "report.json").read_text())["perplexity"] == pytest.approx(
        r["perplexity"])
    assert (beside / "layer_sparsity.png").is_file()


def test_plots_leave_the_matplotlib_backend_alone(ckpt, tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")                                   # the application's choice
    try:
        evaluate_checkpoint(ckpt, [shakespeare_texts()[1][0]], out_dir=tmp_path, max_blocks=2)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "layer_sparsity.png").read_bytes()[:4] == b"\x89PNG"


def test_flops_by_hand(ckpt):
    model, _ = load_lte_model(ckpt)
    # glassllm: d=128, d_ff=341 padded to F=352 (11 experts), gated (3 matrices), 4 layers.
    f = ffn_flops_per_token(model, [0.5, 0.25, 0.0, 1.0])
    assert f["dense"] == 4 * 2 * 128 * 341 * 3
    on = 0.5 + 0.75 + 1.0 + 0.0
    assert f["lte"] == pytest.approx(4 * 2 * 128 * 11 + on * 2 * 128 * 352 * 3)


def test_measured_perplexity_matches_a_direct_forward(ckpt):
    model, _ = load_lte_model(ckpt)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ckpt)
    blocks = pack(tok, read_documents(shakespeare_texts()[1][0]), 64)[:3]
    m = measure(model, blocks, batch_size=2)
    with torch.no_grad():
        loss = model(blocks, labels=blocks).loss       # HF mean over the 3·63 predictions
    assert m.tokens == 3 * 63 and m.perplexity == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_fold_cli_retargets_a_folded_checkpoint(ckpt, tmp_path):
    from click.testing import CliRunner

    from lte_convert.cli import cli

    heldout = str(shakespeare_texts()[1][0])
    r = CliRunner().invoke(cli, ["fold", str(ckpt), "--sparsity", "0.3", "--out",
                                 str(tmp_path / "f"), "--data", heldout, "--calib-blocks", "16"])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "f" / "lte.json").read_text())
    assert info["folded"] and abs(info["sparsity"] - 0.3) <= 0.002
    model, _ = load_lte_model(tmp_path / "f")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tmp_path / "f")
    blocks = spread(pack(tok, read_documents(heldout), 128), 16)
    assert abs(measure(model, blocks).sparsity - 0.3) <= 0.002

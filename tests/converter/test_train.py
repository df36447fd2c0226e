"""Two-stage training end to end on a real pretrained model (glassllm), resume, NaN, DDP."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lte_convert.errors import UserError
from lte_convert.converter.train import TrainConfig, train_lte
from lte_convert.default import glassllm_model_dir, shakespeare_texts

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "lte_convert.cli"]


def _data():
    train, heldout = shakespeare_texts()
    return train[:2], heldout[:1]


def _routers(ckpt) -> dict:
    return load_file(str(Path(ckpt) / "lte_routers.safetensors"))


def _cfg(**kw):
    base = dict(stage1_steps=8, stage2_steps=4, batch_size=4, save_steps=4, log_steps=4,
                calib_blocks=16)
    return TrainConfig(**{**base, **kw})


def test_end_to_end_on_glassllm_hits_sparsity_and_reloads(tmp_path):
    from lte_convert.converter.checkpoint import load_lte_model
    from lte_convert.converter.data import pack, read_documents, spread
    from lte_convert.converter.evaluate import measure

    train, heldout = _data()
    out = train_lte(glassllm_model_dir(), train, tmp_path / "lte", 0.5, heldout=heldout,
                    config=_cfg())
    info = json.loads((out / "lte.json").read_text())
    assert info["folded"] and abs(info["sparsity"] - 0.5) <= 0.005       # per-layer tol
    assert len(info["layer_sparsity"]) == 4 and info["task"] == "clm"
    assert not (tmp_path / "lte.lte-work").exists()           # checkpoints cleaned up
    model, _ = load_lte_model(out)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    other = spread(pack(tok, read_documents(shakespeare_texts()[1][1]), 128), 24)
    m = measure(model, other, batch_size=8)
    assert abs(m.sparsity - 0.5) <= 0.02                       # on an unseen held-out play
    assert m.perplexity < 400                                  # dense glassllm: ~120-160


def test_gradient_accumulation_matches_the_big_batch(tmp_path):
    train, heldout = _data()
    a = train_lte(glassllm_model_dir(), train, tmp_path / "a", 0.5, heldout=heldout,
                  config=_cfg(stage1_steps=4, stage2_steps=2, batch_size=4))
    b = train_lte(glassllm_model_dir(), train, tmp_path / "b", 0.5, heldout=heldout,
                  config=_cfg(stage1_steps=4, stage2_steps=2, batch_size=2, grad_accum=2))
    ra, rb = _routers(a), _routers(b)
    assert max((ra[k] - rb[k]).abs().max().item() for k in ra) < 1e-5     # measured 1.9e-6


def _default_sigint():
    """In the child before exec: SIGINT as a terminal gives it (an ignored SIGINT is inherited
    through exec, and something in the test process sometimes ignores it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(CLI + ["train"] + args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_default_sigint,
                            **kw)


def test_ctrl_c_keeps_checkpoint_and_resume_continues_identically(tmp_path):
    train, heldout = _data()
    common = [str(glassllm_model_dir()), "--data", str(train[0]), "--heldout", str(heldout[0]),
              "--sparsity", "0.4", "--stage1-steps", "40", "--stage2-steps", "4",
              "--batch-size", "4", "--save-steps", "4"]
    ref = _run_cli(common + ["--out", str(tmp_path / "ref")])
    out = tmp_path / "run"
    work = tmp_path / "run.lte-work" / "stage1"
    p = _run_cli(common + ["--out", str(out)])
    deadline = time.time() + 240
    while not (work / "checkpoint-8" / "lte_state.json").exists():
        assert p.poll() is None and time.time() < deadline, p.communicate()[0][-3000:]
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    log = p.communicate(timeout=60)[0]
    assert p.returncode == 130 and "--resume" in log and "Traceback" not in log, log[-2000:]
    assert not out.exists() and (work / "checkpoint-8" / "lte_state.json").exists()
    r = _run_cli(common + ["--out", str(out), "--resume"])
    log = r.communicate(timeout=400)[0]
    assert r.returncode == 0, log[-3000:]
    assert "Continuing training from checkpoint" in log or "checkpoint" in log
    assert ref.wait(timeout=400) == 0, ref.communicate()[0][-3000:]
    got, want = _routers(out), _routers(tmp_path / "ref")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


def test_a_swallowed_ctrl_c_still_stops_at_the_end_of_the_step(tmp_path, monkeypatch):
    """A KeyboardInterrupt that some code catches (a finalizer, a library) is not lost: the
    run stops at the end of that step, the checkpoints are kept and no output is written."""
    from lte_convert.converter import train as train_module

    hold, steps = train_module.LTETrainer.hold_sparsity, []

    def hold_that_swallows_ctrl_c(self):
        steps.append(self.state.global_step)
        if len(steps) == 5:
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)                        # the handler raises in here ...
            except KeyboardInterrupt:
                pass                                 # ... and this swallows it
        return hold(self)
    monkeypatch.setattr(train_module.LTETrainer, "hold_sparsity", hold_that_swallows_ctrl_c)
    train, heldout = _data()
    before = signal.signal(signal.SIGINT, signal.default_int_handler)    # a terminal's Ctrl-C
    try:
        with pytest.raises(KeyboardInterrupt):
            train_lte(glassllm_model_dir(), train, tmp_path / "x", 0.5, heldout=heldout,
                      config=_cfg(stage1_steps=12, save_steps=4))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    assert len(steps) == 5
    assert train_module.last_checkpoint(tmp_path / "x.lte-work" / "stage1").name == "checkpoint-4"
    assert not (tmp_path / "x").exists()


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
    train, heldout = _data()
    with pytest.raises(UserError, match="not finite.*last good checkpoint"):
        train_lte(glassllm_model_dir(), train, tmp_path / "x", 0.5, heldout=heldout,
                  config=_cfg(stage1_steps=30, save_steps=2, lr=1e7, router_lr=1e7))
    ckpts = sorted((tmp_path / "x.lte-work" / "stage1").glob("checkpoint-*"))
    assert ckpts and not (tmp_path / "x").exists()
    last = load_file(str(ckpts[-1] / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in last.values())


def test_two_processes_train_the_same_routers_as_one(tmp_path):
    if shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("torchrun is not installed beside this Python")
    train, heldout = _data()
    common = [str(glassllm_model_dir()), "--data", str(train[0]), "--heldout", str(heldout[0]),
              "--stage1-steps", "6", "--stage2-steps", "2", "--save-steps", "100"]
    one = _run_cli(common + ["--batch-size", "4", "--out", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    two = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
                          "-m", "lte_convert.cli", "train"] + common
                         + ["--batch-size", "2", "--out", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    assert one.wait(timeout=600) == 0, one.communicate()[0][-3000:]
    info = json.loads((tmp_path / "two" / "lte.json").read_text())
    assert info["training"]["world_size"] == 2
    a, b = _routers(tmp_path / "one"), _routers(tmp_path / "two")
    # fp32, dropout 0: only the summation order differs between the two runs.
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
def test_default_cli_run_on_smollm2_hits_the_default_sparsity(tmp_path):
    """The embedded default end to end (few steps; the full default run is timed in
    results/quality.md)."""
    r = _run_cli(["--out", str(tmp_path / "d"), "--stage1-steps", "4", "--stage2-steps", "2"])
    log = r.communicate(timeout=3000)[0]
    assert r.returncode == 0, log[-3000:]
    info = json.loads((tmp_path / "d" / "lte.json").read_text())
    assert info["model_type"] == "llama" and len(info["layer_sparsity"]) == 30
    assert abs(info["sparsity"] - 0.5) <= 0.02


def test_zero_steps_skips_a_stage(tmp_path):
    train, heldout = _data()
    out = train_lte(glassllm_model_dir(), train, tmp_path / "z", 0.5, heldout=heldout,
                    config=_cfg(stage1_steps=0, stage2_steps=2, keep_checkpoints=True))
    info = json.loads((out / "lte.json").read_text())
    assert info["training"]["stage1_seconds"] == 0.0 and abs(info["sparsity"] - 0.5) <= 0.005
    work = sorted(p.name for p in (tmp_path / "z.lte-work").iterdir())
    assert work == ["stage2", "start", "start.json"]        # no copy of the start for stage 1


def test_a_damaged_resume_marker_is_a_clear_error(tmp_path):
    train, heldout = _data()
    work = tmp_path / "r.lte-work"
    work.mkdir()
    (work / "start.json").write_text('{"targets": [0.5, 0.5')            # truncated
    with pytest.raises(UserError, match="cannot be read.*delete it and run again"):
        train_lte(glassllm_model_dir(), train, tmp_path / "r", 0.5, heldout=heldout,
                  config=_cfg(), resume=True)


def test_a_saved_state_from_another_model_is_refused(tmp_path):
    from safetensors.torch import save_file

    from lte_convert.converter.train import _load_state
    from lte_convert.loading import load_lm

    model, _, _ = load_lm(glassllm_model_dir())
    full = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state = {k: v for k, v in full.items() if "layers.0.mlp" not in k}   # not a tied weight
    (tmp_path / "s").mkdir()
    save_file(state, str(tmp_path / "s" / "model.safetensors"))
    with pytest.raises(UserError, match="does not match this model.*layers.0.mlp"):
        _load_state(model, tmp_path / "s")
    save_file(full, str(tmp_path / "s" / "model.safetensors"))
    _load_state(model, tmp_path / "s")                 # only the tied head missing: fine


def test_one_process_on_several_gpus_is_refused(monkeypatch):
    from lte_convert.converter import train as train_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)      # no GPU here
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError, match="torchrun --nproc-per-node 2"):
        train_mod._check_devices()
    monkeypatch.setenv("WORLD_SIZE", "2")
    train_mod._check_devices()


@pytest.mark.parametrize("train_params", ["all", "body", "ffn"])
def test_stage2_trains_the_chosen_parameters(train_params):
    from lte_convert.converter.surgery import convert_model, lte_modules
    from lte_convert.converter.train import _freeze_for_stage
    from tests.tiny_models import tiny_model

    model = convert_model(tiny_model("llama")[0], expert_size=32, grouping="none")
    lte = [m for _, m in lte_modules(model)]
    _freeze_for_stage(model, lte, 2, routers_only=False, train_params=train_params)
    router = {id(p) for m in lte for p in m.router.parameters()}
    ffn = {id(p) for m in lte for p in m.parameters()} - router
    embed = {id(p) for p in model.get_input_embeddings().parameters()}
    everything = {id(p) for p in model.parameters()}
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert trained == {"all": everything - router, "body": everything - router - embed,
                       "ffn": ffn}[train_params]

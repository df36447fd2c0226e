"""plugins/spec.py: which weight pairs `gate_up_pair` sees as one [2, F, d] view."""
import torch

from lte_convert.plugins.spec import gate_up_pair


def test_gate_up_pair_detection():
    gate, up = torch.randn(320, 40), torch.randn(320, 40)
    assert gate_up_pair(gate, up) is None                            # separate storages
    assert gate_up_pair(None, up) is None                            # non-gated
    stacked = torch.stack([gate, up])
    pair = gate_up_pair(stacked[0], stacked[1])
    assert pair.shape == (2, 320, 40) and pair.stride() == (320 * 40, 40, 1)
    assert torch.equal(pair[0], gate) and torch.equal(pair[1], up)
    assert gate_up_pair(stacked[1], stacked[0]) is None              # up before gate
    big = torch.randn(3, 320, 40)                                    # any fixed distance
    assert torch.equal(gate_up_pair(big[0], big[2])[1], big[2])
    over = torch.randn(320 * 40 + 40)                                # overlapping rows
    assert gate_up_pair(over[:320 * 40].view(320, 40), over[40:].view(320, 40)) is None
    wide = torch.randn(2, 320, 80)                                   # different strides
    assert gate_up_pair(wide[0, :, :40], wide[1].reshape(640, 40)[:320]) is None

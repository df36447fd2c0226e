"""The PyTorch backend of `validate` reads the masks through hooks and leaves no hook behind."""
import numpy as np

from lte_convert.converter.checkpoint import fold
from lte_convert.converter.surgery import convert_model, lte_modules
from lte_convert.exporters.backends import MASK_PREFIX, TorchBackend
from tests.exporters.conftest import route_half
from tests.tiny_models import LAYERS, random_ids, tiny_model


def test_torch_backend_leaves_the_model_without_hooks():
    model = convert_model(tiny_model("llama")[0], expert_size=32)
    route_half(model, random_ids(2, 8))
    fold(model)
    feeds = {"input_ids": random_ids(2, 8).numpy(), "attention_mask": np.ones((2, 8), np.int64)}
    first = TorchBackend(model, kv_cache=False).run(feeds)
    second = TorchBackend(model, kv_cache=False).run(feeds)     # a second backend, same model
    masks = sorted(k for k in second if k.startswith(MASK_PREFIX))
    assert len(masks) == LAYERS
    for k in masks:
        np.testing.assert_array_equal(first[k], second[k])
    assert all(not m._forward_hooks for _, m in lte_modules(model))

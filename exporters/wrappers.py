"""Export-time wrappers: a Hugging Face model as a function of flat tensors, named like optimum.

Decoders with KV cache (what a runtime needs to prefill, then decode token by token):

    inputs   input_ids [batch, seq] int64, attention_mask [batch, total_seq] int64 (past + new),
             position_ids [batch, seq] int64,
             past_key_values.{i}.key / .value [batch, kv_heads, past_seq, head_dim]
    outputs  logits [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past_seq+seq, head_dim]

Decoders without cache and encoders (BERT, RoBERTa): input_ids, attention_mask -> logits.
The wrapper builds a DynamicCache from the flat past tensors and returns the cache's layers
flat again, so the exported graph has only tensors at its boundary.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

# Sample sizes for tracing: seq must be >= 2 (a length-1 sample specialises the SDPA path),
# and every dynamic axis gets a distinct size so torch.export cannot merge them.
SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_PAST = 2, 3, 4


def is_decoder(model) -> bool:
    return bool(model.can_generate())


def _cache_kwarg(model) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name still works)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def input_names(n_layers: int, kv_cache: bool) -> list[str]:
    if not kv_cache:
        return ["input_ids", "attention_mask"]
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{k}" for i in range(n_layers) for k in ("key", "value")]


def output_names(n_layers: int, kv_cache: bool) -> list[str]:
    if not kv_cache:
        return ["logits"]
    return ["logits"] + [f"present.{i}.{k}" for i in range(n_layers) for k in ("key", "value")]


class Plain(nn.Module):
    """input_ids, attention_mask -> logits (no cache)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.decoder = is_decoder(model)

    def forward(self, input_ids, attention_mask):
        kwargs = {"use_cache": False} if self.decoder else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


class WithCache(nn.Module):
    """input_ids, attention_mask, position_ids, past ((k, v) per layer) -> logits, k0, v0, k1, ..."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.cache_kwarg = _cache_kwarg(model)

    def forward(self, input_ids, attention_mask, position_ids, past):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=True,
                         **{self.cache_kwarg: DynamicCache(past)})
        flat = []
        for layer in output_cache(out).layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def cache_layout(model) -> list[tuple[int, int]]:
    """[(kv_heads, head_dim)] per layer, read from one tiny forward pass."""
    ids = torch.zeros(1, 2, dtype=torch.long, device=model.device)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    return [(layer.keys.shape[1], layer.keys.shape[3]) for layer in output_cache(out).layers]


def sample_inputs(model, kv_cache: bool, vocab_size: int):
    """(kwargs, dynamic_shapes) for torch.onnx.export."""
    B, S, P = SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_PAST
    gen = torch.Generator().manual_seed(0)
    dev, dtype = model.device, model.dtype
    ids = torch.randint(0, vocab_size, (B, S), generator=gen).to(dev)
    if not kv_cache:
        kwargs = {"input_ids": ids, "attention_mask": torch.ones(B, S, dtype=torch.long, device=dev)}
        shapes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
        return kwargs, shapes
    past = tuple(
        tuple((0.1 * torch.randn(B, h, P, hd, generator=gen)).to(dev, dtype) for _ in range(2))
        for h, hd in cache_layout(model))
    kwargs = {"input_ids": ids,
              "attention_mask": torch.ones(B, P + S, dtype=torch.long, device=dev),
              "position_ids": torch.arange(P, P + S, device=dev).expand(B, S).contiguous(),
              "past": past}
    axes = {0: "batch", 2: "past_seq"}
    shapes = {"input_ids": {0: "batch", 1: "seq"},
              "attention_mask": {0: "batch", 1: "total_seq"},
              "position_ids": {0: "batch", 1: "seq"},
              "past": tuple((axes, axes) for _ in past)}
    return kwargs, shapes

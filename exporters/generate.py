"""Greedy generation through any backend with a KV cache (ONNX Runtime, a TensorRT engine).

    prefill: input_ids [B, S], attention_mask [B, S], position_ids, empty past ─► logits, present
    decode:  the chosen token [B, 1], attention_mask [B, S+t] (past + new), next positions,
             past = the previous step's present ─► ...

Positions follow Hugging Face generate(): cumsum(attention_mask) − 1, with padded positions
set to 1, so left-padded batches decode as in PyTorch. A sequence that emitted EOS continues
with the pad token (EOS when there is none), and generation stops when all have.
"""
from __future__ import annotations

import numpy as np

from lte_convert.exporters.backends import Backend


def greedy_generate(backend: Backend, layout: list[tuple[int, int]], input_ids: np.ndarray,
                    max_new_tokens: int, *, attention_mask: np.ndarray | None = None,
                    eos_token_id: int | None = None, pad_token_id: int | None = None) -> np.ndarray:
    """[B, S + generated] int64: the prompt followed by the greedy continuation.

    layout: [(kv_heads, head_dim)] per layer (exporters.validate.cache_layout of the file).
    """
    ids = np.asarray(input_ids, np.int64)
    B, S = ids.shape
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i, (h, hd) in enumerate(layout):
        for k in ("key", "value"):
            feeds[f"past_key_values.{i}.{k}"] = np.zeros((B, h, 0, hd), np.float32)
    pad = pad_token_id if pad_token_id is not None else eos_token_id
    done = np.zeros(B, bool)
    out = [ids]
    for _ in range(max_new_tokens):
        res = backend.run(feeds)
        nxt = np.asarray(res["logits"][:, -1], np.float32).argmax(-1).astype(np.int64)
        if eos_token_id is not None:
            nxt = np.where(done, pad, nxt)
            done |= nxt == eos_token_id
        out.append(nxt[:, None])
        if done.all():
            break
        mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
        feeds = {"input_ids": nxt[:, None], "attention_mask": mask,
                 "position_ids": feeds["position_ids"][:, -1:] + 1}
        for i in range(len(layout)):
            for k in ("key", "value"):
                feeds[f"past_key_values.{i}.{k}"] = np.asarray(res[f"present.{i}.{k}"], np.float32)
    return np.concatenate(out, axis=1)

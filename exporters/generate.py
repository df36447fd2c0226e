"""Generation through any backend (ONNX Runtime, a TensorRT engine), and `lte-convert generate`.

With a KV cache (the default export):

    prefill: input_ids [B, S], attention_mask [B, S], position_ids, empty past ─► logits, present
    decode:  the chosen token [B, 1], attention_mask [B, S+t] (past + new), next positions,
             past = the previous step's present ─► ...

Positions follow Hugging Face generate(): cumsum(attention_mask) − 1, with padded positions
set to 1, so left-padded batches decode as in PyTorch. A sequence that emitted EOS continues
with the pad token (EOS when there is none), and generation stops when all have. A file
without a cache gets the whole sequence at every step. Tokens are picked greedily (argmax) or
sampled (`sampler`: temperature, then top-k, from a seeded generator).

`generate_text(source, prompt)` tries a result in one call: an LTE checkpoint folder runs in
PyTorch (transformers' generate on the LTE model), a `.onnx` file in ONNX Runtime.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lte_convert.errors import UserError

if TYPE_CHECKING:            # the backends import onnx and torch: not needed to check input
    from lte_convert.exporters.backends import Backend


def greedy_generate(backend: Backend, layout: list[tuple[int, int]] | None,
                    input_ids: np.ndarray, max_new_tokens: int, **kwargs) -> np.ndarray:
    """`generate` picking the most likely token at every step."""
    return generate(backend, layout, input_ids, max_new_tokens, **kwargs)


def sampler(temperature: float = 1.0, top_k: int = 0, seed: int = 0):
    """pick(logits [B, V]) -> ids [B]: softmax(logits / temperature) over the top_k (0: all)."""
    rng = np.random.default_rng(seed)

    def pick(logits):
        z = np.asarray(logits, np.float64) / temperature
        if 0 < top_k < z.shape[-1]:
            kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return np.array([rng.choice(len(row), p=row) for row in p], np.int64)
    return pick


def _argmax(logits):
    return np.asarray(logits, np.float32).argmax(-1).astype(np.int64)


def generate(backend: Backend, layout: list[tuple[int, int]] | None, input_ids: np.ndarray,
             max_new_tokens: int, *, attention_mask: np.ndarray | None = None,
             eos_token_id: int | None = None, pad_token_id: int | None = None,
             pick=_argmax) -> np.ndarray:
    """[B, S + generated] int64: the prompt followed by its continuation.

    layout: [(kv_heads, head_dim)] per layer (exporters.validate.cache_layout of the file), or
    None for a file without KV cache. pick: logits [B, V] -> next ids [B] (default argmax).
    """
    ids = np.asarray(input_ids, np.int64)
    B, S = ids.shape
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    feeds = {"input_ids": ids, "attention_mask": mask}
    if layout is not None:
        feeds["position_ids"] = pos
        for i, (h, hd) in enumerate(layout):
            for k in ("key", "value"):
                feeds[f"past_key_values.{i}.{k}"] = np.zeros((B, h, 0, hd), np.float32)
    pad = pad_token_id if pad_token_id is not None else eos_token_id
    done = np.zeros(B, bool)
    out = [ids]
    for _ in range(max_new_tokens):
        res = backend.run(feeds)
        nxt = pick(res["logits"][:, -1])
        if eos_token_id is not None:
            nxt = np.where(done, pad, nxt)
            done |= nxt == eos_token_id
        out.append(nxt[:, None])
        if done.all():
            break
        mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
        if layout is None:
            feeds = {"input_ids": np.concatenate(out, axis=1), "attention_mask": mask}
            continue
        feeds = {"input_ids": nxt[:, None], "attention_mask": mask,
                 "position_ids": feeds["position_ids"][:, -1:] + 1}
        for i in range(len(layout)):
            for k in ("key", "value"):
                feeds[f"past_key_values.{i}.{k}"] = np.asarray(res[f"present.{i}.{k}"], np.float32)
    return np.concatenate(out, axis=1)


# ---------------------------------------------------------------------------------------------
# lte-convert generate
# ---------------------------------------------------------------------------------------------
def _tokenizer(source: Path, tokenizer, trust_remote_code: bool):
    from transformers import AutoTokenizer

    folder = Path(tokenizer) if tokenizer else (
        source if source.is_dir() else source.with_name(source.stem + "-lte"))
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"No tokenizer for {source} in {folder} ({e}). Pass --tokenizer with "
                        "the LTE checkpoint folder the file was exported from (or any folder "
                        "holding its tokenizer files).") from None


def check_source(source: Path) -> None:
    """UserError unless `source` is an LTE checkpoint folder or a .onnx file (cheap: reads
    lte.json, not the weights)."""
    if not source.exists():
        raise UserError(f"{source} does not exist. Pass an LTE checkpoint folder (from "
                        "`lte-convert train`) or a .onnx file (from `lte-convert export`).")
    if source.is_dir():
        from lte_convert.converter.checkpoint import read_lte_info

        read_lte_info(source)
    elif source.suffix != ".onnx":
        raise UserError(f"{source} is neither an LTE checkpoint folder nor a .onnx file. Pass "
                        "the folder written by `lte-convert train` or the file written by "
                        "`lte-convert export`.")


def generate_text(source, prompt: str, *, max_new_tokens: int = 40, sample: bool = False,
                  temperature: float = 0.8, top_k: int = 50, seed: int = 0,
                  tokenizer=None, trust_remote_code: bool = False) -> str:
    """The prompt's continuation from an LTE checkpoint (PyTorch) or an exported .onnx file
    (ONNX Runtime): greedy, or sampled with temperature and top-k from `seed`."""
    source = Path(source)
    check_source(source)
    if not prompt.strip():
        raise UserError("The prompt is empty; pass some text with --prompt.")
    tok = _tokenizer(source, tokenizer, trust_remote_code)
    ids = np.asarray([tok(prompt).input_ids], np.int64)
    if ids.shape[1] == 0:
        raise UserError("The prompt is empty after tokenization; pass some text with --prompt.")
    eos = tok.eos_token_id
    if source.is_dir():
        import torch

        from lte_convert.converter.checkpoint import load_lte_model

        model, _ = load_lte_model(source, trust_remote_code=trust_remote_code)
        torch.manual_seed(seed)
        args = dict(do_sample=True, temperature=temperature, top_k=top_k) if sample else dict(
            do_sample=False)
        with torch.no_grad():
            out = model.generate(input_ids=torch.from_numpy(ids), max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=tok.pad_token_id or eos,
                                 attention_mask=torch.ones_like(torch.from_numpy(ids)),
                                 **args).numpy()
    else:
        from lte_convert.exporters.backends import OrtBackend
        from lte_convert.exporters.validate import cache_layout, open_lte_onnx

        proto, meta = open_lte_onnx(source)
        layout = cache_layout(proto) if meta.get("kv_cache") == "1" else None
        pick = sampler(temperature, top_k, seed) if sample else _argmax
        out = generate(OrtBackend(source, proto, masks=False), layout, ids, max_new_tokens,
                       eos_token_id=eos, pick=pick)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

"""What an exported file says about itself: `metadata_props` keys, written and read back.

    lte.format            "lte-onnx" (files without it were not produced by lte-convert)
    lte.format_version    "1"
    lte.expert_size, lte.tau, lte.activation, lte.gated
    lte.layers            JSON [layer index, ...] of the LTE FFNs, in graph order
    lte.n_experts         JSON [E per LTE layer]
    lte.sparsity          JSON [fraction of experts skipped per LTE layer] (measured on held-out
                          text by training, lte.json "layer_sparsity"; null when not measured)
    lte.mean_sparsity     their mean ("None" when not measured)
    lte.source_model      the Hugging Face model the checkpoint was made from
    lte.model_type, lte.num_layers, lte.hidden_size, lte.vocab_size
    lte.dtype             float32 | float16 | bfloat16
    lte.kv_cache          "1" | "0"
    lte.checkpoint_sha256 digest of the checkpoint's lte.json, routers and weights (to match a
                          reference)
    lte.tool_version      lte-convert's version
"""
from __future__ import annotations

import hashlib
import json
from importlib import metadata as _pkg
from pathlib import Path

FORMAT = "lte-onnx"
FORMAT_VERSION = 1
PREFIX = "lte."

# files of an LTE checkpoint that identify it (converter/checkpoint.py writes them): its LTE
# data, routers and every weight (the FFNs' included), sharded or not
FINGERPRINT_FILES = ("lte.json", "lte_routers.safetensors", "model.safetensors.index.json")
WEIGHT_FILES = "model*.safetensors"


def tool_version() -> str:
    try:
        return _pkg.version("lte-convert")
    except _pkg.PackageNotFoundError:
        return "unknown"


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 over the checkpoint's LTE files and weights ("" when it is not a folder with
    them). Reads every weight once (about 1 GB/s)."""
    path = Path(path)
    digest = hashlib.sha256()
    found = False
    files = [path / n for n in FINGERPRINT_FILES] + sorted(path.glob(WEIGHT_FILES))
    for f in files:
        if f.is_file():
            found = True
            digest.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest() if found else ""


def _sparsity_list(info: dict, layers: list[int]) -> list:
    """Per-layer sparsity from the checkpoint info, in `layers` order (None where unknown)."""
    raw = info.get("layer_sparsity")
    if isinstance(raw, (list, tuple)) and len(raw) == len(layers):
        return list(raw)
    return [None] * len(layers)


def build(model, modules, info: dict, *, dtype: str, kv_cache: bool, fingerprint: str) -> dict:
    """The metadata_props of an export: model = HF model, modules = [(layer, LTEFFN)]."""
    cfg = model.config
    layers = [i for i, _ in modules]
    shape = modules[0][1].shape
    props = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "expert_size": shape.expert_size,
        "tau": modules[0][1].tau,
        "activation": shape.activation,
        "gated": int(shape.gated),
        "layers": json.dumps(layers),
        "n_experts": json.dumps([m.shape.n_experts for _, m in modules]),
        "sparsity": json.dumps(_sparsity_list(info, layers)),
        "mean_sparsity": info.get("sparsity"),
        "source_model": str(info.get("source_model") or getattr(cfg, "_name_or_path", "") or ""),
        "model_type": cfg.model_type,
        "num_layers": cfg.get_text_config().num_hidden_layers,
        "hidden_size": shape.d,
        "vocab_size": cfg.get_text_config().vocab_size,
        "dtype": dtype,
        "kv_cache": int(kv_cache),
        "checkpoint_sha256": fingerprint,
        "tool_version": tool_version(),
    }
    return {PREFIX + k: str(v) for k, v in props.items()}


def read(props: dict) -> dict:
    """{key without prefix: value} of the lte.* entries; JSON lists decoded."""
    out = {}
    for k, v in props.items():
        if not k.startswith(PREFIX):
            continue
        k = k[len(PREFIX):]
        out[k] = json.loads(v) if k in ("layers", "n_experts", "sparsity") else v
    return out

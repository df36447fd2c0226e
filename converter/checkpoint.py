"""The LTE checkpoint (a folder) and threshold folding.

    <folder>/config.json, model.safetensors   HF `save_pretrained` output: permuted, padded
                                              weights under the family's own names; the
                                              config's intermediate size is the padded F
    <folder>/tokenizer files                  when a tokenizer is passed
    <folder>/lte_routers.safetensors          "<layer>.weight" [E, d], "<layer>.bias" [E]
    <folder>/lte.json                         format + version, expert_size, tau, folded,
                                              mode, offsets, per-layer data, provenance

`load_lte_model` rebuilds the LTE FFNs (no re-grouping: the weights are already grouped)
and loads the routers, so reloading gives identical logits. Weights are read from safetensors
only. A fused gate/up projection is saved fused again, in its original layout.

Loading through transformers' Auto classes gives the LTE model or fails loudly, never the
dense model without its routers (which writes other text): config.json's model_type is
MODEL_TYPE, which names the right loader (the real one is kept as `lte_model_type`).
    - in a process that imported this module, MODEL_TYPE is registered with AutoConfig,
      AutoModelForCausalLM and AutoModelForMaskedLM: `AutoModelForCausalLM.from_pretrained
      (folder)` returns `load_lte_model(folder)`'s model, AutoTokenizer works as usual;
    - anywhere else it stops with "model type `lte-convert (load with lte_convert.converter.
      checkpoint.load_lte_model)` ... does not recognize this architecture".
`hf_config(folder)` gives the real config (the dense model: `Cls.from_pretrained(folder,
config=hf_config(folder))`).

Folding (LTE.md step 5): σ(z) > τ ⇔ z > logit(τ), so with b' = b − logit(τ) + offset_l the
mask is z' > 0; with offset 0 it selects exactly the experts the stage-2 rule selects.
A positive offset switches more experts on (calibration to a target sparsity sets it).
"""
from __future__ import annotations

import importlib.metadata
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from lte_convert.converter.adapters import blocks, get_adapter
from lte_convert.atomic import atomic_path
from lte_convert.errors import UserError
from lte_convert.loading import check_remote_code, check_safetensors
from lte_convert.converter.surgery import lte_modules, wrap_model

FORMAT = "lte-convert-checkpoint"
VERSION = 2           # 2: config.json's model_type is MODEL_TYPE
MODEL_TYPE = "lte-convert (load with lte_convert.converter.checkpoint.load_lte_model)"
LTE_JSON = "lte.json"
ROUTERS = "lte_routers.safetensors"


def _require_lte(model):
    modules = lte_modules(model)
    if not modules:
        raise UserError("This model has no LTE FFNs; convert it first "
                        "(converter.surgery.convert_model) or load an LTE checkpoint.")
    return modules


# ---------------------------------------------------------------------------------------------
# Folding
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def fold(model, offsets: list[float] | None = None):
    """Fold −logit(τ) + offsets[l] into each router's bias; every LTEFFN goes to "folded"."""
    modules = _require_lte(model)
    if any(m.fold_offset is not None for _, m in modules):
        raise UserError("This model's routers are already folded; folding twice would subtract "
                        "logit(tau) again. Fold the unfolded (stage-2) model instead.")
    offsets = [0.0] * len(modules) if offsets is None else [float(o) for o in offsets]
    if len(offsets) != len(modules):
        raise UserError(f"fold got {len(offsets)} offsets for {len(modules)} LTE layers; pass "
                        "one offset per layer (or none for 0).")
    if not all(math.isfinite(o) for o in offsets):
        raise UserError(f"fold got non-finite offsets {offsets}; offsets must be finite floats.")
    for (_, m), off in zip(modules, offsets):
        assert 0.0 < m.tau < 1.0, m.tau
        m.router.bias += off - math.log(m.tau / (1.0 - m.tau))
        m.fold_offset = off
        m.set_mode("folded")
    return model


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def _hf_state_dict(model) -> dict:
    """model.state_dict() with each LTEFFN's tensors under the family's original names."""
    adapter = get_adapter(model.config)
    prefix, _ = blocks(model, adapter)
    sd = model.state_dict()
    for i, m in lte_modules(model):
        base = f"{prefix}.{i}."
        for key in [k for k in sd if k.startswith(base + adapter.ffn + ".")]:
            del sd[key]
        up_w, up_b = m.w_up, m.b_up
        if adapter.fused:                           # one projection: halves in its order
            halves = [(m.w_gate, m.b_gate), (m.w_up, m.b_up)]
            if adapter.fused == "up_gate":
                halves.reverse()
            up_w = torch.cat([w for w, _ in halves])
            up_b = None if m.b_up is None else torch.cat([b for _, b in halves])
        named = {adapter.up: (up_w, up_b), adapter.down: (m.w_down_t.t(), m.b_down)}
        if adapter.gate:
            named[adapter.gate] = (m.w_gate, m.b_gate)
        if adapter.conv1d:                          # Conv1D weight: [in, out]
            named = {k: (w.t(), b) for k, (w, b) in named.items()}
        for module, (w, b) in named.items():
            sd[f"{base}{module}.weight"] = w.detach().contiguous()
            if b is not None:
                sd[f"{base}{module}.bias"] = b.detach()
    return sd


def _lte_info(model, info: dict) -> dict:
    adapter = get_adapter(model.config)
    modules = lte_modules(model)
    first = modules[0][1]
    folded = first.fold_offset is not None
    versions = {p: importlib.metadata.version(p) for p in ("lte-convert", "torch", "transformers")
                if _installed(p)}
    core = {
        "format": FORMAT, "version": VERSION,
        "model_type": model.config.model_type, "family": adapter.family,
        "architecture": type(model).__name__,
        "expert_size": first.shape.expert_size, "n_experts": first.shape.n_experts,
        "d_ff": first.shape.d_ff, "d_ff_original": first.d_ff_original,
        "activation": first.shape.activation, "gated": first.shape.gated,
        "tau": first.tau, "folded": folded, "mode": first.mode,
        "layers": [i for i, _ in modules], "adapter": asdict(adapter),
        "offsets": [m.fold_offset for _, m in modules] if folded else None,
        "saved_with": versions,
    }
    return {**info, **core}


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def save_lte_checkpoint(model, path, info: dict | None = None, overwrite: bool = False,
                        tokenizer=None) -> Path:
    """Write the LTE checkpoint folder atomically; returns its path.

    info: extra entries for lte.json (per-layer sparsity, source model, training provenance);
    the format's own keys (expert_size, tau, folded, ...) are computed from the model and win.
    An existing non-empty folder is refused unless overwrite=True.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"Output path {path} exists and is a file, not a folder. Choose a "
                        "folder path for the LTE checkpoint.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        names = sorted(p.name for p in path.iterdir())
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise UserError(f"Output folder {path} exists and is not empty ({len(names)} entries: "
                        f"{shown}). Pass --overwrite (overwrite=True) to replace it, or choose "
                        "another folder.")
    modules = _require_lte(model)
    meta = _lte_info(model, dict(info or {}))
    routers = {}
    for i, m in modules:
        routers[f"{i}.weight"] = m.router.weight.detach().cpu().contiguous()
        routers[f"{i}.bias"] = m.router.bias.detach().cpu().contiguous()
    with atomic_path(path, is_dir=True) as tmp:
        model.save_pretrained(tmp, state_dict=_hf_state_dict(model), safe_serialization=True)
        config = json.loads((tmp / "config.json").read_text())
        config.update(model_type=MODEL_TYPE, lte_model_type=config["model_type"])
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(routers, str(tmp / ROUTERS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / LTE_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
class LTECheckpointConfig(transformers.PreTrainedConfig):
    """What AutoConfig reads from an LTE checkpoint's config.json in this process."""

    model_type = MODEL_TYPE


class LTECheckpointLoader:
    """What the Auto model classes load an LTE checkpoint with: load_lte_model."""

    config_class = LTECheckpointConfig

    @classmethod
    def from_pretrained(cls, path, *args, config=None, dtype=None, trust_remote_code=False,
                        **kwargs):
        return load_lte_model(path, dtype=dtype, trust_remote_code=bool(trust_remote_code))[0]


transformers.AutoConfig.register(MODEL_TYPE, LTECheckpointConfig, exist_ok=True)
for _auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForMaskedLM):
    _auto.register(LTECheckpointConfig, LTECheckpointLoader, exist_ok=True)


def read_lte_info(path) -> dict:
    """lte.json of a checkpoint folder, validated (UserError when it is not one we can read)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"LTE checkpoint folder {path} does not exist (or is not a folder). "
                        "Pass the folder written by `lte-convert train` / `fold`.")
    file = path / LTE_JSON
    if not file.is_file():
        raise UserError(f"{path} has no {LTE_JSON}, so it is not an LTE checkpoint. Pass a "
                        "folder written by `lte-convert train` / `fold` (a plain Hugging Face "
                        "model folder must be trained first).")
    try:
        info = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not valid JSON ({e}); the checkpoint is damaged.") from e
    if info.get("format") != FORMAT or not isinstance(info.get("version"), int):
        raise UserError(f"{file} has format {info.get('format')!r}, version "
                        f"{info.get('version')!r}; expected format {FORMAT!r}. It was not "
                        "written by lte-convert.")
    if info["version"] > VERSION:
        raise UserError(f"{file} has format version {info['version']}, newer than this "
                        f"lte-convert reads ({VERSION}). Upgrade lte-convert.")
    return info


def _dynamic_class(ref: str, folder: Path):
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    return get_class_from_dynamic_module(ref, str(folder))


def hf_config(path, trust_remote_code: bool = False):
    """The checkpoint's transformers config, with its real model type (see the module doc)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(path)
    info = read_lte_info(path)
    data = check_remote_code(path, trust_remote_code)
    data["model_type"] = data.pop("lte_model_type", info["model_type"])
    auto_map = data.get("auto_map") or {}
    if "AutoConfig" in auto_map:
        cls = _dynamic_class(auto_map["AutoConfig"], path)
    elif data["model_type"] in CONFIG_MAPPING:
        cls = CONFIG_MAPPING[data["model_type"]]
    else:
        raise UserError(f"{path}/config.json has model type {data['model_type']!r}, which "
                        f"transformers {transformers.__version__} does not have.")
    config = cls.from_dict(data)
    config._name_or_path = str(path)
    return config


def _model_class(path: Path, info: dict, config):
    ref = next((v for v in (getattr(config, "auto_map", None) or {}).values()
                if v.split(".")[-1] == info["architecture"]), None)
    cls = _dynamic_class(ref, path) if ref else getattr(transformers, info["architecture"], None)
    if cls is None:
        raise UserError(f"{path}/lte.json names architecture {info['architecture']!r}, which "
                        f"transformers {transformers.__version__} does not have.")
    return cls


def load_lte_model(path, dtype=None, device="cpu", trust_remote_code: bool = False):
    """(model, info): the HF model with LTE FFNs, routers loaded, mode from lte.json."""
    path = Path(path)
    info = read_lte_info(path)
    if not ((path / "model.safetensors").is_file()
            or (path / "model.safetensors.index.json").is_file()):
        raise UserError(f"{path} has no model.safetensors; lte-convert reads weights from "
                        "safetensors only (never pickled .bin files). Re-save the checkpoint.")
    if not (path / ROUTERS).is_file():
        raise UserError(f"{path} has no {ROUTERS}; the checkpoint is incomplete. Re-save it.")
    check_safetensors(path)
    config = hf_config(path, trust_remote_code)
    kwargs = {"use_safetensors": True, "config": config}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = _model_class(path, info, config).from_pretrained(path, **kwargs).to(device)
    wrap_model(model, info["expert_size"], tau=info["tau"], permute=False)
    routers = load_file(str(path / ROUTERS), device=str(device))
    modules = lte_modules(model)
    if [i for i, _ in modules] != info["layers"]:
        raise UserError(f"{path}: lte.json lists LTE layers {info['layers']} but the model has "
                        f"{[i for i, _ in modules]}; the checkpoint is inconsistent.")
    offsets = info["offsets"] or [None] * len(modules)
    with torch.no_grad():
        for (i, m), off in zip(modules, offsets):
            m.router.weight.copy_(routers[f"{i}.weight"])
            m.router.bias.copy_(routers[f"{i}.bias"])
            m.d_ff_original = info.get("d_ff_original", m.shape.d_ff)
            m.fold_offset = off if info["folded"] else None
            m.set_mode("folded" if info["folded"] else info["mode"])
    return model.eval(), info

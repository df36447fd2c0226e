"""Adapters for families the registry does not name: derived from the model, proven, printed.

    resolve_adapter(model) -> Adapter
      registry entry (plain built-in model)  or  the derived adapter the model already carries
      else derive:
        1. blocks: the ModuleList with num_hidden_layers entries (the largest if several)
        2. in block 0, the projections (nn.Linear or transformers' Conv1D, weight [in, out]):
           down  F -> d          F from the config's size field (intermediate_size, ffn_dim,
           up    d -> F          n_inner, ...), else the widest F -> d projection
           gate  d -> F          (gated: two d -> F projections, either may be the gate)
           fused d -> 2F         (gate and up in one projection, halves in either order)
        3. activation: the config field naming it (hidden_act, activation_function, ...); when
           none does, each supported activation is tried
        4. candidates: the FFN's parent module replaced by the LTEFFN; for non-gated FFNs whose
           activation is a module, also the inline form (up replaced, activation and down made
           nn.Identity), which keeps whatever the parent does after down (dropout, residual)
      and PROVE every candidate before use (the registry's entries too):
        hidden states of random ids enter each block; the block's output with the candidate's
        LTEFFN installed (dense, unpermuted) must equal the original's within fp32 rounding,
        and the LTEFFN must run exactly once per block.
      The best proven candidate is used and printed as a REGISTRY line; if none is proven,
      a UserError says what was found and how to add a registry entry.

Parallel attention/MLP blocks, biases, multi-query attention and partial rotary embeddings
need nothing here: the proof runs the block as the model does.
"""
from __future__ import annotations

import sys
from dataclasses import asdict, replace

import torch
from torch import nn
from torch.utils._pytree import tree_map

from lte_convert.converter.adapters import (REGISTRY, Adapter, as_source, get_adapter,
                                            read_ffn)
from lte_convert.converter.adapters import blocks as named_blocks
from lte_convert.errors import UserError
from lte_convert.plugins.spec import ACTIVATIONS

# config fields that hold d_ff, most common first
SIZE_FIELDS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff",
               "inner_hidden_size", "ffn_size")
# config fields that name the activation, most common first; others containing "act" follow
ACT_FIELDS = ("hidden_act", "activation_function", "hidden_activation", "activation")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}  # relative
PROOF_IDS = (2, 8)        # random ids [batch, seq] whose hidden states enter the blocks


def _projections(block) -> dict[str, tuple[int, int, bool]]:
    """{block-relative path: (in, out, conv1d)} of the block's nn.Linear / Conv1D modules."""
    out = {}
    for name, m in block.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features, False)
        elif type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:
            out[name] = (w.shape[0], w.shape[1], True)
    return out


def find_blocks(model) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the transformer blocks: num_hidden_layers entries, most params."""
    n = model.config.get_text_config().num_hidden_layers
    lists = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n]
    if not lists:
        raise UserError(f"Found no list of {n} transformer blocks (num_hidden_layers) in "
                        f"{type(model).__name__}, so lte-convert cannot find its FFNs. "
                        + _ADD_ENTRY)
    return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def _layers_suffix(model, name: str) -> str:
    prefix = getattr(model, "base_model_prefix", "") + "."
    return name[len(prefix):] if name.startswith(prefix) and len(name) > len(prefix) else name


def _config_activation(config) -> tuple[str, str] | None:
    """(field, HF activation name) of the config field naming the FFN activation, or None."""
    from transformers.activations import ACT2FN

    values = config.to_dict()
    fields = [f for f in ACT_FIELDS if f in values] + sorted(
        f for f in values if "act" in f.lower() and f not in ACT_FIELDS)
    for f in fields:
        if isinstance(values[f], str) and values[f] in ACT2FN:
            return f, values[f]
    return None


def _size_field(config, d_ff: int) -> str | None:
    values = config.to_dict()
    for f in SIZE_FIELDS:
        if values.get(f) == d_ff:
            return f
    return next((f for f in SIZE_FIELDS if f in values and values[f] is None), None)


def _activation_modules(block, parent: str, used: set[str]) -> list[str]:
    """Block-relative paths of parameter-free activation modules under `parent`."""
    words = ("act", "gelu", "relu", "silu", "swish")
    out = []
    for name, m in block.get_submodule(parent).named_modules() if parent else []:
        path = f"{parent}.{name}" if name else parent
        if (name and path not in used and not any(True for _ in m.parameters())
                and any(w in (name.split(".")[-1] + type(m).__name__).lower() for w in words)):
            out.append(path)
    return out


def _candidates(model, layers: str, block) -> tuple[list[Adapter], dict]:
    """Structural candidates for the block's FFN, and what was found (for messages)."""
    config = model.config
    d = config.get_text_config().hidden_size
    projs = _projections(block)
    found = {"projections": {p: f"{i}->{o}" for p, (i, o, _) in projs.items()}}
    sizes = {v for f in SIZE_FIELDS if isinstance(v := config.to_dict().get(f), int)}
    downs = sorted(((i, p) for p, (i, o, _) in projs.items() if o == d and i != d),
                   key=lambda ip: (ip[0] not in sizes, -ip[0]))
    act = _config_activation(config)
    found["activation"] = f"{act[0]}={act[1]!r}" if act else "no config field"
    out = []
    for F_, down in downs:
        ups = sorted(p for p, (i, o, _) in projs.items() if i == d and o == F_)
        fused = sorted(p for p, (i, o, _) in projs.items() if i == d and o == 2 * F_)
        conv1d = projs[down][2]
        base = dict(family=config.model_type, layers=layers, down=down, conv1d=conv1d,
                    size_field=_size_field(config, F_))
        if len(ups) == 2:
            named_gate = sorted(ups, key=lambda p: "gate" not in p.split(".")[-1])
            shapes = [dict(gate=g, up=u) for g, u in (named_gate, named_gate[::-1])]
        elif len(ups) == 1:
            shapes = [dict(up=ups[0])]
        elif len(fused) == 1:
            shapes = [dict(up=fused[0], fused=order) for order in ("gate_up", "up_gate")]
        else:
            continue
        for s in shapes:
            paths = [p for p in (s.get("gate"), s["up"], down) if p]
            parent = ".".join(_common_prefix([p.split(".") for p in paths]))
            if any(projs[p][2] != conv1d for p in paths):
                continue
            acts = _activation_modules(block, parent, set(paths))
            whole = [Adapter(**base, **s, ffn=parent)] if parent else []
            inline = ([Adapter(**base, **s, ffn=s["up"], identity=(acts[0], down))]
                      if "gate" not in s and "fused" not in s and len(acts) == 1 else [])
            # inline keeps what the parent does after down; prefer it when there is any
            extra = parent and len(list(block.get_submodule(parent).children())) > len(paths) + len(acts)
            out += inline + whole if extra else whole + inline
        if out:
            break
    with_act = []
    for a in out:
        if act:
            with_act.append(replace(a, act_field=act[0]))
        else:
            with_act += [replace(a, act=name) for name in ACTIVATIONS]
    return with_act, found


def _common_prefix(parts: list[list[str]]) -> list[str]:
    prefix = []
    for names in zip(*[p[:-1] for p in parts]):
        if len(set(names)) != 1:
            break
        prefix.append(names[0])
    return prefix


# ---------------------------------------------------------------------------------------------
# The proof
# ---------------------------------------------------------------------------------------------
def _clone(x):
    return x.clone() if isinstance(x, torch.Tensor) else x


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    items = out.values() if isinstance(out, dict) else out
    return next(t for t in items if isinstance(t, torch.Tensor))


@torch.no_grad()
def block_inputs(model, blocks) -> list[tuple[tuple, dict]]:
    """(args, kwargs) each block receives on random ids, captured with pre-hooks."""
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, PROOF_IDS, generator=gen).to(model.device)
    seen = {}

    def hook(i):
        def pre(module, args, kwargs):
            seen.setdefault(i, tree_map(_clone, (args, kwargs)))
        return pre

    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, b in enumerate(blocks)]
    try:
        model(input_ids=ids, use_cache=False) if model.can_generate() else model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return [seen[i] for i in range(len(blocks))]


def _dense_lte(block, adapter: Adapter, activation: str):
    """An unpermuted, dense-mode LTEFFN with the block's FFN weights (one expert of F)."""
    from lte_convert.converter.lte_ffn import LTEFFN
    from lte_convert.plugins.spec import FFNShape

    w = read_ffn(block, adapter)
    F_, d = w["w_up"].shape
    shape = FFNShape(d=d, d_ff=F_, expert_size=F_, activation=activation, gated=adapter.gated)
    return LTEFFN(shape, **w)


def _relative(out, ref) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))


@torch.no_grad()
def prove(model, blocks, inputs, adapter: Adapter) -> float:
    """Largest relative error (max |Δ| / max |original|) of, per block, the FFN's output
    (the replaced module's input through the LTEFFN vs what the original FFN produced from
    it) and the block's output with the LTEFFN installed. Raises ValueError saying why the
    adapter does not apply."""
    activation = adapter.activation(model.config)
    worst = 0.0
    for i, (block, (args, kwargs)) in enumerate(zip(blocks, inputs)):
        try:
            ffn = _dense_lte(block, adapter, activation)
            target = block.get_submodule(adapter.ffn)
            produced = block.get_submodule(adapter.down if adapter.identity else adapter.ffn)
        except (AttributeError, AssertionError, RuntimeError) as e:
            raise ValueError(f"block {i}: cannot read the FFN weights ({e})") from None
        io = {}

        def keep(key, value):      # a clone: blocks may add to these in place (Falcon does)
            io.setdefault(key, tree_map(_clone, value))

        hooks = [target.register_forward_pre_hook(lambda _m, a: keep("x", a)),
                 produced.register_forward_hook(lambda _m, _a, y: keep("y", y))]
        try:
            ref = _first_tensor(block(*args, **kwargs))
        finally:
            for h in hooks:
                h.remove()
        if "x" not in io or "y" not in io or not isinstance(io["y"], torch.Tensor):
            raise ValueError(f"block {i}: {adapter.ffn} or {adapter.down} does not run as one "
                             "module with a tensor output")
        saved = {p: block.get_submodule(p) for p in (adapter.ffn, *adapter.identity)}
        x = _wide_inputs(ffn, io["x"][0])
        calls = []
        ffn.register_forward_hook(lambda *_: calls.append(1))
        try:
            worst = max(worst, _relative(ffn(*io["x"]), io["y"]),
                        _relative(ffn(x), _original_ffn(saved.values(), x)))
            calls.clear()
            block.set_submodule(adapter.ffn, ffn)
            for path in adapter.identity:
                block.set_submodule(path, nn.Identity())
            out = _first_tensor(block(*args, **kwargs))
        except Exception as e:       # the block's own code failed with the candidate in place
            raise ValueError(f"block {i}: the block fails with it in place "
                             f"({type(e).__name__}: {e})") from None
        finally:
            for path, module in saved.items():
                block.set_submodule(path, module)
        if len(calls) != 1:
            raise ValueError(f"block {i}: the replaced module ran {len(calls)} times, not once")
        if out.shape != ref.shape:
            raise ValueError(f"block {i}: output shape {tuple(out.shape)} instead of "
                             f"{tuple(ref.shape)}")
        worst = max(worst, _relative(out, ref))
    return worst


def _wide_inputs(ffn, like):
    """Random x [2, 8, d] scaled so the up projection's outputs have std 3: wide enough that
    activations which agree near 0 (gelu and its tanh approximation) differ."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((2, 8, like.shape[-1]), generator=gen).to(like)
    return x * (3.0 / (x @ ffn.w_up.t()).std().clamp_min(1e-6))


def _original_ffn(modules, x):
    """The original FFN on x: the replaced module, then (inline adapters) the activation and
    down projection the LTEFFN stands in for."""
    for m in modules:
        x = m(x)
    return x


# ---------------------------------------------------------------------------------------------
# Resolving
# ---------------------------------------------------------------------------------------------
_ADD_ENTRY = ("To support it, add an Adapter entry for its model type to REGISTRY in "
              "converter/adapters.py (fields: layers = the ModuleList of blocks; ffn = the "
              "module the LTE FFN replaces; up, gate, down = the projections; fused = "
              "'gate_up' | 'up_gate' when one projection holds both; identity = modules the LTE "
              "FFN makes redundant; act_field or act; size_field; conv1d).")


def _echo(text: str):
    print(text, file=sys.stderr)


def resolve_adapter(model, echo=_echo) -> Adapter:
    """The proven adapter for `model` (see the module doc); derived ones are printed."""
    config = model.config
    remote = bool(getattr(config, "auto_map", None))
    derived = not (getattr(config, "lte_adapter", None)
                   or (config.model_type in REGISTRY and not remote))
    if derived:
        name, found_blocks = find_blocks(model)
        candidates, found = _candidates(model, _layers_suffix(model, name), found_blocks[0])
    else:
        candidates, found = [get_adapter(config)], {}
    if not candidates:
        raise UserError(_refusal(config.model_type, derived, found, [], 0.0))
    candidates[0].activation(config)         # an activation the op lacks: that error, now
    blocks = named_blocks(model, candidates[0])[1]
    inputs = block_inputs(model, blocks)
    tol = TOLERANCE.get(model.dtype, TOLERANCE[torch.bfloat16])
    results = []
    for adapter in candidates:
        try:
            results.append((prove(model, blocks, inputs, adapter), adapter, None))
        except ValueError as e:
            results.append((float("inf"), adapter, str(e)))
    err, adapter, _ = min(results, key=lambda r: r[0])
    if err > tol:
        raise UserError(_refusal(config.model_type, derived, found, results, tol))
    if derived:
        echo(f"lte-convert: model type {config.model_type!r}"
             f"{' (remote code)' if remote else ''} has no registry adapter; derived one and "
             f"proved it on {len(blocks)} blocks (max relative error {err:.1e}, tolerance "
             f"{tol:.0e}):\n    {as_source(adapter)}\nAdd this line to REGISTRY in "
             "converter/adapters.py to make it permanent.")
        config.lte_adapter = asdict(adapter)
    return adapter


def _refusal(model_type, derived, found, results, tol) -> str:
    seen = ""
    if found:
        projs = ", ".join(f"{p} {s}" for p, s in found["projections"].items())
        seen = f" Found in block 0: projections {projs}; activation: {found['activation']}."
    if not results:
        return (f"Model type {model_type!r} has no registry adapter, and lte-convert found no "
                "dense FFN to derive one from (an up projection d -> F or d -> 2F and a down "
                f"projection F -> d in each block; mixture-of-experts layers are not supported)."
                f"{seen} " + _ADD_ENTRY)
    tried = "; ".join(f"{as_source(a)[:-1]} -> " + (why or f"relative error {e:.1e} > {tol:.0e}")
                      for e, a, why in results[:6])
    what = ("has no registry adapter, and none derived from its modules reproduces its FFN"
            if derived else "has a registry adapter that does not reproduce its FFN")
    return (f"Model type {model_type!r} {what} (proof: on random inputs, each block's FFN "
            "output and the block's output with the decomposed FFN in place must match the "
            f"original within fp32 rounding).{seen} Tried: {tried}. " + _ADD_ENTRY)

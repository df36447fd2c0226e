"""Model surgery: replace each FFN of a Hugging Face model by an LTEFFN (explicit module
replacement, never a patched `forward`).

convert_model(model, expert_size, seed):
    1. adapter = REGISTRY[config.model_type], or derived from the model (converter/derive.py);
       either is proven on the model before use
    2. per block: read W_gate/W_up/W_down (+ biases) into the kernel layout [F, d]; a fused
       gate/up projection is split into its two halves
    3. balanced k-means on the rows of W_gate (W_up if non-gated) → permutation
       (converter/grouping.py); zero-pad to F = ceil(d_ff / s)·s neurons
    4. LTEFFN(mode="dense") with the permuted weights; router initialised below
    5. config.<intermediate size field> = F, so the saved folder loads with from_pretrained
The converted model is function-identical to the original in "dense" mode: a permutation of
the intermediate dimension, and padded neurons that are zero in and out.

Router initialisation: W_r,e = mean of expert e's raw W_gate rows (W_up for non-gated
families; padding rows excluded), b_r,e = mean of the same rows' biases + ROUTER_INIT_BIAS.
So z_e(x) starts as the average gate pre-activation of the expert's neurons (the k-means
cluster's mean row, in the weights' own scale), which ranks experts by how active their
neurons are for this token at no data cost, shifted by +2 (σ ≈ 0.88): stage 1 starts near
the dense model with every expert on, instead of halving every expert's output at step 0
(bias 0) or starting from a random ranking (PyTorch's default init). Measured: see
converter/lte_ffn.py and results/grouping.md.
"""
from __future__ import annotations

import torch
from torch import nn

from lte_convert.converter import grouping
from lte_convert.converter.adapters import Adapter, blocks, get_adapter, read_ffn
from lte_convert.errors import UserError
from lte_convert.converter.lte_ffn import MODES, ROUTER_INIT_BIAS, LTEFFN
from lte_convert.plugins.spec import FFNShape


def lte_modules(model) -> list[tuple[int, LTEFFN]]:
    """[(layer index, LTEFFN)] in layer order; empty for an unconverted model."""
    if not any(isinstance(m, LTEFFN) for m in model.modules()):
        return []
    adapter = get_adapter(model.config)
    out = []
    for i, block in enumerate(blocks(model, adapter)[1]):
        module = block.get_submodule(adapter.ffn)
        if isinstance(module, LTEFFN):
            out.append((i, module))
    return out


def _permute(w: dict, perm: torch.Tensor) -> dict:
    """Reorder (and zero-pad to len(perm)) the intermediate dimension of every F-sized tensor."""
    out = {}
    for name, t in w.items():
        if t is None or name == "b_down":
            out[name] = None if t is None else t.clone()
            continue
        n = t.shape[0]
        padded = torch.cat([t, t.new_zeros((len(perm) - n,) + tuple(t.shape[1:]))])
        out[name] = padded[perm.to(t.device)].contiguous()
    return out


@torch.no_grad()
def _init_router(ffn: LTEFFN, real: torch.Tensor):
    """Router = mean raw gate (or up) row and bias of each expert's real neurons, + bias."""
    s = ffn.shape.expert_size
    rows = ffn.w_gate if ffn.shape.gated else ffn.w_up
    bias = ffn.b_gate if ffn.shape.gated else ffn.b_up
    keep = real.to(rows.dtype).view(-1, s, 1)                  # [E, s, 1]
    count = keep.sum(1).clamp_min(1)                           # [E, 1]; an all-padding expert: 0
    ffn.router.weight.copy_((rows.view(-1, s, rows.shape[1]) * keep).sum(1) / count)
    b = 0.0 if bias is None else (bias.view(-1, s) * keep[..., 0]).sum(1) / count[:, 0]
    ffn.router.bias.copy_(b + ROUTER_INIT_BIAS)


def _install(block, adapter: Adapter, ffn: LTEFFN):
    block.set_submodule(adapter.ffn, ffn)
    for path in adapter.identity:
        block.set_submodule(path, nn.Identity())


@torch.no_grad()
def wrap_model(model, expert_size: int, tau: float = 0.5, permute: bool = True, seed: int = 0,
               group: bool = True):
    """Replace every FFN by an LTEFFN. permute=False keeps the neuron order (loading an LTE
    checkpoint, whose weights are already grouped and padded); the router then stays at its
    default init, to be overwritten by the saved routers. permute=True (converting) first
    proves the adapter on the model (converter/derive.py), deriving one if need be, and pads;
    group=False then keeps the original neuron order (for regroup() by activations)."""
    if not isinstance(expert_size, int) or isinstance(expert_size, bool) or expert_size <= 0:
        raise UserError(f"expert_size must be a positive integer, got {expert_size!r}. "
                        "The LTE paper uses 32.")
    if lte_modules(model):
        raise UserError("This model already has LTE FFNs (it was converted before, or loaded "
                        "from an LTE checkpoint). Convert the original Hugging Face model instead.")
    if permute:
        from lte_convert.converter.derive import resolve_adapter
        adapter = resolve_adapter(model)
    else:
        adapter = get_adapter(model.config)
    activation = adapter.activation(model.config)
    layer_list = blocks(model, adapter)[1]
    d_ff = read_ffn(layer_list[0], adapter)["w_up"].shape[0]
    if not permute and d_ff % expert_size:
        raise UserError(f"The checkpoint's intermediate size {d_ff} is not a multiple of its "
                        f"expert_size {expert_size}; the LTE checkpoint is inconsistent.")
    F = -(-d_ff // expert_size) * expert_size
    if F != d_ff and adapter.size_field is None:
        raise UserError(f"The FFN size {d_ff} is not a multiple of expert_size {expert_size}, "
                        f"and no config field of this {adapter.family} model holds the FFN size, "
                        "so a zero-padded checkpoint could not be loaded again. Pass an "
                        f"expert size that divides {d_ff} (--expert-size).")
    for i, block in enumerate(layer_list):
        w = read_ffn(block, adapter)
        if w["w_up"].shape[0] != d_ff:
            raise UserError(f"Layer {i} of this {adapter.family} model has an FFN of "
                            f"{w['w_up'].shape[0]} neurons, layer 0 has {d_ff}; lte-convert "
                            "needs one FFN size for all layers.")
        if permute and group:
            key = w["w_gate"] if adapter.gated else w["w_up"]
            perm = grouping.expert_permutation(key, expert_size, seed=seed + i)
        else:
            perm = torch.arange(F)
        shape = FFNShape(d=w["w_up"].shape[1], d_ff=F, expert_size=expert_size,
                         activation=activation, gated=adapter.gated)
        ffn = LTEFFN(shape, tau=tau, **_permute(w, perm))
        if permute:
            _init_router(ffn, perm < d_ff)
            ffn.d_ff_original = d_ff
        _install(block, adapter, ffn)
    if adapter.size_field is not None:
        setattr(model.config, adapter.size_field, F)
    return model


def convert_model(model, expert_size: int = 32, seed: int = 0, grouping: str = "weights"):
    """Pad and wrap every FFN (LTEFFN in "dense" mode); grouping "weights" groups neurons by
    k-means on their weight rows now, "none" keeps their order (regroup() later, e.g. by
    co-activation, converter/routers.py). Returns `model`."""
    if grouping not in ("weights", "none"):
        raise UserError(f"Unknown grouping {grouping!r}; expected weights or none (co-activation "
                        "grouping needs data: converter/routers.py).")
    return wrap_model(model, expert_size, permute=True, seed=seed, group=grouping == "weights")


@torch.no_grad()
def regroup(ffn: LTEFFN, perm: torch.Tensor):
    """Reorder ffn's neurons by `perm` [F] (indices into its current order; function-identical
    in "dense" mode) and start its router again from the new experts' mean rows."""
    real = (ffn.w_up != 0).any(1) | (ffn.w_down_t != 0).any(1)        # padding rows are zero
    for name in ("w_gate", "w_up", "w_down_t", "b_gate", "b_up"):
        p = getattr(ffn, name)
        if p is not None:
            p.data = p.data[perm.to(p.device)].contiguous()
    _init_router(ffn, real[perm.to(real.device)])


def set_mode(model, mode: str):
    """Set every LTEFFN's mode: dense | soft (stage 1) | hard (stage 2) | folded."""
    if mode not in MODES:
        raise UserError(f"Unknown LTE mode {mode!r}; expected one of {', '.join(MODES)}.")
    modules = lte_modules(model)
    if not modules:
        raise UserError("This model has no LTE FFNs; convert it first (converter.surgery."
                        "convert_model) or load an LTE checkpoint.")
    folded = [m.fold_offset is not None for _, m in modules]
    if mode == "folded" and not all(folded):
        raise UserError("Mode 'folded' needs folded routers (their bias holds −logit(tau)); "
                        "call converter.checkpoint.fold(model, offsets) instead.")
    if mode in ("soft", "hard") and any(folded):
        raise UserError(f"Mode {mode!r} uses the unfolded routers, but this model's routers "
                        "are folded (their bias holds −logit(tau) + offset). Use mode 'folded' "
                        "or 'dense', or reload the checkpoint saved before folding.")
    for _, m in modules:
        m.set_mode(mode)
    return model

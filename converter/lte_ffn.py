"""LTEFFN: the module that replaces a family's FFN (Learn-To-be-Efficient, LTE.md).

Weights are held in the kernel layout of plugins/spec.py, for x [..., d], F = E·s:

    w_gate [F, d] (gated only)   w_up [F, d]   w_down_t [F, d] (W_down transposed)
    b_gate [F] | None            b_up [F] | None                b_down [d] | None
    router: nn.Linear(d, E)      z = x·W_rᵀ + b_r                              # [..., E]

Expert e owns neurons e·s … e·s+s−1 (surgery permutes the original neurons so that k-means
clusters are contiguous). Neurons past the original d_ff are zero padding: their rows are 0
and every supported activation has act(0) = 0, so they never change the output.

Modes (a plain Python attribute, so exported graphs see only one branch):

    "dense"   the original FFN (permuted):
              y = (act(x·W_gateᵀ + b_gate) ⊙ (x·W_upᵀ + b_up))·W_down_t + b_down
    "soft"    stage 1: h ⊙ repeat_interleave(σ(z), s); σ(z) kept in `last_scores` for the losses
    "hard"    stage 2: h ⊙ repeat_interleave(σ(z) > τ, s) (selected experts are not scaled)
    "folded"  deployment: mask = z > 0 (−logit(τ) and any offset already in router.bias);
              runs plugins.ops.sparse_ffn, i.e. the lte::sparse_ffn op or its ONNX node pair.

Router initialisation (converter.surgery): W_r,e = mean of expert e's raw W_gate rows (W_up
for non-gated FFNs; padding excluded), b_r,e = mean of their biases + ROUTER_INIT_BIAS. So z_e
starts as the average gate pre-activation of the expert's neurons (the k-means cluster's mean
row, in the weights' own scale) plus 2: σ(z) ≈ 0.88 where that average is 0, so stage 1 starts
near the dense model (experts on, scaled by ~0.9) and the efficiency loss switches off first
the experts whose neurons this token barely activates. Without training, keeping each token's
top half of experts by this init gives SmolLM2 perplexity 2994 vs 20226 for a random half
(oracle 322; results/grouping.md).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lte_convert.plugins import ops
from lte_convert.plugins.reference import ACT_FNS
from lte_convert.plugins.spec import FFNShape, gate_up_pair

MODES = ("dense", "soft", "hard", "folded")
ROUTER_INIT_BIAS = 2.0      # σ(2) ≈ 0.88: experts start on, above τ = 0.5


def _param(t):
    return None if t is None else nn.Parameter(t.contiguous(), requires_grad=True)


class LTEFFN(nn.Module):
    """One LTE feed-forward block. Build it with `LTEFFN(shape, w_up, w_down_t, ...)`."""

    def __init__(self, shape: FFNShape, w_up, w_down_t, w_gate=None, b_gate=None, b_up=None,
                 b_down=None, tau: float = 0.5, mode: str = "dense"):
        super().__init__()
        d, F_ = shape.d, shape.d_ff
        assert shape.gated == (w_gate is not None), (shape.gated, w_gate is None)
        for name, t, want in (("w_up", w_up, (F_, d)), ("w_down_t", w_down_t, (F_, d)),
                              ("w_gate", w_gate, (F_, d)), ("b_gate", b_gate, (F_,)),
                              ("b_up", b_up, (F_,)), ("b_down", b_down, (d,))):
            assert t is None or tuple(t.shape) == want, (name, tuple(t.shape), want)
        self.shape = shape
        self.w_gate = _param(w_gate)
        self.w_up = _param(w_up)
        self.w_down_t = _param(w_down_t)
        self.b_gate = _param(b_gate)
        self.b_up = _param(b_up)
        self.b_down = _param(b_down)
        self.router = nn.Linear(d, shape.n_experts, bias=True, dtype=w_up.dtype,
                                device=w_up.device)
        self.tau = float(tau)
        self.fold_offset = None          # set by checkpoint.fold: the offset folded in
        self.d_ff_original = shape.d_ff  # before zero padding (set by surgery)
        self.last_scores = None
        self.hold_target = None          # stage 2 holds this layer's sparsity here (train.py)
        self.margins = []                # this step's router margins while it does
        self._act = ACT_FNS[shape.activation]
        self.set_mode(mode)

    # -----------------------------------------------------------------------------------------
    # Modes
    # -----------------------------------------------------------------------------------------
    def set_mode(self, mode: str):
        """Switch mode. Router parameters train only in "soft" (stage 1); elsewhere frozen."""
        assert mode in MODES, mode
        self.mode = mode
        self.router.requires_grad_(mode == "soft")
        self.last_scores = None
        if mode == "folded":
            self._pair_gate_up()

    def _pair_gate_up(self):
        """Move W_gate and W_up into one [2, F, d] storage; both stay separate parameters
        (state dict, export and checkpoints unchanged). The CPU kernel then computes a block
        of both with one batched GEMM, ≈1.25x faster per SmolLM2 layer (plugins/cpu.py)."""
        if not self.shape.gated or gate_up_pair(self.w_gate, self.w_up) is not None:
            return
        with torch.no_grad():
            pair = torch.stack([self.w_gate.data, self.w_up.data])          # [2, F, d]
        self.w_gate.data, self.w_up.data = pair[0], pair[1]

    def _apply(self, fn, recurse=True):
        """.to() / .half() / .cuda() give every parameter new storage: pair them again."""
        super()._apply(fn, recurse)
        if self.mode == "folded":
            self._pair_gate_up()
        return self

    def extra_repr(self) -> str:
        s = self.shape
        return (f"d={s.d}, d_ff={s.d_ff}, expert_size={s.expert_size}, experts={s.n_experts}, "
                f"activation={s.activation}, gated={s.gated}, mode={self.mode}, tau={self.tau}")

    # -----------------------------------------------------------------------------------------
    # Routing
    # -----------------------------------------------------------------------------------------
    def router_logits(self, x):
        """z [..., E] = x·W_rᵀ + b_r."""
        return self.router(x)

    def mask(self, x):
        """Boolean expert mask [..., E]: z > 0 when folded, else σ(z) > τ (the stage-2 rule)."""
        z = self.router_logits(x)
        if self.mode == "folded":
            return z > 0
        return torch.sigmoid(z) > self.tau

    # -----------------------------------------------------------------------------------------
    # Forward
    # -----------------------------------------------------------------------------------------
    def _hidden(self, x):
        """h [..., F] before any routing, in the model's dtype (as a dense HF MLP computes it)."""
        up = F.linear(x, self.w_up, self.b_up)
        if self.shape.gated:
            return self._act(F.linear(x, self.w_gate, self.b_gate)) * up
        return self._act(up)

    def _down(self, h):
        y = torch.matmul(h, self.w_down_t)                     # [..., F] @ [F, d]
        return y if self.b_down is None else y + self.b_down

    def forward(self, x):
        """x [..., d] -> y [..., d]."""
        if self.mode == "folded":
            m = self.router_logits(x) > 0                      # [..., E] bool
            return ops.sparse_ffn(x, m, self.w_gate, self.w_up, self.w_down_t, self.b_gate,
                                  self.b_up, self.b_down, self.shape)
        h = self._hidden(x)                                    # [..., F]
        if self.mode == "dense":
            return self._down(h)
        s = self.shape.expert_size
        z = self.router_logits(x)                              # [..., E]
        scores = torch.sigmoid(z)
        if self.mode == "soft":
            self.last_scores = scores
            gate = scores
        else:                                                  # hard: 0/1, not scaled by σ
            gate = (scores > self.tau).to(h.dtype)
            if self.hold_target is not None and self.training:
                self.margins.append(z.detach().float().flatten()
                                    - math.log(self.tau / (1 - self.tau)))
        return self._down(h * gate.repeat_interleave(s, dim=-1).to(h.dtype))

"""The router losses of LTE stage 1: L = L_task + η·L_eff + λ·L_sep (LTE.md, step 3).

Inputs are the routers' sigmoid scores G, one tensor [..., E] per layer (LTEFFN.last_scores).

- Efficiency  L_eff = mean over layers, tokens and experts of G.
  The paper's text can be read as the mean of G or the mean of G²; we use the plain mean: its
  gradient (1/N per score) pushes every score toward 0 equally, where G² would push confident
  "on" scores harder than uncertain ones. Layers with more experts do not weigh more: each
  layer's mean is taken first, then the mean over layers (all layers of one model have the same
  E, so this equals the global mean there).
- Separability  L_sep = mean of 1 / ((G − τ)² + ε), ε = 1e-3.
  The paper writes 1/(G − τ)², which is infinite at G = τ. Adding ε bounds every term by 1/ε =
  1000 and keeps the loss smooth (a clamp would also bound it but gives zero gradient in the
  clamped band). Away from τ the difference is negligible: at |G − τ| = 0.5 the term is 3.99
  instead of 4.
- λ = 0.5 and τ = 0.5 as in every experiment of the paper; η is the sparsity knob.
"""
from __future__ import annotations

import torch

TAU = 0.5
LAMBDA = 0.5
SEP_EPS = 1e-3


def efficiency_loss(scores: list[torch.Tensor]) -> torch.Tensor:
    """Mean of G over tokens and experts, then over layers."""
    return torch.stack([s.float().mean() for s in scores]).mean()


def separability_loss(scores: list[torch.Tensor], tau: float = TAU,
                      eps: float = SEP_EPS) -> torch.Tensor:
    """Mean of 1/((G − τ)² + ε) over tokens and experts, then over layers. Bounded by 1/ε."""
    return torch.stack([(1.0 / ((s.float() - tau) ** 2 + eps)).mean() for s in scores]).mean()


def router_loss(scores: list[torch.Tensor], eta: float, lam: float = LAMBDA,
                tau: float = TAU) -> tuple[torch.Tensor, dict[str, float]]:
    """η·L_eff + λ·L_sep, and the two terms' values (for logging)."""
    l_eff = efficiency_loss(scores)
    l_sep = separability_loss(scores, tau)
    return eta * l_eff + lam * l_sep, {"l_eff": float(l_eff.detach()), "l_sep": float(l_sep.detach())}


def fraction_off(scores: list[torch.Tensor], tau: float = TAU) -> torch.Tensor:
    """Fraction of experts with G <= τ (the hard mask's sparsity), over all layers and tokens."""
    return torch.stack([(s.detach() <= tau).float().mean() for s in scores]).mean()


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher ‖ student) per token, summed over the vocabulary, mean over the tokens kept
    by `mask` [...]: Σ_v p_t(v)·(log p_t(v) − log p_s(v)), computed in fp32."""
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    log_t = torch.log_softmax(teacher_logits.float(), dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)                          # [...]
    if mask is None:
        return kl.mean()
    return kl[mask].mean() if mask.any() else kl.sum() * 0.0

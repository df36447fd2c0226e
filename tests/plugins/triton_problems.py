"""Problems for the Triton kernel tests, on CPU (the interpreter) or a GPU."""
from __future__ import annotations

import torch


def rel(out, ref) -> float:
    """Relative error ‖out − ref‖ / ‖ref‖ in float64; NaN when `out` is not finite."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def problem(T, d, F, s, gated, bias, dtype, masks, seed, device="cpu", paired=False) -> dict:
    """x, mask and weights of one sparse FFN. masks: off | on | one (the middle expert) |
    per_token (each expert on with probability 0.5). paired: W_gate and W_up as the two
    halves of one [2, F, d] storage, as a folded LTEFFN holds them."""
    g = torch.Generator(device).manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    E = F // s
    per_token = torch.rand(T, E, generator=g, device=device) < 0.5
    mask = {"off": torch.zeros(T, E, dtype=torch.bool, device=device),
            "on": torch.ones(T, E, dtype=torch.bool, device=device),
            "one": torch.zeros(T, E, dtype=torch.bool, device=device).index_fill_(
                1, torch.tensor([E // 2], device=device), True),
            "per_token": per_token}[masks]
    p = dict(x=r(T, d), mask=mask,
             w_gate=r(F, d, scale=d ** -0.5) if gated else None, w_up=r(F, d, scale=d ** -0.5),
             w_down_t=r(F, d, scale=F ** -0.5),
             b_gate=r(F) if gated and bias else None, b_up=r(F) if bias else None,
             b_down=r(d) if bias else None)
    if paired:
        p["w_gate"], p["w_up"] = torch.stack([p["w_gate"], p["w_up"]])
    return p

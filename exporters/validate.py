"""`lte-convert validate model.onnx --reference CKPT`: a backend against PyTorch, same inputs.

    open + check the file ─► check the reference matches it ─► inputs (held-out text or random
    tokens) ─► run: encoders / no-cache files one step ("full"); decoders "prefill" (all tokens
    but the last k, empty cache) then "decode 1" … "decode k" (one token each, each side
    feeding back its own cache) ─► three checks per step ─► tables + JSON report ─► verdict

1. Mask-forced comparison (the main verdict). The backend returns each LTE FFN's expert mask
   (ONNX Runtime: extra outputs, backends.probe_tensors); PyTorch runs again computing exactly
   those experts (TorchBackend.run(force=...)). Both sides then compute the same function, so
   every element of every output — logits and present.* — of every token of every step is
   held to |Δ| <= atol + rtol·|ref|, with no exemption. Where something is outside, the
   message names the step and the first divergence in graph order (each layer's cache, then
   its FFN output, also returned by both sides), or says every layer agrees and the error
   lies after the last layer (final norm, LM head).
2. Flip check. Each backend mask is compared with the reference router (float64, the
   checkpoint's weights) applied to the backend's own FFN input. A correct router in the
   compute dtype can only get a decision wrong when |z| <= γ_(d+1)·(|x|·|W_r|ᵀ + |b_r|)
   (flip_bound: the worst-case rounding of a (d+1)-term dot product), so every flip must lie
   within that margin — a flip far from the threshold is a bug, not rounding — and the flip
   rate must stay under max_flip_rate.
3. Free-running comparison (each side routes on its own): top-1 agreement (per step in the
   table; all tokens together held to min_top1, since a decode step has only n tokens) and
   the mean KL(ref ‖ backend) of each step, held to max_kl. A backend that returns no masks
   (a TensorRT engine) is judged by this alone; the report's note says what that does and
   does not prove.

Defaults are per compute dtype (DEFAULT_TOLERANCES; derivation in docs/exporters.md). A
bfloat16 file runs in ONNX Runtime as a float32 upcast copy (no bf16 CPU kernels) and PyTorch
runs the same bf16 weights in float32: that compares float32 arithmetic on bf16 weights (and
bf16-rounded constants of the traced graph), not bf16 arithmetic, and the report says so. A
backend that computes in bf16 (a TensorRT engine) is compared with PyTorch in bf16.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from lte_convert.atomic import atomic_path
from lte_convert.errors import UserError
from lte_convert.exporters import metadata
from lte_convert.exporters.backends import (FFN_PREFIX, MASK_PREFIX, X_PREFIX, Backend,
                                           OrtBackend, TorchBackend)
from lte_convert.plugins import spec

# compute dtype -> tolerances (derivation: docs/exporters.md). atol/rtol hold every output of
# the mask-forced comparison; max_flip_rate the flip check; min_top1/max_kl the free-running
# one. "bfloat16-upcast": a bf16 file run in float32 (ONNX Runtime CPU).
DEFAULT_TOLERANCES = {
    "float32": {"atol": 1e-2, "rtol": 1e-3, "max_flip_rate": 1e-3, "min_top1": 0.9,
                "max_kl": 1e-3},
    "bfloat16-upcast": {"atol": 1e-1, "rtol": 2e-3, "max_flip_rate": 1e-3, "min_top1": 0.9,
                        "max_kl": 1e-2},
    "float16": {"atol": 1e-1, "rtol": 2e-3, "max_flip_rate": 1e-2, "min_top1": 0.9,
                "max_kl": 1e-2},
    "bfloat16": {"atol": 8e-1, "rtol": 1.6e-2, "max_flip_rate": 3e-2, "min_top1": 0.9,
                 "max_kl": 3e-2},
}


# ---------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------
def open_lte_onnx(path) -> tuple[onnx.ModelProto, dict]:
    """(model proto without weight data, lte metadata); UserError for anything unusable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file {path} does not exist. Export one with "
                        "`lte-convert export CKPT --out model.onnx`.")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise UserError(f"{path} is not a readable ONNX file ({type(e).__name__}: {e}); it is "
                        "another kind of file or truncated. Export it again with "
                        "`lte-convert export`.") from None
    props = {p.key: p.value for p in proto.metadata_props}
    meta = metadata.read(props)
    if not proto.graph.node or meta.get("format") != metadata.FORMAT:
        raise UserError(
            f"{path} was not produced by lte-convert (it has no '{metadata.PREFIX}format' = "
            f"'{metadata.FORMAT}' metadata{'' if proto.graph.node else ', and no graph'}), or "
            "it is truncated. Validate files written by `lte-convert export`.")
    if int(meta["format_version"]) > metadata.FORMAT_VERSION:
        raise UserError(f"{path} has lte-onnx format version {meta['format_version']}, newer "
                        f"than this lte-convert reads ({metadata.FORMAT_VERSION}). Upgrade it.")
    have = {(f.domain, f.name) for f in proto.functions}
    want = {(spec.NAMESPACE, spec.OP_UP), (spec.NAMESPACE, spec.OP_DOWN)}
    if not want <= have:
        raise UserError(f"{path} lacks the function bodies of the lte nodes (it has "
                        f"{sorted(have)}); it is truncated or was edited. Export it again.")
    _check_external_data(path, proto)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise UserError(f"{path} fails the ONNX checker: {str(e).splitlines()[0]}. It is "
                        "damaged or was edited; export it again.") from None
    return proto, meta


def _check_external_data(path: Path, proto: onnx.ModelProto) -> None:
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        f = path.parent / info["location"]
        need = int(info.get("offset", 0)) + int(info.get("length", 0))
        if not f.is_file():
            raise UserError(f"{path} keeps its weights in {f.name}, which is missing. Copy it "
                            "beside the .onnx file (they travel together).")
        if f.stat().st_size < need:
            raise UserError(f"{f} is truncated: {f.stat().st_size} bytes, but tensor {t.name} "
                            f"ends at byte {need}. Copy or export it again.")


def cache_layout(proto: onnx.ModelProto) -> list[tuple[int, int]]:
    """[(kv_heads, head_dim)] per layer from the past_key_values.{i}.key input shapes."""
    out = []
    for i in proto.graph.input:
        if i.name.startswith("past_key_values.") and i.name.endswith(".key"):
            dims = i.type.tensor_type.shape.dim
            out.append((dims[1].dim_value, dims[3].dim_value))
    return out


def check_reference(meta: dict, ckpt, trust_remote_code: bool = False) -> dict:
    """The reference checkpoint's lte.json, after checking it is the model the file holds."""
    from lte_convert.converter.checkpoint import hf_config, read_lte_info

    info = read_lte_info(ckpt)
    cfg = hf_config(ckpt, trust_remote_code).get_text_config()
    theirs = {"model_type": info["model_type"], "expert_size": str(info["expert_size"]),
              "layers": info["layers"], "num_layers": str(cfg.num_hidden_layers),
              "hidden_size": str(cfg.hidden_size), "vocab_size": str(cfg.vocab_size)}
    diff = [f"{k}: file {meta.get(k)!r}, checkpoint {v!r}" for k, v in theirs.items()
            if meta.get(k) != v]
    if diff:
        raise UserError(f"The reference checkpoint {ckpt} does not match the ONNX file ("
                        f"{'; '.join(diff)}). Pass the checkpoint the file was exported from.")
    ours, fp = meta.get("checkpoint_sha256", ""), metadata.checkpoint_fingerprint(ckpt)
    if ours and fp and ours != fp:
        raise UserError(f"The ONNX file was exported from a different checkpoint than {ckpt} "
                        f"(same architecture, but its lte.json/routers digest is {ours[:12]}…, "
                        f"this checkpoint's is {fp[:12]}…). Pass the checkpoint the file was "
                        "exported from, or export this one.")
    return info


# ---------------------------------------------------------------------------------------------
# Inputs and runs
# ---------------------------------------------------------------------------------------------
def make_inputs(vocab_size: int, n: int, seq_len: int, *, data=None, ckpt=None,
                seed: int = 0) -> tuple[np.ndarray, str]:
    """(input_ids [n, seq_len] int64, description): held-out text when `data` is given."""
    if n < 1 or seq_len < 2:
        raise UserError(f"-n must be >= 1 and --seq-len >= 2, got {n} and {seq_len}.")
    if data is None:
        gen = np.random.default_rng(seed)
        low = min(4, vocab_size - 1)      # above the usual special ids (RoBERTa's padding)
        return gen.integers(low, vocab_size, (n, seq_len), dtype=np.int64), "random tokens"
    from transformers import AutoTokenizer

    from lte_convert.converter.data import pack, read_documents, spread

    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    except (OSError, ValueError) as e:
        raise UserError(f"--data needs the checkpoint's tokenizer, but {ckpt} has none ({e}). "
                        "Validate on random tokens (no --data) instead.") from None
    blocks = pack(tokenizer, read_documents(data), seq_len)
    if len(blocks) == 0:
        raise UserError(f"The data {data} has fewer than {seq_len} tokens; give more text or a "
                        "smaller --seq-len.")
    return spread(blocks, n).numpy(), f"text from {data}"


def run_steps(backend: Backend, ids: np.ndarray, layout: list[tuple[int, int]] | None,
              decode_steps: int = 1, forced_by: list | None = None):
    """[(step name, feeds, outputs)]: one step ("full") for encoders / no-cache files; with a
    cache, "prefill" (all tokens but the last `decode_steps`, empty cache) then "decode 1" …
    "decode k" (the next token of `ids` each, the cache fed back from the same backend's
    previous step). forced_by: another backend's steps whose masks this backend must compute
    (TorchBackend.run(feeds, force=...)); None lets it route on its own."""
    def run(j, feeds):
        if forced_by is None:
            return backend.run(feeds)
        return backend.run(feeds, force=_masks(forced_by[j][2]))

    n, L = ids.shape
    if layout is None:
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        return [("full", feeds, run(0, feeds))]
    if not 1 <= decode_steps < L:
        raise UserError(f"--decode-steps must be between 1 and --seq-len - 1 = {L - 1}, got "
                        f"{decode_steps}.")
    P = L - decode_steps
    feeds = {"input_ids": ids[:, :P], "attention_mask": np.ones((n, P), np.int64),
             "position_ids": np.broadcast_to(np.arange(P), (n, P)).copy()}
    for i, (h, hd) in enumerate(layout):
        for k in ("key", "value"):
            feeds[f"past_key_values.{i}.{k}"] = np.zeros((n, h, 0, hd), np.float32)
    steps = [("prefill", feeds, run(0, feeds))]
    for j in range(1, decode_steps + 1):
        t, prev = P + j - 1, steps[-1][2]
        feeds = {"input_ids": ids[:, t:t + 1], "attention_mask": np.ones((n, t + 1), np.int64),
                 "position_ids": np.full((n, 1), t, np.int64)}
        for i in range(len(layout)):
            for k in ("key", "value"):
                feeds[f"past_key_values.{i}.{k}"] = np.asarray(prev[f"present.{i}.{k}"],
                                                               np.float32)
        steps.append((f"decode {j}", feeds, run(j, feeds)))
    return steps


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------
def _probes(out: dict, prefix: str) -> list[np.ndarray]:
    keys = sorted((k for k in out if k.startswith(prefix)), key=lambda k: int(k.split(".")[1]))
    return [np.asarray(out[k]) for k in keys]


def _masks(out: dict) -> list[np.ndarray]:
    return [m.astype(bool) for m in _probes(out, MASK_PREFIX)]


def has_masks(out: dict) -> bool:
    return bool(_masks(out)) and bool(_probes(out, X_PREFIX))


def _where(bad: np.ndarray, tokens: tuple) -> str:
    """'sequence s, position p' of the first True element of bad [..., *] over `tokens`."""
    flat = bad.reshape(int(np.prod(tokens)), -1).any(-1)
    s, p = np.unravel_index(int(flat.argmax()), tokens)
    return f"sequence {s}, token {p}"


def _outside(a, b, tol) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b) > tol["atol"] + tol["rtol"] * np.abs(b)


def compare_forced(ref: dict, test: dict, tol: dict, layers: list[int], num_layers: int) -> dict:
    """One step of the mask-forced comparison: `ref` computed the experts `test` chose, so
    every output (logits, present.*) is held to atol/rtol. Where something is outside, the
    first divergence in graph order (each layer's cache, then its FFN output; each held to
    atol scaled to its magnitude relative to the logits) says where."""
    a, b = np.asarray(test["logits"], np.float64), np.asarray(ref["logits"], np.float64)
    n, seq = b.shape[:2]
    diff = np.abs(a - b)
    bad = _outside(a, b, tol)
    outputs = {k: int(_outside(test[k], ref[k], tol).sum())
               for k in ref if k.startswith("present.")}
    ffn_t, ffn_r = _probes(test, FFN_PREFIX), _probes(ref, FFN_PREFIX)
    ffn = [int(_outside(x, y, tol).sum()) for x, y in zip(ffn_t, ffn_r)]

    def scaled(x, y):
        """Outside at atol scaled to this tensor's magnitude (hidden states and caches are
        not logit-sized): where an error starts, even if it is small there."""
        s = float(np.abs(y).max()) / max(float(np.abs(b).max()), 1e-30)
        return bool(_outside(x, y, dict(tol, atol=tol["atol"] * s)).any())

    order = []
    for i in range(num_layers):
        order += [(f"layer {i} cache (present.{i}.{k})", f"present.{i}.{k}")
                  for k in ("key", "value") if f"present.{i}.{k}" in ref]
        if i in layers:
            order.append((f"layer {i} FFN output (lte node pair {layers.index(i)})",
                          layers.index(i)))
    probes = {key: (test[key], ref[key]) if isinstance(key, str) else (ffn_t[key], ffn_r[key])
              for _, key in order if not isinstance(key, int) or key < len(ffn_t)}
    first = next((name for name, key in order if key in probes and scaled(*probes[key])), None)
    return {
        "tokens": n * seq,
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max() / max(float(np.abs(b).max()), 1e-30)),
        "logits_outside": int(bad.sum()),
        "worst": _where(diff == diff.max(), (n, seq)) if diff.max() > 0 else None,
        "first_outside": _where(bad, (n, seq)) if bad.any() else None,
        "outputs_outside": {k: v for k, v in outputs.items() if v},
        "ffn_outside_per_layer": ffn,
        "ffn_max_rel_per_layer": [float(np.abs(x.astype(np.float64) - y).max() /
                                        max(float(np.abs(y).max()), 1e-30))
                                  for x, y in zip(ffn_t, ffn_r)],
        "first_divergence": first,
    }


def unit_roundoff(dtype: str) -> float:
    """u = 2^-p of the compute dtype (p: significand bits): the worst relative rounding."""
    return {"float32": 2.0 ** -24, "bfloat16-upcast": 2.0 ** -24, "float16": 2.0 ** -11,
            "bfloat16": 2.0 ** -8}[dtype]


def flip_bound(d: int, dtype: str) -> float:
    """The largest |z| / (|x|·|W_r|ᵀ + |b_r|) a correct router in `dtype` can get wrong:
    γ_(d+1) = (d+1)u / (1 − (d+1)u), the worst-case error of a (d+1)-term dot product whose
    products and sums round to `dtype` (Higham, Accuracy and Stability, §3.1)."""
    nu = (d + 1) * unit_roundoff(dtype)
    return nu / (1 - nu)


def check_flips(test: dict, routers: list, bound: float) -> list[dict]:
    """Per LTE FFN: the backend's mask against the reference router (float64) applied to the
    backend's own FFN input. A flip is a decision where they differ; its margin is
    |z| / (|x|·|W_r|ᵀ + |b_r|), which rounding keeps below `bound` (flip_bound)."""
    out = []
    for (w, b), x, m in zip(routers, _probes(test, X_PREFIX), _masks(test)):
        x2 = np.asarray(x, np.float64).reshape(-1, w.shape[1])
        z = x2 @ w.T + b
        scale = np.abs(x2) @ np.abs(w).T + np.abs(b)
        flips = (z > 0) != m.reshape(z.shape)
        ratio = np.where(flips, np.abs(z) / np.maximum(scale, 1e-300), 0.0)
        out.append({"decisions": int(z.size), "flips": int(flips.sum()),
                    "max_margin": float(ratio.max()) if flips.any() else 0.0,
                    "far": int((ratio > bound).sum())})
    return out


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def compare_free(ref: dict, test: dict) -> dict:
    """One step of the free-running comparison (each side its own masks): top-1 agreement,
    KL(reference ‖ backend) per token, max |Δ| and the expert decisions that differ."""
    a, b = np.asarray(test["logits"], np.float64), np.asarray(ref["logits"], np.float64)
    lp, lq = _log_softmax(b), _log_softmax(a)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    m_ref, m_test = _masks(ref), _masks(test)
    same = bool(m_test) and len(m_test) == len(m_ref)
    return {
        "tokens": int(kl.size),
        "max_abs": float(np.abs(a - b).max()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "kl_mean": float(max(kl.mean(), 0.0)),
        "kl_max": float(max(kl.max(), 0.0)),
        "mask_differences_per_layer": [int((x.reshape(y.shape) != y).sum())
                                       for x, y in zip(m_test, m_ref)] if same else None,
    }


def judge(forced: dict | None, flips: dict | None, free: dict, tol: dict, bound: float,
          layers: list[int]) -> list[str]:
    """Failure messages (empty when everything holds); each names its step and layer."""
    fails = []
    for name, s in (forced or {}).items():
        parts = []
        if s["logits_outside"]:
            parts.append(f"{s['logits_outside']} logits outside atol={tol['atol']:g}/rtol="
                         f"{tol['rtol']:g} (max |Δ| {s['max_abs']:.3g} at {s['worst']})")
        if s["outputs_outside"]:
            parts.append("outside atol/rtol in " + ", ".join(
                f"{k} ({v})" for k, v in s["outputs_outside"].items()))
        if parts:
            where = (f"first divergence: {s['first_divergence']}" if s["first_divergence"] else
                     "every layer's cache and FFN output agree: the error is after the last "
                     "layer (final norm or LM head)")
            fails.append(f"{name} (mask-forced): {'; '.join(parts)}; {where}")
    if flips is not None:
        decisions = sum(l["decisions"] for s in flips.values() for l in s)
        total = sum(l["flips"] for s in flips.values() for l in s)
        for name, per in flips.items():
            for k, l in enumerate(per):
                if l["far"]:
                    fails.append(
                        f"{name}: layer {layers[k]} (lte node pair {k}) flipped {l['flips']} "
                        f"expert decisions, {l['far']} far from the threshold (router margin "
                        f"{l['max_margin']:.3g} > {bound:.3g}, the most rounding in this dtype "
                        "can move it): a wrong router or FFN input, not rounding")
        if decisions and total / decisions > tol["max_flip_rate"]:
            fails.append(f"{total} of {decisions} expert decisions flipped ({total / decisions:.2%}"
                         f" > max_flip_rate {tol['max_flip_rate']:.2%})")
    tokens = sum(s["tokens"] for s in free.values())
    top1 = sum(s["top1_agreement"] * s["tokens"] for s in free.values()) / max(tokens, 1)
    if free and top1 < tol["min_top1"]:
        fails.append(f"free-running: top-1 agreement {top1:.1%} over all {tokens} tokens < "
                     f"{tol['min_top1']:.0%} (per step: " + ", ".join(
                         f"{n} {s['top1_agreement']:.0%}" for n, s in free.items()) + ")")
    for name, s in free.items():
        if s["kl_mean"] > tol["max_kl"]:
            fails.append(f"{name} (free-running): mean KL {s['kl_mean']:.3g} > max_kl "
                         f"{tol['max_kl']:g}")
    return fails


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def default_report_path(onnx_path) -> Path:
    p = Path(onnx_path)
    return p.with_name(p.stem + ".validation.json")


def validate(onnx_path, reference, *, n: int = 4, seq_len: int = 32, data=None,
             atol: float | None = None, rtol: float | None = None,
             max_flip_rate: float | None = None, decode_steps: int = 3,
             backend: Backend | None = None, report_path=None, seed: int = 0,
             trust_remote_code: bool = False) -> dict:
    """Compare `backend` (default: ONNX Runtime on `onnx_path`) with PyTorch on `reference`.

    Returns the report (also written as JSON to `report_path`, default beside the file);
    report["passed"] says whether every check held (module docstring).
    """
    from lte_convert.converter.checkpoint import load_lte_model

    onnx_path = Path(onnx_path)
    proto, meta = open_lte_onnx(onnx_path)
    check_reference(meta, reference, trust_remote_code)
    report_path = Path(report_path) if report_path else default_report_path(onnx_path)
    if backend is None:
        backend = OrtBackend(onnx_path, proto)
    upcast = bool(getattr(backend, "upcast", False))
    compute = "bfloat16-upcast" if upcast else meta["dtype"]
    tol = dict(DEFAULT_TOLERANCES[compute])
    tol.update({k: v for k, v in (("atol", atol), ("rtol", rtol),
                                  ("max_flip_rate", max_flip_rate)) if v is not None})

    model, _ = load_lte_model(reference, dtype=spec.DTYPE_BY_LONG_NAME[meta["dtype"]],
                              trust_remote_code=trust_remote_code)
    if upcast:
        model = model.float()
    kv = meta["kv_cache"] == "1"
    ids, source = make_inputs(int(meta["vocab_size"]), n, seq_len, data=data, ckpt=reference,
                              seed=seed)
    layout = cache_layout(proto) if kv else None
    layers = [int(i) for i in meta["layers"]]
    torch_side = TorchBackend(model, kv)
    test_runs = run_steps(backend, ids, layout, decode_steps)
    free_runs = run_steps(torch_side, ids, layout, decode_steps)
    free = {name: compare_free(r, t) for (name, _, r), (_, _, t) in zip(free_runs, test_runs)}
    forced = flips = None
    bound = flip_bound(int(meta["hidden_size"]), compute)
    if has_masks(test_runs[0][2]):
        forced_runs = run_steps(torch_side, ids, layout, decode_steps, forced_by=test_runs)
        forced = {name: compare_forced(r, t, tol, layers, int(meta["num_layers"]))
                  for (name, _, r), (_, _, t) in zip(forced_runs, test_runs)}
        routers = [(m.router.weight.detach().double().cpu().numpy(),
                    m.router.bias.detach().double().cpu().numpy()) for m in torch_side.modules]
        flips = {name: check_flips(t, routers, bound) for name, _, t in test_runs}
    fails = judge(forced, flips, free, tol, bound, layers)
    note = []
    if upcast:
        note.append("bfloat16 file run as a float32 upcast copy (ONNX Runtime has no bf16 CPU "
                    "kernels); PyTorch runs the same bf16 weights in float32: this compares "
                    "float32 arithmetic on bf16 weights, not bf16 arithmetic")
    if forced is None:
        note.append(f"{backend.name} returns no expert masks, so only the free-running "
                    "comparison judges it: it proves that the output distributions agree (top-1, "
                    "KL) on these inputs, not that every logit is within atol/rtol, and a small "
                    "systematic error (e.g. a 1% scale of the LM head) can stay under the KL "
                    "threshold; validate the ONNX file with ONNX Runtime for the mask-forced check")
    report = {
        "onnx": str(onnx_path), "reference": str(reference), "backend": backend.name,
        "providers": getattr(backend, "providers", None), "dtype": meta["dtype"],
        "compute_dtype": compute, "note": "; ".join(note),
        "verdict": "mask-forced" if forced is not None else "free-running",
        "inputs": {"source": source, "n": int(ids.shape[0]), "seq_len": int(ids.shape[1]),
                   "decode_steps": decode_steps if kv else 0},
        "tolerances": dict(tol, flip_margin=bound), "layers": layers,
        "forced": forced, "flips": flips, "free": free, "passed": not fails, "failures": fails,
    }
    try:
        with atomic_path(report_path) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"Cannot write the validation report {report_path}: "
                        f"{e.strerror or e}. Pass --report with a writable path.") from None
    report["report_path"] = str(report_path)
    return report


def _table(title: str, steps: dict, rows: list) -> list[str]:
    cols = list(steps)
    w = max(len(r[0]) for r in rows) + 2
    cw = max(12, *(len(c) + 2 for c in cols))
    lines = [title, "".ljust(w) + "".join(c.rjust(cw) for c in cols)]
    for label, key, fmt in rows:
        vals = [key(steps[c]) if callable(key) else steps[c][key] for c in cols]
        lines.append(label.ljust(w) + "".join(
            ("n/a" if v is None else fmt.format(v)).rjust(cw) for v in vals))
    return lines


def format_table(report: dict) -> str:
    """The report as text (what the CLI prints): the mask-forced table (when the backend
    returns masks), the flip check, the free-running table, the verdict."""
    i = report["inputs"]
    t = report["tolerances"]
    lines = [f"{report['backend']} vs pytorch — {report['onnx']} ({report['dtype']}, compared in "
             f"{report['compute_dtype']}; {i['n']}×{i['seq_len']} {i['source']}, "
             f"{i['decode_steps']} decode steps)"]
    if report["forced"] is not None:
        lines += _table(
            f"mask-forced (PyTorch computes the experts {report['backend']} chose; every "
            f"output within atol={t['atol']:g} rtol={t['rtol']:g})", report["forced"],
            [("tokens", "tokens", "{:d}"), ("max |Δ| logits", "max_abs", "{:.3g}"),
             ("max |Δ| / max |ref|", "max_rel", "{:.3g}"),
             ("logits outside", "logits_outside", "{:d}"),
             ("caches outside", lambda s: sum(s["outputs_outside"].values()), "{:d}"),
             ("FFN outputs outside", lambda s: sum(s["ffn_outside_per_layer"]), "{:d}")])
        f = report["flips"]
        per_layer = [sum(s[k]["flips"] for s in f.values()) for k in range(len(report["layers"]))]
        total = sum(l["decisions"] for s in f.values() for l in s)
        margin = max((l["max_margin"] for s in f.values() for l in s), default=0.0)
        lines.append(f"flips (backend mask vs reference router on the backend's FFN input): "
                     f"{sum(per_layer)} of {total} decisions, per LTE layer {per_layer}; "
                     f"largest margin {margin:.3g} (bound {t['flip_margin']:.3g}, "
                     f"max_flip_rate {t['max_flip_rate']:g})")
    lines += _table(
        f"free-running (each side its own masks; top-1 over all tokens >= {t['min_top1']:.0%}, "
        f"mean KL per step <= "
        f"{t['max_kl']:g})", report["free"],
        [("max |Δ| logits", "max_abs", "{:.3g}"), ("top-1 agreement", "top1_agreement", "{:.2%}"),
         ("mean KL", "kl_mean", "{:.3g}"), ("max KL", "kl_max", "{:.3g}"),
         ("mask differences", lambda s: None if s["mask_differences_per_layer"] is None else
          sum(s["mask_differences_per_layer"]), "{:d}")])
    if report["note"]:
        lines.append(f"note: {report['note']}")
    lines.append("PASSED" if report["passed"] else "FAILED:\n  " + "\n  ".join(report["failures"]))
    lines.append(f"report: {report.get('report_path', '')}")
    return "\n".join(lines)

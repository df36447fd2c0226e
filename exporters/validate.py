"""`lte-convert validate model.onnx --reference CKPT`: a backend against PyTorch, same inputs.

    open + check the file ─► check the reference matches it ─► inputs (held-out text or random
    tokens) ─► run both: encoders one step; decoders "prefill" (all tokens but the last, empty
    cache) then "decode" (the last token, each side feeding back its own cache)
    ─► compare per step ─► table + JSON report ─► passed / failed

Metrics per step, on the logits: max |Δ|, max |Δ| / max |ref| (relative), the number of
elements outside |Δ| ≤ atol + rtol·|ref|, the lowest per-token cosine similarity, and top-1
agreement. Masks: per LTE layer, the number of expert decisions (token × expert) that differ.

Pass rule: the flip rate is at most `max_flip_rate`, and every logit of every token not
affected by a flip is within atol/rtol. A flipped decision is a router logit within rounding
of 0: that token legitimately computes another set of experts, and so do, through attention,
the later tokens of its sequence (every token of it, for encoders). Those tokens are judged
by the flip rate, not by atol (the table still shows the overall max |Δ|). Measured on an
untrained, median-routed SmolLM2 (results/exporters.md), one fp32 flip in layer 16 moved
later logits of its sequence by up to 17. A backend that cannot report masks (a TensorRT
engine) is held to atol/rtol on every token.

Defaults are per dtype (DEFAULT_TOLERANCES, measured: results/exporters.md). A bfloat16 file
runs in ONNX Runtime as a float32 upcast copy (no bf16 CPU kernels), so the PyTorch side runs
the same bf16 weights in float32 and the float32 tolerances apply.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError

from lte_convert.atomic import atomic_path
from lte_convert.errors import UserError
from lte_convert.exporters import metadata, wrappers
from lte_convert.exporters.backends import MASK_PREFIX, Backend, OrtBackend, TorchBackend
from lte_convert.plugins import spec

# dtype the comparison runs in -> atol, rtol, max flip rate
DEFAULT_TOLERANCES = {
    "float32": {"atol": 1e-2, "rtol": 1e-3, "max_flip_rate": 1e-3},
    "float16": {"atol": 5e-2, "rtol": 2e-2, "max_flip_rate": 1e-2},
    "bfloat16": {"atol": 2.5e-1, "rtol": 5e-2, "max_flip_rate": 3e-2},
}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
                        f"(same architecture, but its digest is {ours[:12]}…, "
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


def run_steps(backend: Backend, ids: np.ndarray, layout: list[tuple[int, int]] | None):
    """[(step name, feeds, outputs)]: one step for encoders / no-cache files, two with cache."""
    n, L = ids.shape
    if layout is None:
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        return [("full", feeds, backend.run(feeds))]
    prefill = {"input_ids": ids[:, :-1], "attention_mask": np.ones((n, L - 1), np.int64),
               "position_ids": np.broadcast_to(np.arange(L - 1), (n, L - 1)).copy()}
    for i, (h, hd) in enumerate(layout):
        for k in ("key", "value"):
            prefill[f"past_key_values.{i}.{k}"] = np.zeros((n, h, 0, hd), np.float32)
    out1 = backend.run(prefill)
    decode = {"input_ids": ids[:, -1:], "attention_mask": np.ones((n, L), np.int64),
              "position_ids": np.full((n, 1), L - 1, np.int64)}
    for i in range(len(layout)):
        for k in ("key", "value"):
            decode[f"past_key_values.{i}.{k}"] = np.asarray(out1[f"present.{i}.{k}"], np.float32)
    return [("prefill", prefill, out1), ("decode", decode, backend.run(decode))]


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------
def _masks(out: dict, tokens: tuple) -> list[np.ndarray]:
    """The masks as [*tokens, E] (some families, e.g. OPT, run the FFN on [batch·seq, d])."""
    keys = sorted((k for k in out if k.startswith(MASK_PREFIX)), key=lambda k: int(k.split(".")[1]))
    return [np.asarray(out[k], bool).reshape(*tokens, -1) for k in keys]


def compare_step(ref: dict, test: dict, tol: dict, first_flip: np.ndarray | None = None,
                 offset: int = 0, causal: bool = True) -> tuple[dict, np.ndarray]:
    """(metrics of one step, updated first_flip) — see the module docstring.

    first_flip [n]: per sequence, the position of its first flipped decision so far (inf:
    none). A token is exempt from atol/rtol when its sequence flipped at or before its
    position (causal models: later tokens attend to the flipped one), or anywhere (encoders).
    `offset` is the position of this step's first token.
    """
    a = np.asarray(test["logits"], np.float32)
    b = np.asarray(ref["logits"], np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    n, seq = a.shape[:2]
    first_flip = np.full(n, np.inf) if first_flip is None else first_flip.copy()
    diff = np.abs(a - b)
    bad = diff > tol["atol"] + tol["rtol"] * np.abs(b)
    m_ref, m_test = _masks(ref, (n, seq)), _masks(test, (n, seq))
    have_masks = bool(m_test) and len(m_test) == len(m_ref)
    flips = [int((x != y).sum()) for x, y in zip(m_ref, m_test)] if have_masks else None
    flipped_tok = np.zeros((n, seq), bool)
    if have_masks:
        for x, y in zip(m_ref, m_test):
            flipped_tok |= (x != y).any(-1)
    pos = offset + np.arange(seq)
    here = np.where(flipped_tok.any(1), offset + flipped_tok.argmax(1), np.inf)
    first_flip = np.minimum(first_flip, here)
    if causal:
        exempt = pos[None, :] >= first_flip[:, None]
    else:
        exempt = np.broadcast_to(np.isfinite(first_flip)[:, None], (n, seq))
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    cos = (a2 * b2).sum(-1) / np.maximum(np.linalg.norm(a2, axis=-1) * np.linalg.norm(b2, axis=-1),
                                         1e-30)
    return {
        "tokens": n * seq,
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max() / max(float(np.abs(b).max()), 1e-30)),
        "out_of_tolerance": int(bad.sum()),
        "out_of_tolerance_checked": int(bad[~exempt].sum()),
        "max_abs_checked": float(diff[~exempt].max()) if (~exempt).any() else 0.0,
        "min_cosine": float(cos.min()),
        "top1_agreement": float((a2.argmax(-1) == b2.argmax(-1)).mean()),
        "mask_decisions": int(sum(x.size for x in m_ref)) if have_masks else None,
        "mask_flips_per_layer": flips,
        "tokens_with_flips": int(flipped_tok.sum()) if have_masks else None,
        "tokens_exempt": int(exempt.sum()),
    }, first_flip


def judge(steps: dict, tol: dict) -> list[str]:
    """Failure messages (empty when the comparison passes)."""
    fails = []
    decisions = sum(s["mask_decisions"] or 0 for s in steps.values())
    flips = sum(sum(s["mask_flips_per_layer"] or []) for s in steps.values())
    rate = flips / decisions if decisions else 0.0
    if rate > tol["max_flip_rate"]:
        fails.append(f"{flips} of {decisions} expert decisions flipped ({rate:.2%} > "
                     f"max_flip_rate {tol['max_flip_rate']:.2%})")
    for name, s in steps.items():
        if s["out_of_tolerance_checked"]:
            fails.append(f"{name}: {s['out_of_tolerance_checked']} logits outside atol="
                         f"{tol['atol']:g}/rtol={tol['rtol']:g} (max |Δ| "
                         f"{s['max_abs_checked']:.3g} on tokens not affected by a flip)")
    return fails


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def default_report_path(onnx_path) -> Path:
    p = Path(onnx_path)
    return p.with_name(p.stem + ".validation.json")


def validate(onnx_path, reference, *, n: int = 4, seq_len: int = 32, data=None,
             atol: float | None = None, rtol: float | None = None,
             max_flip_rate: float | None = None, backend: Backend | None = None,
             report_path=None, seed: int = 0, trust_remote_code: bool = False) -> dict:
    """Compare `backend` (default: ONNX Runtime on `onnx_path`) with PyTorch on `reference`.

    Returns the report (also written as JSON to `report_path`, default beside the file);
    report["passed"] says whether every tolerance held.
    """
    from lte_convert.converter.checkpoint import load_lte_model

    onnx_path = Path(onnx_path)
    proto, meta = open_lte_onnx(onnx_path)
    check_reference(meta, reference, trust_remote_code)
    report_path = Path(report_path) if report_path else default_report_path(onnx_path)
    if backend is None:
        backend = OrtBackend(onnx_path, proto)
    upcast = bool(getattr(backend, "upcast", False))
    compute = "float32" if upcast else meta["dtype"]
    tol = dict(DEFAULT_TOLERANCES[compute])
    tol.update({k: v for k, v in (("atol", atol), ("rtol", rtol),
                                  ("max_flip_rate", max_flip_rate)) if v is not None})

    model, _ = load_lte_model(reference, dtype=TORCH_DTYPES[meta["dtype"]],
                              trust_remote_code=trust_remote_code)
    if upcast:
        model = model.float()
    kv = meta["kv_cache"] == "1"
    ids, source = make_inputs(int(meta["vocab_size"]), n, seq_len, data=data, ckpt=reference,
                              seed=seed)
    layout = cache_layout(proto) if kv else None
    ref_runs = run_steps(TorchBackend(model, kv), ids, layout)
    test_runs = run_steps(backend, ids, layout)
    steps, first_flip, offset = {}, None, 0
    causal = kv or wrappers.is_decoder(model)
    for (name, feeds, r), (_, _, t) in zip(ref_runs, test_runs):
        steps[name], first_flip = compare_step(r, t, tol, first_flip, offset, causal)
        offset += feeds["input_ids"].shape[1]
    fails = judge(steps, tol)
    report = {
        "onnx": str(onnx_path), "reference": str(reference), "backend": backend.name,
        "providers": getattr(backend, "providers", None), "dtype": meta["dtype"],
        "compute_dtype": compute,
        "note": ("bfloat16 file run as a float32 upcast copy (ONNX Runtime has no bf16 CPU "
                 "kernels); PyTorch runs the same bf16 weights in float32") if upcast else "",
        "inputs": {"source": source, "n": int(ids.shape[0]), "seq_len": int(ids.shape[1])},
        "tolerances": tol, "steps": steps, "passed": not fails, "failures": fails,
    }
    try:
        with atomic_path(report_path) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"Cannot write the validation report {report_path}: "
                        f"{e.strerror or e}. Pass --report with a writable path.") from None
    report["report_path"] = str(report_path)
    return report


def format_table(report: dict) -> str:
    """A plain-text table of the report (what the CLI prints)."""
    steps = report["steps"]
    cols = list(steps)
    rows = [("tokens", "tokens", "{:d}"), ("max |Δ| logits", "max_abs", "{:.3g}"),
            ("max |Δ| / max |ref|", "max_rel", "{:.3g}"),
            ("outside atol/rtol", "out_of_tolerance", "{:d}"),
            ("  on tokens not after a flip", "out_of_tolerance_checked", "{:d}"),
            ("max |Δ| there", "max_abs_checked", "{:.3g}"),
            ("min cosine", "min_cosine", "{:.6f}"), ("top-1 agreement", "top1_agreement", "{:.2%}"),
            ("tokens with mask flips", "tokens_with_flips", "{:d}"),
            ("tokens after a flip", "tokens_exempt", "{:d}")]
    w = max(len(r[0]) for r in rows) + 2
    lines = [f"{report['backend']} vs pytorch — {report['onnx']} ({report['dtype']}, compared in "
             f"{report['compute_dtype']}; {report['inputs']['n']}×{report['inputs']['seq_len']} "
             f"{report['inputs']['source']})",
             "".ljust(w) + "".join(c.rjust(14) for c in cols)]
    for label, key, fmt in rows:
        vals = [steps[c][key] for c in cols]
        lines.append(label.ljust(w) + "".join(
            ("n/a" if v is None else fmt.format(v)).rjust(14) for v in vals))
    flips = [s["mask_flips_per_layer"] for s in steps.values()]
    if all(f is not None for f in flips):
        per_layer = [sum(x) for x in zip(*flips)]
        total = sum(s["mask_decisions"] for s in steps.values())
        lines.append(f"mask flips per LTE layer: {per_layer} (of {total} decisions)")
    t = report["tolerances"]
    lines.append(f"tolerances: atol={t['atol']:g} rtol={t['rtol']:g} "
                 f"max_flip_rate={t['max_flip_rate']:g}")
    if report["note"]:
        lines.append(f"note: {report['note']}")
    lines.append("PASSED" if report["passed"] else "FAILED: " + "; ".join(report["failures"]))
    lines.append(f"report: {report.get('report_path', '')}")
    return "\n".join(lines)

"""End-to-end decode speed: tokens/s of `generate()` for the dense model and its LTE version.

    python -m lte_convert.bench_decode                     # SmolLM2-135M sample, 0.5 sparsity
    python -m lte_convert.bench_decode --model LTE_DIR     # a saved LTE checkpoint (folded)
    python -m lte_convert.bench_decode --device cuda --dtype bfloat16 [--static-cache]

Without --model, the embedded SmolLM2-135M (lte_convert/default.py) is converted here
(converter.surgery.convert_model: k-means experts of 32, routers at their initialisation) and
folded with per-layer offsets calibrated on the decode steps of another text so that each
layer keeps 1 − sparsity of its experts on average. The routers are untrained, so the text it
writes is not what a trained LTE model writes; the speed of the sparse FFN path is what is
measured, with the sparsity each layer actually had during decoding reported beside it.

With --model, the LTE checkpoint is loaded with converter.checkpoint.load_lte_model and the
dense baseline is the same folder loaded by plain `from_pretrained` (the permuted dense
model: the same function, with no LTE FFNs).

Both models decode the same prompt greedily for --new-tokens tokens (min = max, so both
produce exactly that many); dense and LTE runs alternate, and the median over --reps is
reported. --record-masks FILE saves the masks each layer used (safetensors, `layer.<i>`
[tokens, E]) for `plugins/bench.py --masks`.

On CPU the op's plan numbers for the model's FFN shape are measured (or read from the cache)
before anything is timed (`--calibrate`: measured again now), and one extra, untimed LTE run
under torch.profiler gives the op's share of the step time: the CPU time inside
lte::sparse_ffn over the run's elapsed time.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from lte_convert.errors import UserError, exit_with

PROMPT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to "
          "suffer the slings and arrows of outrageous fortune, or to take arms against a sea "
          "of troubles and by opposing end them.")
CALIBRATION = ("Now is the winter of our discontent made glorious summer by this sun of York; "
               "and all the clouds that lour'd upon our house in the deep bosom of the ocean "
               "buried. Now are our brows bound with victorious wreaths; our bruised arms hung "
               "up for monuments; our stern alarums changed to merry meetings, our dreadful "
               "marches to delightful measures.")


@torch.no_grad()
def calibrate_offsets(model, tokenizer, sparsity: float, text: str = CALIBRATION,
                      new_tokens: int = 32):
    """Per-layer offsets such that z − logit(τ) + offset > 0 for a fraction 1 − sparsity of
    the (token, expert) pairs seen while decoding `text` greedily (model in "dense" mode):
    offset_l = −quantile(z − logit(τ), sparsity). Decode steps, not the prompt, are what
    the benchmark times, and their router logits differ from the prompt's."""
    from lte_convert.converter.surgery import lte_modules
    modules = lte_modules(model)
    inputs = {i: [] for i in range(len(modules))}

    def hook(i):
        def fn(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            if x.shape[0] == 1:                                  # a decode step
                inputs[i].append(x)
        return fn

    hooks = [m.register_forward_pre_hook(hook(i)) for i, (_, m) in enumerate(modules)]
    try:
        model.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False)
    finally:
        for h in hooks:
            h.remove()
    offsets = []
    for i, (_, m) in enumerate(modules):
        z = m.router_logits(torch.cat(inputs[i])).float() - math.log(m.tau / (1 - m.tau))
        offsets.append(-float(torch.quantile(z.flatten(), sparsity)))
    return offsets


class MaskRecorder:
    """Records each folded LTE layer's mask during generation (forward pre-hooks)."""

    def __init__(self, model):
        from lte_convert.converter.surgery import lte_modules
        self.masks = {}
        self.hooks = [m.register_forward_pre_hook(self._hook(i)) for i, m in lte_modules(model)]

    def _hook(self, i):
        def hook(module, args):
            m = (module.router_logits(args[0]) > 0).reshape(-1, module.shape.n_experts)
            self.masks.setdefault(i, []).append(m)
        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()

    def stacked(self) -> dict[str, torch.Tensor]:
        return {f"layer.{i}": torch.cat(v) for i, v in sorted(self.masks.items())}

    def decode_sparsity(self) -> list[float]:
        """Per layer, fraction of experts off over the single-token (decode) steps."""
        out = []
        for _, v in sorted(self.masks.items()):
            steps = [m for m in v if m.shape[0] == 1] or v
            out.append(1.0 - float(torch.cat(steps).float().mean()))
        return out


def load_models(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lte_convert.converter.checkpoint import fold, hf_config, load_lte_model
    from lte_convert.converter.surgery import convert_model
    dtype = getattr(torch, args.dtype)
    if args.model:
        lte, info = load_lte_model(args.model, dtype=dtype)
        dense = AutoModelForCausalLM.from_pretrained(args.model, config=hf_config(args.model),
                                                     dtype=dtype)
        tok = AutoTokenizer.from_pretrained(args.model)
        return dense.eval(), lte.eval(), tok, {"source": str(args.model), "lte_info": info}
    from lte_convert.default import default_model_dir
    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    lte = convert_model(AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval())
    offsets = calibrate_offsets(lte, tok, args.sparsity)
    fold(lte, offsets)
    return dense, lte, tok, {"source": f"{path} (converted, untrained routers, calibrated "
                                       f"to sparsity {args.sparsity})"}


@torch.no_grad()
def time_generate(model, ids, new_tokens, clock, **generate_kwargs):
    t = clock()
    out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, **generate_kwargs)
    if out.is_cuda:
        torch.cuda.synchronize()
    dt = clock() - t
    assert out.shape[1] - ids["input_ids"].shape[1] == new_tokens
    return dt


def plan_numbers(model, dtype, fresh):
    """Measure (fresh) or load the CPU op's plan numbers for each LTE FFN shape of the model;
    {"dxF": numbers} for the JSON."""
    from lte_convert.converter.surgery import lte_modules
    from lte_convert.plugins import bench
    shapes = sorted({(m.shape.d, m.shape.d_ff) for _, m in lte_modules(model)})
    return {f"{d}x{F_}": bench.plan_numbers(d, F_, dtype, fresh) for d, F_ in shapes}


@torch.no_grad()
def op_share(model, ids, new_tokens, **generate_kwargs):
    """(ms of lte::sparse_ffn per generated token, its fraction of the elapsed time) over one
    profiled generate() (CPU)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, **generate_kwargs)
        elapsed = time.perf_counter() - t
    op_s = sum(e.cpu_time_total for e in prof.key_averages() if e.key == "lte::sparse_ffn") / 1e6
    return op_s / new_tokens * 1e3, op_s / elapsed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="LTE checkpoint folder (default: convert the "
                   "embedded SmolLM2-135M and fold it to --sparsity)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu|cuda (eager generate(); on CUDA the "
                   "op's two Triton launches per layer are timed with their Python overhead)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU time with 1 thread (robust on a shared machine)")
    p.add_argument("--static-cache", action="store_true", help="generate() with a static KV "
                   "cache; on CUDA transformers then compiles the forward into CUDA graphs "
                   "(the warm-up call compiles, the timed calls replay)")
    p.add_argument("--record-masks", default=None, help="save the LTE masks here (safetensors)")
    p.add_argument("--calibrate", action="store_true", help="CPU: measure the op's plan "
                   "numbers now (else from the cache, or measured at first use)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from lte_convert.plugins.bench import set_up_clock
    clock = set_up_clock(args, torch.device(args.device).type)

    import lte_convert.plugins  # noqa: F401
    dense, lte, tok, meta = load_models(args)
    dense, lte = dense.to(args.device), lte.to(args.device)
    ids = tok(PROMPT, return_tensors="pt").to(args.device)
    kw = {"cache_implementation": "static"} if args.static_cache else {}
    cpu = torch.device(args.device).type == "cpu"
    if cpu:
        from lte_convert.plugins import cpu_tuning
        meta["host"] = cpu_tuning.host()
        meta["plan_numbers"] = plan_numbers(lte, getattr(torch, args.dtype), args.calibrate)
    recorder = MaskRecorder(lte)
    time_generate(lte, ids, args.new_tokens, clock)            # the masks, eager
    recorder.remove()
    time_generate(lte, ids, args.new_tokens, clock, **kw)      # warm-up (compiles if static)
    time_generate(dense, ids, args.new_tokens, clock, **kw)
    times = {"dense": [], "lte": []}
    for _ in range(args.reps):
        times["dense"].append(time_generate(dense, ids, args.new_tokens, clock, **kw))
        times["lte"].append(time_generate(lte, ids, args.new_tokens, clock, **kw))
    tps = {k: args.new_tokens / statistics.median(v) for k, v in times.items()}
    if cpu:
        meta["op_ms_per_token"], meta["op_share_of_step"] = op_share(lte, ids, args.new_tokens)
    sparsity = recorder.decode_sparsity()
    row = {"tokens_per_s_dense": tps["dense"], "tokens_per_s_lte": tps["lte"],
           "speedup": tps["lte"] / tps["dense"], "new_tokens": args.new_tokens,
           "prompt_tokens": int(ids["input_ids"].shape[1]), "reps": args.reps,
           "clock": args.clock, "threads": torch.get_num_threads(), "dtype": args.dtype,
           "device": args.device, "static_cache": args.static_cache,
           "target_sparsity": args.sparsity,
           "decode_sparsity_mean": statistics.mean(sparsity),
           "decode_sparsity_per_layer": sparsity, "torch": torch.__version__, **meta}
    print(f"dense {tps['dense']:.1f} tok/s, LTE {tps['lte']:.1f} tok/s, "
          f"{row['speedup']:.2f}x (decode sparsity {row['decode_sparsity_mean']:.2f}, "
          f"{args.new_tokens} new tokens, median of {args.reps}, {args.clock} clock, "
          f"{torch.get_num_threads()} threads)")
    if cpu:
        from lte_convert.plugins.bench import host_line
        print(f"lte.SparseFFN: {row['op_ms_per_token']:.1f} ms per token, "
              f"{row['op_share_of_step']:.0%} of the LTE step (profiled run); host: "
              f"{host_line(row['host'])}")
    if args.record_masks:
        from safetensors.torch import save_file

        from lte_convert.atomic import atomic_path
        with atomic_path(args.record_masks) as tmp:
            save_file({k: v.contiguous() for k, v in recorder.stacked().items()}, str(tmp))
    if args.json:
        from lte_convert.atomic import atomic_path
        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps(row, indent=1, default=str))
    return row


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        exit_with(e)

"""LTE training: convert, the start, stage 1 (optional, soft), stage 2 (hard), calibrate, fold,
save.

    train_lte(model_dir, data, out, sparsity) -> out        (the library entry point)

Both stages run on the Hugging Face Trainer, so checkpoints, --resume, gradient accumulation,
bf16/fp16 on GPU, progress bars and data-parallel runs (torchrun / accelerate launch) come from
it. What this module adds (LTE.md steps 3-5; the recipe and its measurements:
docs/converter-training.md and results/quality.md):

The start (converter/routers.py).  Experts grouped by co-activation, every router fitted to
    its layer's most active experts, per-layer targets allocated by measured sensitivity
    (mean = S), each layer calibrated to its target. Saved with an atomic marker, so
    --resume does not repeat it.
Stage 1 (soft).  Every LTEFFN scales expert e by G_e = σ(z_e). Loss L_task + η·L_eff + λ·L_sep
    (converter/losses.py). All parameters train (routers at `router_lr`, the rest at `lr`), or
    only the routers with `routers_only=True`. η is not a user knob here: users ask for a
    sparsity, so η follows a multiplicative controller, η ← η·exp(k·(S − s_step)) clipped to
    [1e-2, 1e2] after each optimizer step, where s_step is the fraction of scores ≤ τ in the
    step's batch (all-reduced across processes and averaged over accumulated micro-batches,
    so every rank keeps the same η and accumulation changes nothing).
Calibration.  Per layer to the allocated targets (calibrate.calibrate_layers), or one global
    shift (`calibration="global"`), on held-out blocks, after stage 1 and after stage 2.
Stage 2 (hard).  Mask 1{σ(z) > τ} (selected experts unscaled); the task loss, optionally mixed
    with distillation from the frozen original (`distill`). With `hold_sparsity` every
    layer's router bias is moved after each optimizer step to the quantile of that step's
    margins (all micro-batches and processes), so no layer drifts from its target.
Fold.  −logit(τ) + offset goes into the router bias (converter.checkpoint.fold); the folded
    model is saved as an LTE checkpoint with per-layer sparsity in lte.json.

Loss details. The task loss is the model's own (causal LM for decoders, masked LM for encoders
with an MLM head). Transformers normalises it by the number of label tokens in the whole
accumulated (and all-process) batch and then skips its own division by the accumulation steps;
the router loss is a per-micro-batch mean, so it is divided by
`current_gradient_accumulation_steps` in that case, and DDP's gradient averaging turns the
per-rank means into the global mean. Routers are registered submodules (LTEFFN.router), and
`ddp_find_unused_parameters=False`.

Failure handling. A non-finite loss (checked after each forward) or non-finite gradient
(checked before each optimizer step; with fp16 the Trainer's grad scaler handles overflow
first) stops the run with a UserError before the weights change, so the last saved
checkpoint is good. Ctrl-C or a killed process leaves the checkpoints in
`<out>.lte-work/`; `resume=True` continues from the newest complete one (a checkpoint is
complete when its `lte_state.json`, written after everything else, exists).
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from lte_convert.atomic import atomic_path
from lte_convert.checks import check_output_dir, check_sparsity
from lte_convert.converter.calibrate import calibrate_layers, target_shift
from lte_convert.converter.data import BlockDataset, DataSource, make_blocks, read_documents, spread
from lte_convert.errors import UserError
from lte_convert.loading import check_model_dir, load_lm
from lte_convert.converter.losses import (LAMBDA, TAU, distillation_loss, fraction_off,
                                          router_loss)

WORK_SUFFIX = ".lte-work"
STATE_FILE = "lte_state.json"


@dataclass
class TrainConfig:
    """Everything that shapes a run. Defaults: the recipe of docs/converter-training.md,
    chosen by the ablation in results/quality.md (SmolLM2-135M + Shakespeare, 2 CPU cores)."""

    expert_size: int = 32
    block_size: int = 128
    batch_size: int = 4                 # per process
    grad_accum: int = 1
    grouping: str = "coactivation"      # coactivation | weights (k-means on W_gate rows)
    router_init: str = "fit"            # fit (to expert energies) | mean (mean gate row)
    allocation: str = "sensitivity"     # sensitivity | uniform
    hold_sparsity: bool = True          # stage 2 keeps every layer at its target each step
    calibration: str = "layers"         # layers (per-layer targets) | global (one shift)
    distill: float = 0.0                # weight of KL(original ‖ model) in the task loss
    fit_tokens: int = 8192              # calibration tokens for grouping and the router fit
    fit_steps: int = 400
    sensitivity_blocks: int = 4
    stage1_steps: int = 0               # the paper's soft stage (results/quality.md ablation)
    stage2_steps: int = 50
    lr: float = 3e-4                    # model weights (results/quality.md: the lr ablation)
    router_lr: float = 1e-3             # routers in stage 1
    eta: float = 1.0                    # initial η; the controller adapts it (see module doc)
    eta_gain: float = 0.1
    lam: float = LAMBDA
    tau: float = TAU
    routers_only: bool = False
    train_params: str = "body"          # stage 2 trains: all (but routers) | body (also not the
                                        # token embeddings / tied LM head) | ffn (FFN weights only)
    warmup_ratio: float = 0.06
    heldout_fraction: float = 0.05
    calib_blocks: int = 32              # held-out blocks (evenly spread) to calibrate on
    save_steps: int = 50
    precision: str = "auto"             # auto | fp32 | bf16 | fp16 (bf16/fp16 need a GPU)
    seed: int = 0
    text_field: str = "text"
    keep_checkpoints: bool = False
    log_steps: int = 5


CHOICES = {"grouping": ("coactivation", "weights"), "router_init": ("fit", "mean"),
           "allocation": ("sensitivity", "uniform"), "calibration": ("layers", "global"),
           "train_params": ("all", "body", "ffn")}


def check_config(cfg: TrainConfig):
    """Refuse settings that cannot train, with the reason (before anything loads)."""
    for field, allowed in CHOICES.items():
        if getattr(cfg, field) not in allowed:
            raise UserError(f"{field} must be one of {', '.join(allowed)}, got "
                            f"{getattr(cfg, field)!r}.")
    if not (cfg.lr > 0 and cfg.router_lr > 0):
        raise UserError(f"Learning rates must be positive, got --lr {cfg.lr} and --router-lr "
                        f"{cfg.router_lr}.")
    if not 0.0 <= cfg.distill <= 1.0:
        raise UserError(f"--distill is the weight of the distillation term in the task loss "
                        f"and must be between 0 and 1, got {cfg.distill}.")
    if cfg.stage1_steps < 0 or cfg.stage2_steps < 0:
        raise UserError("Step counts cannot be negative, got --stage1-steps "
                        f"{cfg.stage1_steps}, --stage2-steps {cfg.stage2_steps}.")


def progress(message: str):
    """One line on stderr for each long step (the Trainer shows its own progress bar)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[lte] {message}", file=sys.stderr, flush=True)


class BlockCollator:
    """Stack blocks; causal LM: labels = input_ids (the model shifts them); masked LM: BERT
    masking (15%, 80/10/10) through transformers' collator."""

    def __init__(self, tokenizer, task: str):
        self.task = task
        if task == "mlm":
            from transformers import DataCollatorForLanguageModeling
            self.mlm = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.15)

    def __call__(self, examples):
        ids = torch.stack([e["input_ids"] for e in examples])
        if self.task == "mlm":
            return self.mlm([{"input_ids": i} for i in ids])
        return {"input_ids": ids, "labels": ids.clone()}


# ---------------------------------------------------------------------------------------
# the Trainer with the router losses
# ---------------------------------------------------------------------------------------
def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = t.clone()
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t


class LTETrainer(Trainer):
    """Trainer whose loss adds η·L_eff + λ·L_sep in stage 1 and stops on a non-finite loss."""

    def __init__(self, *args, lte, cfg: TrainConfig, target: float, stage: int, work: Path,
                 eta: float, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lte, self.cfg, self.target, self.stage, self.work = lte, cfg, target, stage, work
        self.teacher = teacher
        self.eta = eta
        self.router_stats = {}
        self._step_off = []            # batch sparsities of this optimizer step's micro-batches

    def update_eta(self):
        """After each optimizer step: η ← η·exp(k·(S − mean batch sparsity of the step))."""
        if self._step_off:
            off = sum(self._step_off) / len(self._step_off)
            eta = self.eta * math.exp(self.cfg.eta_gain * (self.target - off))
            self.eta = min(max(eta, 1e-2), 1e2)
            self._step_off = []

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            routers = [p for m in self.lte for p in m.router.parameters() if p.requires_grad]
            ids = {id(p) for p in routers}
            rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]
            groups = [{"params": g, "lr": lr, "weight_decay": 0.0}
                      for g, lr in ((rest, self.args.learning_rate), (routers, self.cfg.router_lr))
                      if g]
            # fused: one kernel per step over all tensors (CPU and CUDA), 4x faster than the
            # per-tensor loop on CPU: 0.09 vs 0.37 s per step for SmolLM2-135M on 2 cores
            fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
            self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8,
                                               fused=fused)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=True,
                                   num_items_in_batch=num_items_in_batch)
        loss, outputs = out
        scaled = (self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None
                  else (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                  or self.compute_loss_func is not None)
        if self.teacher is not None and self.cfg.distill > 0 and self.task == "clm":
            with torch.no_grad():
                t_logits = self.teacher(input_ids=inputs["input_ids"]).logits
            kd = distillation_loss(outputs.logits, t_logits)
            if scaled:          # the LM loss is already divided by the accumulation steps
                kd = kd / self.current_gradient_accumulation_steps
            loss = (1 - self.cfg.distill) * loss + self.cfg.distill * kd
        finite = torch.isfinite(loss.detach()).float()
        if self.stage == 1:
            scores = [m.last_scores for m in self.lte]
            aux, parts = router_loss(scores, self.eta, self.cfg.lam, self.cfg.tau)
            if scaled:
                aux = aux / self.current_gradient_accumulation_steps
            loss = loss + aux
            stats = _all_reduce_mean(torch.stack([
                fraction_off(scores, self.cfg.tau), torch.isfinite(loss.detach()).float()]))
            off, finite = float(stats[0]), stats[1]
            if model.training:
                self._step_off.append(off)
            self.router_stats = {"sparsity": off, "eta": self.eta, **parts}
            for m in self.lte:
                m.last_scores = None
        else:
            finite = _all_reduce_mean(finite[None])[0]
        if float(finite) < 1.0:
            self._stop(f"The training loss became {float(loss.detach()):.4g}")
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def hold_sparsity(self):
        """After each stage-2 optimizer step: shift every held layer's router bias so that its
        target fraction of this step's margins (all micro-batches, all processes) is off."""
        held = [m for m in self.lte if m.hold_target is not None]
        if not held or not held[0].margins:
            return
        margins = [torch.cat(m.margins).cpu() for m in held]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            every = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, margins)
            margins = [torch.cat(parts) for parts in zip(*every)]
        for m, margin in zip(held, margins):
            m.router.bias += target_shift(margin, m.hold_target)
            m.margins = []

    def check_gradients(self):
        """Before each optimizer step: a finite loss can still overflow in backward."""
        if self.args.fp16:             # the grad scaler skips overflowing steps itself
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.stack([g.float().abs().max() for g in grads])).all():
            self._stop("The gradients became non-finite")

    def _stop(self, what: str):
        raise UserError(
            f"{what} (not finite) in stage {self.stage} at step {self.state.global_step + 1}. "
            "The run stopped before this step changed any weights; the last good checkpoint "
            f"is kept in {self.work}. Lower --lr (or --router-lr), use --precision fp32, or "
            "check the data, then rerun with --resume.")

    def log(self, logs, *args, **kwargs):
        if self.router_stats and "loss" in logs:
            logs = {**logs, **{k: round(v, 4) for k, v in self.router_stats.items()}}
        super().log(logs, *args, **kwargs)


class _EtaCallback(TrainerCallback):
    """Update η once per optimizer step (so gradient accumulation and data parallelism see
    the same η as one big batch), and write it into each checkpoint after the Trainer's own
    files: the file also marks the checkpoint complete."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.check_gradients()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.update_eta()
        self.trainer.hold_sparsity()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            _write_marker(ckpt / STATE_FILE, {"eta": self.trainer.eta})


class _Interrupt(TrainerCallback):
    """Ctrl-C that is not lost. Python raises KeyboardInterrupt wherever the main thread is
    when SIGINT arrives; inside a finalizer or code that catches it, it would vanish and the
    run would go on to the end. While a stage trains, SIGINT is also recorded here, and the
    end of the next step raises it again."""

    def __init__(self):
        self.seen = False

    def handler(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def on_step_end(self, args, state, control, **kwargs):
        if self.seen:
            raise KeyboardInterrupt


def _train(trainer, resume):
    """trainer.train(), with Ctrl-C recorded by an _Interrupt where SIGINT has Python's
    default handler in the main thread (an ignored SIGINT, e.g. a background job's, or an
    application's own handler is left as it is)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return trainer.train(resume_from_checkpoint=resume)
    interrupt = _Interrupt()
    trainer.add_callback(interrupt)
    previous = signal.signal(signal.SIGINT, interrupt.handler)
    try:
        return trainer.train(resume_from_checkpoint=resume)
    finally:
        signal.signal(signal.SIGINT, previous)


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete Trainer checkpoint in `folder`, if any."""
    done = [p for p in folder.glob("checkpoint-*") if (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


# ---------------------------------------------------------------------------------------
# the two stages
# ---------------------------------------------------------------------------------------
def _precision(cfg: TrainConfig) -> dict:
    gpu = torch.cuda.is_available()
    p = cfg.precision
    if p == "auto":
        p = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if gpu else "fp32"
    if p in ("bf16", "fp16") and not gpu:
        raise UserError(f"--precision {p} needs a CUDA GPU; none is visible. Use --precision "
                        "fp32 (or auto) on CPU.")
    if p not in ("fp32", "bf16", "fp16"):
        raise UserError(f"--precision must be auto, fp32, bf16 or fp16, got {p!r}.")
    return {"bf16": p == "bf16", "fp16": p == "fp16", "use_cpu": not gpu}


def _run_stage(stage: int, model, lte, tokenizer, task, blocks, cfg: TrainConfig, target, work,
               eta: float, steps: int, teacher=None) -> tuple[float, float]:
    """Train one stage for `steps` optimizer steps (resuming if it can); (η, seconds).
    steps = 0 skips the stage (TrainingArguments would read max_steps=0 as "use epochs")."""
    if steps <= 0:
        return eta, 0.0
    out_dir = work / f"stage{stage}"
    resume = last_checkpoint(out_dir)
    if resume is not None:
        eta = _read_marker(resume / STATE_FILE)["eta"]
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, weight_decay=0.0,
        warmup_steps=max(1, round(cfg.warmup_ratio * steps)), lr_scheduler_type="linear",
        max_grad_norm=1.0, logging_steps=cfg.log_steps, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=2, report_to="none", seed=cfg.seed,
        data_seed=cfg.seed, ddp_find_unused_parameters=False, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=False, **_precision(cfg))
    trainer = LTETrainer(model=model, args=args, train_dataset=BlockDataset(blocks.train),
                         data_collator=BlockCollator(tokenizer, task), lte=lte, cfg=cfg,
                         target=target, stage=stage, work=work, eta=eta, teacher=teacher)
    trainer.task = task
    if teacher is not None:
        teacher.to(args.device)
    trainer.add_callback(_EtaCallback(trainer))
    result = _train(trainer, str(resume) if resume else None)
    return trainer.eta, float(result.metrics.get("train_runtime", 0.0))


def _freeze_for_stage(model, lte, stage: int, routers_only: bool, train_params: str = "all"):
    """Stage 1: the routers and (unless routers_only) the model; stage 2: the model without
    the routers; with train_params="body" also without the input embeddings (and the LM head
    when it is tied to them: no gradient for the [vocab, d] matrix, ~9% of a SmolLM2 step);
    with "ffn" only the FFN weights (attention, norms and embeddings frozen)."""
    from lte_convert.converter.surgery import set_mode

    set_mode(model, "soft" if stage == 1 else "hard")
    router_ids = {id(p) for m in lte for p in m.router.parameters()}
    ffn_ids = {id(p) for m in lte for p in m.parameters()} - router_ids
    embed_ids = {id(p) for p in model.get_input_embeddings().parameters()}
    for p in model.parameters():
        if id(p) in router_ids:
            p.requires_grad_(stage == 1)
        elif stage == 2 and train_params == "ffn":
            p.requires_grad_(id(p) in ffn_ids)
        elif stage == 2 and train_params == "body":
            p.requires_grad_(id(p) not in embed_ids)
        else:
            p.requires_grad_(not (stage == 1 and routers_only))


def _state():
    """Accelerate's view of this process (initialises the process group under torchrun)."""
    from accelerate import PartialState

    return PartialState()


def _check_devices():
    """The Trainer wraps one process on several GPUs in DataParallel, which stage 1's router
    scores and the sparsity controller do not survive: refuse it with the fix."""
    if (torch.cuda.is_available() and torch.cuda.device_count() > 1
            and int(os.environ.get("WORLD_SIZE", "1")) == 1):
        raise UserError(f"This process sees {torch.cuda.device_count()} GPUs. lte-convert "
                        "trains one process per GPU: run it under `torchrun --nproc-per-node "
                        f"{torch.cuda.device_count()} $(which lte-convert) train ...`, or make "
                        "one GPU visible with CUDA_VISIBLE_DEVICES=0.")


def _write_marker(path: Path, data: dict):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data))


def _read_marker(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"The resume marker {path} cannot be read ({e}). The work folder "
                        f"{path.parent} is damaged: delete it and run again without --resume."
                        ) from None


def _tied_names(model) -> set[str]:
    """State-dict keys that are views of another parameter (tied LM heads): a saved folder
    may omit them."""
    seen, tied = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in seen:
            tied.add(name)
        seen.setdefault(key, name)
    return tied


def _load_state(model, folder: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(folder / "model.safetensors"))
    except (OSError, SafetensorError) as e:
        raise UserError(f"The saved state {folder} cannot be read ({e}). Delete the work "
                        "folder and run again without --resume.") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - _tied_names(model):
        raise UserError(f"The saved state {folder} does not match this model (missing "
                        f"{sorted(set(missing) - _tied_names(model))[:5]}, unexpected "
                        f"{sorted(unexpected)[:5]}). It was written by another run: delete "
                        "the work folder and run again without --resume.")
    if missing:
        model.tie_weights()


def _start(model, lte, blocks, calib, cfg: TrainConfig, sparsity: float, targets_given,
           seed: int, task: str, tokenizer) -> dict:
    """Group, fit and allocate (converter/routers.py); returns what the start decided."""
    from lte_convert.converter.routers import (allocate, coactivation_permutation, ffn_inputs,
                                               fit_routers, sensitivity, set_layer_sparsity)
    from lte_convert.converter.surgery import regroup

    t0 = time.perf_counter()

    def took():
        return f" ({time.perf_counter() - t0:.0f} s)"

    fit_blocks = spread(blocks.train, max(1, cfg.fit_tokens // blocks.block_size))
    progress(f"start: reading FFN inputs on {len(fit_blocks)} blocks")
    xs = ffn_inputs(model, lte, fit_blocks, max_tokens=cfg.fit_tokens)
    if cfg.grouping == "coactivation":
        progress(f"start: grouping {len(lte)} layers by co-activation" + took())
        for i, (m, x) in enumerate(zip(lte, xs)):
            regroup(m, coactivation_permutation(m, x, seed=seed + i))
    fits = []
    if cfg.router_init == "fit":
        progress(f"start: fitting {len(lte)} routers to their experts' energies" + took())
        fits = fit_routers(lte, xs, sparsity, steps=cfg.fit_steps, seed=seed)
    costs = None
    if targets_given is not None:
        targets = list(targets_given)
    elif cfg.allocation == "sensitivity":
        sens = spread(blocks.train, cfg.sensitivity_blocks)
        progress(f"start: measuring {len(lte)} layers' sensitivity on {len(sens)} blocks"
                 + took())
        costs = sensitivity(model, lte, xs, sens, task=task, tokenizer=tokenizer)
        targets = allocate(costs, sparsity)
    else:
        targets = [sparsity] * len(lte)
    for m, x, t in zip(lte, xs, targets):
        set_layer_sparsity(m, x, t)
    for m in lte:
        m.set_mode("hard")
    progress("start: calibrating every layer to its target" + took())
    cal = calibrate_layers(model, calib, targets)
    return {"targets": targets, "grouping": cfg.grouping, "router_init": cfg.router_init,
            "allocation": "given" if targets_given is not None else cfg.allocation,
            "router_recall": [round(f.recall, 4) for f in fits],
            "sensitivity": costs, "start_layer_sparsity": cal.layer_sparsity,
            "seconds": time.perf_counter() - t0}


def train_lte(model_dir=None, data: DataSource | None = None, out="lte-model",
              sparsity: float = 0.5, *, heldout: DataSource | None = None,
              config: TrainConfig | None = None, resume: bool = False, overwrite: bool = False,
              trust_remote_code: bool = False, layer_sparsity: list[float] | None = None) -> Path:
    """Train an LTE model and save the folded LTE checkpoint in `out`; returns `out`.

    model_dir None: the embedded SmolLM2-135M (lte_convert/default.py); data None: Shakespeare's
    training plays (calibration then uses the last 5% of their blocks; the held-out plays are
    kept for evaluation). layer_sparsity: per-layer targets instead of the allocation. Under
    torchrun every process calls this; process 0 writes the checkpoints.
    """
    from lte_convert.converter.calibrate import calibrate
    from lte_convert.converter.checkpoint import fold, save_lte_checkpoint
    from lte_convert.converter.surgery import convert_model, lte_modules

    cfg = config or TrainConfig()
    check_sparsity(sparsity)
    check_config(cfg)
    _check_devices()
    out = Path(out)
    work = out.parent / (out.name + WORK_SUFFIX)
    if resume:
        if not work.is_dir():
            raise UserError(f"--resume found nothing to resume: {work} does not exist (it is "
                            f"where a run with --out {out} keeps its checkpoints). Run without "
                            "--resume to start.")
    else:
        check_output_dir(out, overwrite)
    if model_dir is None or data is None:
        from lte_convert.default import default_model_dir, shakespeare_texts
        if model_dir is None:
            model_dir = default_model_dir()
        if data is None:
            data = shakespeare_texts()[0]
    check_model_dir(model_dir)
    docs = read_documents(data, cfg.text_field)            # bad data fails before loading
    held_docs = None if heldout is None else read_documents(heldout, cfg.text_field)
    state = _state()
    progress(f"loading {model_dir}")
    model, tokenizer, task = load_lm(model_dir, trust_remote_code)
    blocks = make_blocks(tokenizer, docs, cfg.block_size, held_docs, cfg.heldout_fraction)
    with state.main_process_first():
        if state.is_main_process and not resume and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
    teacher = None
    if cfg.distill > 0:
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    convert_model(model, expert_size=cfg.expert_size, seed=cfg.seed,
                  grouping="weights" if cfg.grouping == "weights" else "none")
    lte = [m for _, m in lte_modules(model)]
    if layer_sparsity is not None and len(layer_sparsity) != len(lte):
        raise UserError(f"layer_sparsity has {len(layer_sparsity)} entries for {len(lte)} "
                        "LTE layers; give one target per layer.")
    calib = spread(blocks.heldout, cfg.calib_blocks)

    # ---- the start: grouping, fitted routers, per-layer targets ---------------------------
    done0 = work / "start.json"
    if done0.is_file():
        start = _read_marker(done0)
        _load_state(model, work / "start")
    else:
        start = _start(model, lte, blocks, calib, cfg, sparsity, layer_sparsity, cfg.seed,
                       task, tokenizer)
        if state.is_main_process:
            model.save_pretrained(work / "start")
            _write_marker(done0, start)
        state.wait_for_everyone()
    targets = start["targets"]
    progress(f"start: {start['seconds']:.0f} s, per-layer sparsity "
             f"{min(start['start_layer_sparsity']):.2f}-{max(start['start_layer_sparsity']):.2f}")

    # ---- stage 1 (soft, optional), then calibrate ----------------------------------------
    done1 = work / "stage1.json"
    if cfg.stage1_steps <= 0:            # no stage 1: the start is stage 2's start
        s1 = {"eta": cfg.eta, "seconds": 0.0}
    elif done1.is_file():
        s1 = _read_marker(done1)
        _load_state(model, work / "stage1-final")
    else:
        _freeze_for_stage(model, lte, 1, cfg.routers_only)
        eta, secs = _run_stage(1, model, lte, tokenizer, task, blocks, cfg, sparsity, work,
                               cfg.eta, cfg.stage1_steps, teacher)
        _freeze_for_stage(model, lte, 2, cfg.routers_only, cfg.train_params)
        calibrate_layers(model, calib, targets)
        s1 = {"eta": eta, "seconds": secs}
        if state.is_main_process:
            with atomic_path(work / "stage1-final", is_dir=True) as tmp:
                model.save_pretrained(tmp)
            _write_marker(done1, s1)
        state.wait_for_everyone()
    # ---- stage 2 (hard), each layer held at its target -----------------------------------
    _freeze_for_stage(model, lte, 2, cfg.routers_only, cfg.train_params)
    for m, t in zip(lte, targets):
        m.hold_target = t if cfg.hold_sparsity else None
    _, secs2 = _run_stage(2, model, lte, tokenizer, task, blocks, cfg, sparsity, work,
                          s1["eta"], cfg.stage2_steps, teacher)
    for m in lte:
        m.hold_target = None
    model.eval()
    progress("calibrating the thresholds on held-out blocks")
    if cfg.calibration == "layers":
        cal = calibrate_layers(model, calib, targets)
        fold(model)                          # the per-layer shifts are in the biases already
        offsets, method = cal.offsets, "per-layer bias shift to the allocated targets"
    else:
        cal = calibrate(model, calib, sparsity, batch_size=8, task=task, tokenizer=tokenizer)
        fold(model, [cal.offset] * len(lte))
        offsets, method = [cal.offset] * len(lte), "global bias shift"
    info = {
        "expert_size": cfg.expert_size, "tau": cfg.tau, "target_sparsity": sparsity,
        "sparsity": cal.sparsity, "layer_sparsity": cal.layer_sparsity,
        "layer_targets": targets,
        "calibration": {"offsets": offsets, "blocks": len(calib),
                        "block_size": cfg.block_size, "method": method},
        "start": {k: v for k, v in start.items() if k != "targets"},
        "source_model": str(model_dir), "task": task,
        "training": {**asdict(cfg),
                     "final_eta": s1["eta"], "stage1_seconds": s1["seconds"],
                     "stage2_seconds": secs2, "train_blocks": len(blocks.train),
                     "world_size": state.num_processes},
    }
    if state.is_main_process:
        save_lte_checkpoint(model, out, info, overwrite=True, tokenizer=tokenizer)
        if not cfg.keep_checkpoints:
            shutil.rmtree(work, ignore_errors=True)
    state.wait_for_everyone()
    return out

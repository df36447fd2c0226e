"""`lte-convert train`: train LTE routers and save a folded checkpoint (converter.train)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import click

from lte_convert.commands.options import source_literals, trust_option

# TrainConfig's defaults and the allowed values of its choice fields (CHOICES), read from
# converter/train.py without importing torch
TRAIN_DEFAULTS = _D = SimpleNamespace(**source_literals("lte_convert.converter.train",
                                                        "TrainConfig"))
_CHOICES = source_literals("lte_convert.converter.train")["CHOICES"]


def _choice(field: str, help: str):
    """--FIELD with the values converter.train.CHOICES allows and TrainConfig's default."""
    return click.option(f"--{field.replace('_', '-')}", type=click.Choice(_CHOICES[field]),
                        default=getattr(_D, field), show_default=True, help=help)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--data", "data", multiple=True, type=click.Path(path_type=Path),
              help="Training text: a .txt file, a folder of .txt files, a JSONL file or a saved "
                   "`datasets` folder (repeat to combine). Default: Shakespeare's plays.")
@click.option("--heldout", multiple=True, type=click.Path(path_type=Path),
              help="Held-out text for calibration (same formats). Default: the last 5% of "
                   "--data's blocks (with no --data: of the training plays; the four held-out "
                   "plays are kept for evaluation).")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=Path("lte-model"),
              show_default=True, help="Folder for the folded LTE checkpoint.")
@click.option("--sparsity", "-s", type=float, default=0.5, show_default=True,
              help="Fraction of FFN experts to switch off per token, in (0, 1). The saved "
                   "model's measured held-out sparsity is within ±0.02 of it.")
@click.option("--expert-size", type=int, default=_D.expert_size, show_default=True,
              help="Neurons per expert (the paper uses 32).")
@click.option("--block-size", type=click.IntRange(min=2), default=_D.block_size, show_default=True,
              help="Tokens per training sequence.")
@click.option("--batch-size", type=click.IntRange(min=1), default=_D.batch_size, show_default=True,
              help="Sequences per step and process.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=_D.grad_accum, show_default=True,
              help="Gradient accumulation steps.")
@click.option("--stage1-steps", type=click.IntRange(min=0), default=_D.stage1_steps, show_default=True,
              help="Optimizer steps of stage 1 (soft routing, router losses).")
@click.option("--stage2-steps", type=click.IntRange(min=0), default=_D.stage2_steps, show_default=True,
              help="Optimizer steps of stage 2 (hard masks, routers frozen).")
@click.option("--lr", type=float, default=_D.lr, show_default=True,
              help="Learning rate of the model weights.")
@click.option("--router-lr", type=float, default=_D.router_lr, show_default=True,
              help="Learning rate of the routers (stage 1).")
@click.option("--distill", type=float, default=_D.distill, show_default=True,
              help="Weight W of distillation from the original model: the task loss is "
                   "(1-W)*LM + W*KL(original || model). 0: LM loss only.")
@_choice("grouping",
         help="Group neurons into experts by co-activation on the data, or by k-means on "
              "their weight rows.")
@_choice("router_init",
         help="fit: train each router to predict its layer's most active experts before "
              "stage 2; mean: the experts' mean gate rows, untrained.")
@_choice("allocation",
         help="Per-layer sparsity: allocated by each layer's measured loss sensitivity "
              "(mean = --sparsity), or the same in every layer.")
@click.option("--hold-sparsity/--no-hold-sparsity", default=_D.hold_sparsity,
              show_default=True,
              help="Stage 2 keeps every layer at its target sparsity after each step.")
@_choice("calibration",
         help="Final threshold calibration: each layer to its target, or one shift for "
              "all layers.")
@click.option("--routers-only/--all-params", default=_D.routers_only, show_default=True,
              help="Stage 1: train only the routers (model frozen), or everything.")
@_choice("train_params",
         help="Stage 2 trains every weight but the routers (all), also not the token "
              "embeddings and a tied LM head (body), or only the FFN weights (ffn).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              default=_D.precision, show_default=True,
              help="auto: bf16 (else fp16) on a CUDA GPU, fp32 on CPU.")
@click.option("--save-steps", type=click.IntRange(min=1), default=_D.save_steps, show_default=True,
              help="Save a resumable checkpoint every N steps (in OUT.lte-work/).")
@click.option("--seed", type=int, default=_D.seed, show_default=True)
@click.option("--text-field", default=_D.text_field, show_default=True,
              help="JSONL field / dataset column holding the text.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from its last checkpoint in OUT.lte-work/.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--keep-checkpoints", is_flag=True,
              help="Keep OUT.lte-work/ (training checkpoints) after success.")
@trust_option
def train(model, data, heldout, out, sparsity, expert_size, block_size, batch_size, grad_accum,
          stage1_steps, stage2_steps, lr, router_lr, distill, grouping, router_init, allocation,
          hold_sparsity, calibration, routers_only, train_params, precision, save_steps, seed,
          text_field, resume, overwrite, keep_checkpoints, trust_remote_code):
    """Train LTE routers on MODEL and save a folded LTE checkpoint in OUT.

    \b
    MODEL is a Hugging Face folder (config.json + safetensors). Without MODEL and --data the
    embedded default is used: SmolLM2-135M on Shakespeare (times measured in results/quality.md).
    \b
    Steps: group FFN neurons into experts by co-activation, fit each router to its layer's
    most active experts, allocate per-layer sparsity by measured sensitivity, stage 1 (the
    paper's soft stage; off by default, see docs/converter-training.md), stage 2 (hard masks,
    every layer held at its target), calibrate each layer on held-out text, fold the
    thresholds into the router biases, save. Multi-process: run it under
    `torchrun --nproc_per_node N -m lte_convert.cli train ...`.
    \b
    Examples:
      lte-convert train --out smollm2-lte
      lte-convert train ./my-llama --data corpus.jsonl --sparsity 0.6 --out my-llama-lte
      lte-convert train ./my-llama --data corpus.jsonl --out my-llama-lte --resume
    """
    check_train_inputs(model, out, sparsity=sparsity, expert_size=expert_size, lr=lr,
                       router_lr=router_lr, resume=resume, overwrite=overwrite,
                       trust_remote_code=trust_remote_code)
    from lte_convert.converter.train import TrainConfig, train_lte

    cfg = TrainConfig(expert_size=expert_size, block_size=block_size, batch_size=batch_size,
                      grad_accum=grad_accum, stage1_steps=stage1_steps,
                      stage2_steps=stage2_steps, lr=lr, router_lr=router_lr,
                      distill=distill, grouping=grouping, router_init=router_init,
                      allocation=allocation, hold_sparsity=hold_sparsity,
                      calibration=calibration, routers_only=routers_only,
                      train_params=train_params, precision=precision, save_steps=save_steps,
                      seed=seed, text_field=text_field, keep_checkpoints=keep_checkpoints)
    path = train_lte(model, list(data) or None, out, sparsity, heldout=list(heldout) or None,
                     config=cfg, resume=resume, overwrite=overwrite,
                     trust_remote_code=trust_remote_code)
    summary(path)


def check_train_inputs(model, out, *, sparsity: float, expert_size: int, lr: float,
                       router_lr: float, resume: bool, overwrite: bool,
                       trust_remote_code: bool) -> None:
    """Every option and path of a training run, checked before any model or data loads (a
    config.json is read, nothing else)."""
    from lte_convert.checks import check_expert_size, check_output_dir, check_rates, check_sparsity
    from lte_convert.loading import check_model_dir, check_model_files, check_remote_code

    check_sparsity(sparsity)
    check_rates(lr=lr, router_lr=router_lr)
    config = None
    if model is not None:
        path = check_model_dir(model)
        config = check_remote_code(path, trust_remote_code)
        check_model_files(path)
    check_expert_size(expert_size, config)
    check_output_dir(Path(out), overwrite or resume)


def summary(path: Path):
    from lte_convert.converter.checkpoint import read_lte_info

    info = read_lte_info(path)
    layers = " ".join(f"{s:.2f}" for s in info.get("layer_sparsity", []))
    click.echo(f"saved {path}: measured held-out sparsity {info.get('sparsity', 0):.3f} "
               f"(target {info.get('target_sparsity')})\nper layer: {layers}")

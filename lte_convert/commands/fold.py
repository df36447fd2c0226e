"""`lte-convert fold`: re-target an LTE checkpoint to another sparsity without training
(one global router-bias shift, converter.calibrate)."""
from __future__ import annotations

from pathlib import Path

import click

from lte_convert.commands.options import trust_option
from lte_convert.commands.train import summary


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--sparsity", "-s", type=float, required=True,
              help="New target sparsity in (0, 1).")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True,
              help="Folder for the re-folded LTE checkpoint.")
@click.option("--data", multiple=True, type=click.Path(path_type=Path),
              help="Held-out text to calibrate on (default: Shakespeare's held-out plays).")
@click.option("--block-size", type=int, default=128, show_default=True)
@click.option("--calib-blocks", type=int, default=32, show_default=True,
              help="Blocks (evenly spread over --data) used to calibrate.")
@click.option("--text-field", default="text", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
@trust_option
def fold(checkpoint, sparsity, out, data, block_size, calib_blocks, text_field, overwrite,
         trust_remote_code):
    """Re-target an LTE checkpoint to another sparsity, without training.

    \b
    Calibrates one global router-bias shift on held-out text so the measured sparsity is
    within ±0.02 of --sparsity, folds it into the router bias and saves a new checkpoint.
    Works on folded checkpoints (from `train`) and unfolded ones. Example:
      lte-convert fold smollm2-lte --sparsity 0.7 --out smollm2-lte-70
    """
    summary(fold_checkpoint(checkpoint, out, sparsity, list(data) or None,
                            block_size=block_size, calib_blocks=calib_blocks,
                            text_field=text_field, overwrite=overwrite,
                            trust_remote_code=trust_remote_code))


def fold_checkpoint(ckpt, out, sparsity: float, data=None, *, block_size: int = 128,
                    calib_blocks: int = 32, text_field: str = "text",
                    overwrite: bool = False, trust_remote_code: bool = False):
    """Re-target an LTE checkpoint to `sparsity` (calibrate δ, fold, save); returns `out`."""
    from transformers import AutoTokenizer

    from lte_convert.checks import check_output_dir, check_sparsity
    from lte_convert.converter.calibrate import calibrate, shift_routers
    from lte_convert.converter.checkpoint import fold, load_lte_model, save_lte_checkpoint
    from lte_convert.converter.data import heldout_blocks
    from lte_convert.converter.surgery import lte_modules

    check_sparsity(sparsity)
    out = Path(out)
    check_output_dir(out, overwrite)
    model, info = load_lte_model(ckpt, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=trust_remote_code)
    blocks = heldout_blocks(tokenizer, data, block_size, calib_blocks, text_field=text_field,
                            purpose="calibration")
    task = info.get("task", "clm")
    cal = calibrate(model, blocks, sparsity, task=task, tokenizer=tokenizer)
    modules = lte_modules(model)
    if info["folded"]:
        shift_routers(model, cal.offset)
        for _, m in modules:
            m.fold_offset += cal.offset
    else:
        fold(model, [cal.offset] * len(modules))
    keep = {k: v for k, v in info.items() if k not in ("offsets", "folded", "mode")}
    keep.update(target_sparsity=sparsity, sparsity=cal.sparsity,
                layer_sparsity=cal.layer_sparsity,
                calibration={**info.get("calibration", {}), "refold_offset": cal.offset,
                             "blocks": len(blocks), "block_size": block_size,
                             "method": "global bias shift"})
    return save_lte_checkpoint(model, out, keep, overwrite=True, tokenizer=tokenizer)

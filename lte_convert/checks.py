"""Checks of paths and options that fail before slow work starts, shared by the commands and
the library entry points (train_lte, export_checkpoint). Below the rooms."""
from __future__ import annotations

import tempfile
from pathlib import Path

from lte_convert.errors import UserError


def check_output_dir(out: Path, overwrite: bool):
    """The checkpoint folder `out` can be made: not a file, empty unless overwrite, and its
    parent writable (a read-only mount or /proc is found here, before any model loads)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"The output path {out} is a file, not a folder; the LTE checkpoint is "
                        "a folder. Choose a folder path for --out (one that does not exist "
                        "yet, or an empty folder).")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"The output folder {out} already exists and is not empty. Choose "
                        "another --out, or pass --overwrite to replace it.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=f".{out.name}.write-test-", dir=out.parent)).rmdir()
    except OSError as e:
        raise UserError(f"Cannot write the checkpoint folder {out}: {e.strerror or e}. Choose "
                        "a folder you can write to (--out), or fix its permissions.") from None


def check_rates(**rates: float):
    """Learning rates (by option name) are not negative: a negative rate climbs the loss."""
    for name, value in rates.items():
        if value < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative, got {value}: a "
                            "negative learning rate moves the weights up the loss instead of "
                            "down. Give a positive rate (or 0 to keep those weights fixed).")


def ffn_width(config: dict) -> int | None:
    """The FFN width of a Hugging Face config.json (its text part), where the config names it."""
    config = config.get("text_config") or config
    for key in ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size"):
        if isinstance(config.get(key), int):
            return config[key]
    if config.get("model_type") in ("gpt2", "gpt_bigcode", "codegen", "gptj", "falcon",
                                    "bloom", "gpt_neo"):
        width = config.get("n_embd") or config.get("hidden_size")
        return 4 * width if isinstance(width, int) else None
    return None


def check_expert_size(expert_size: int, config: dict | None = None):
    """1 <= expert_size <= the FFN width (when the config names it)."""
    if expert_size < 1:
        raise UserError(f"--expert-size must be at least 1 neuron, got {expert_size}. The "
                        "paper's (and the default) is 32.")
    width = ffn_width(config) if config else None
    if width is not None and expert_size > width:
        raise UserError(f"--expert-size {expert_size} is larger than the model's FFN width "
                        f"({width} neurons): each layer would be one padded expert, always "
                        "on, so nothing could be skipped. Choose a smaller expert size (the "
                        "default, 32, is the paper's).")


def check_sparsity(sparsity: float):
    if not (0.0 < float(sparsity) < 1.0):
        raise UserError(f"--sparsity must be strictly between 0 and 1 (the fraction of FFN "
                        f"experts switched off per token), got {sparsity}. The default is 0.5.")


def check_writable(out: Path, overwrite: bool = False) -> None:
    """Fail before the (slow) export if `out` cannot be written, or exists and overwrite is
    off (as `train` and `build` refuse). Removes what a killed export of `out` left beside it."""
    from lte_convert.atomic import clean_leftovers

    out = Path(out)
    if out.exists() and out.is_dir():
        raise UserError(f"The output path {out} is a folder; give a file name such as "
                        f"{out / 'model.onnx'}.")
    if out.exists() and not overwrite:
        raise UserError(f"The output file {out} exists ({out.stat().st_size} bytes). Pass "
                        "--overwrite to replace it, or choose another --out.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"Cannot write the output {out}: {e.strerror or e}. Choose a folder you "
                        "can write to (--out), or fix its permissions.") from None
    clean_leftovers(out)

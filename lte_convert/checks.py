"""Checks of paths and options that fail before slow work starts, shared by the commands and
the library entry points (train_lte, export_checkpoint). Below the rooms."""
from __future__ import annotations

from pathlib import Path

from lte_convert.errors import UserError


def check_output_dir(out: Path, overwrite: bool):
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"The output folder {out} already exists and is not empty. Choose "
                        "another --out, or pass --overwrite to replace it.")


def check_sparsity(sparsity: float):
    if not (0.0 < float(sparsity) < 1.0):
        raise UserError(f"--sparsity must be strictly between 0 and 1 (the fraction of FFN "
                        f"experts switched off per token), got {sparsity}. The default is 0.5.")


def check_writable(out: Path) -> None:
    """Fail before the (slow) export if `out` cannot be written."""
    out = Path(out)
    if out.exists() and out.is_dir():
        raise UserError(f"The output path {out} is a folder; give a file name such as "
                        f"{out / 'model.onnx'}.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"Cannot write the output {out}: {e.strerror or e}. Choose a folder you "
                        "can write to (--out), or fix its permissions.") from None

"""Click pieces more than one command uses."""
from __future__ import annotations

import click

DTYPE_CHOICE = click.Choice(["fp32", "fp16", "bf16"])


class Failed(click.ClickException):
    """A comparison out of tolerance: exit code 1 (user errors exit with 2)."""

    exit_code = 1


def threshold_option(f):
    from lte_convert.exporters.onnx_export import EXTERNAL_DATA_THRESHOLD

    return click.option(
        "--external-data-threshold", type=int, default=EXTERNAL_DATA_THRESHOLD,
        show_default=True, metavar="BYTES",
        help="Weights go to <out>.data beside the .onnx file when they exceed this size "
             "(ONNX files cannot exceed 2 GiB).")(f)

"""Click pieces more than one command uses.

The command modules import no room at import time: importing converter/, exporters/ or
trt_plugins/ loads torch, transformers and onnx (seconds), and `lte-convert --help` or a
mistyped option must answer at once. Defaults that live in the rooms are read from their
source (`source_literals`); tests/lte_convert/test_startup.py checks them against the
imported values.
"""
from __future__ import annotations

import ast
from importlib.util import find_spec
from pathlib import Path

import click

DTYPE_CHOICE = click.Choice(["fp32", "fp16", "bf16"])


class Failed(click.ClickException):
    """A comparison out of tolerance: exit code 1 (user errors exit with 2)."""

    exit_code = 1


def source_literals(module: str, owner: str | None = None) -> dict:
    """The names bound to literal values at the top of `module` (or in its class `owner`,
    e.g. a dataclass's field defaults), read from its source file without importing it."""
    tree = ast.parse(Path(find_spec(module).origin).read_text())
    body = tree.body if owner is None else next(
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == owner).body
    found = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            name, value = node.target.id, node.value
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1
              and isinstance(node.targets[0], ast.Name)):
            name, value = node.targets[0].id, node.value
        else:
            continue
        try:
            found[name] = ast.literal_eval(value)
        except ValueError:
            continue                                  # not a literal (a name, a call)
    return found


def threshold_option(f):
    return click.option(
        "--external-data-threshold", type=click.IntRange(min=0), metavar="BYTES",
        help="Weights go to <out>.data beside the .onnx file when they exceed this size "
             "[default: 2 GiB - 64 MiB; ONNX files cannot exceed 2 GiB].")(f)


def trust_option(f):
    return click.option(
        "--trust-remote-code", is_flag=True,
        help="Allow the model's own Python code (config.json auto_map; off by default: read "
             "it first).")(f)

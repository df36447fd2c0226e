"""The `lte-convert` command line: the click group over lte_convert.commands.

Each command is one small module in lte_convert/commands/ (the application layer, above the
compute rooms converter/, plugins/, exporters/, trt_plugins/, which never import it). They
are imported only when used, so `lte-convert --help` stays fast and a CPU-only install never
imports Triton or TensorRT.

`lte-convert [MODEL] --out model.onnx` (no command name) runs the one-shot pipeline:
arguments that do not start with a command name go to `lte-convert run`.
"""
from __future__ import annotations

import importlib
import sys

import click

from lte_convert.errors import UserError, exit_with

# command name -> "module:attribute"; the attribute is a click.Command.
COMMANDS = {
    "run": "lte_convert.commands.run:run",
    "train": "lte_convert.commands.train:train",
    "fold": "lte_convert.commands.fold:fold",
    "eval": "lte_convert.commands.eval:eval_",
    "export": "lte_convert.commands.export:export",
    "validate": "lte_convert.commands.validate:validate",
    "generate": "lte_convert.commands.generate:generate",
    "build": "lte_convert.commands.build:build",
    "bench": "lte_convert.commands.bench:bench",
}

_HELP_FLAGS = {"--help", "-h", "--version"}


class _Group(click.Group):
    """Lazy subcommands, and `run` as the default when no command name is given."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def parse_args(self, ctx, args):
        if args and args[0] not in COMMANDS and args[0] not in _HELP_FLAGS:
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lte-convert")
def cli():
    """Make a Hugging Face language model sparse (Learn-To-be-Efficient) and export it.

    \b
    Main job:   lte-convert [MODEL] --out model.onnx [--sparsity 0.5] [--data TEXT]
    With no MODEL, the embedded default (SmolLM2-135M on Shakespeare) is used.
    """


def main(argv=None):
    """Console entry point: user errors become one paragraph and exit code 2 (3: the disk
    is full)."""
    try:
        cli.main(args=argv, prog_name="lte-convert", standalone_mode=False)
    except UserError as e:
        exit_with(e)
    except click.exceptions.Abort:
        click.echo("Interrupted; the last checkpoint (if any) is kept. Use --resume to go on.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted; the last checkpoint (if any) is kept. Use --resume to go on.", err=True)
        sys.exit(130)
    except Exception as e:                 # OSError, torch's RuntimeError, SafetensorError, ...
        from lte_convert.atomic import as_disk_full

        full = as_disk_full(e)
        if full is None:
            raise
        exit_with(full)


if __name__ == "__main__":
    main()

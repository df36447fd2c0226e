"""Errors a user can cause. The CLI prints them as one paragraph, without a traceback."""
from __future__ import annotations

import sys
import textwrap
from typing import NoReturn


class UserError(Exception):
    """What failed, the values involved, and the fix, in one paragraph.

    Raise it from library code for anything the user can correct (a path, an option, an
    input file); keep `assert` for our own invariants. `exit_code` is the CLI's exit status.
    """

    exit_code = 2


class DiskFull(UserError):
    """A write failed because the disk (or quota) is full; nothing half-written was left."""

    exit_code = 3


def format_error(error: Exception, width: int = 100) -> str:
    """`error: <message>` wrapped at `width`, breaking only at spaces: a path, a command such
    as `lte-convert`, or a long value stays on one line whole."""
    return textwrap.fill(f"error: {error}", width=width, break_on_hyphens=False,
                         break_long_words=False)


def exit_with(error: UserError) -> NoReturn:
    """Print `error` as one paragraph (no traceback) on stderr and exit with its exit code (2,
    3 for a full disk): how `lte-convert` and the sample scripts end on a user error."""
    print(format_error(error), file=sys.stderr)
    sys.exit(error.exit_code)

"""Errors a user can cause. The CLI prints them as one paragraph, without a traceback."""
from __future__ import annotations

import sys
import textwrap
from typing import NoReturn


class UserError(Exception):
    """What failed, the values involved, and the fix, in one paragraph.

    Raise it from library code for anything the user can correct (a path, an option, an
    input file); keep `assert` for our own invariants.
    """


def exit_with(error: UserError) -> NoReturn:
    """Print `error` as one paragraph (no traceback) on stderr and exit with status 2: how
    `lte-convert` and the sample scripts end on a user error."""
    print(textwrap.fill(f"error: {error}", width=100), file=sys.stderr)
    sys.exit(2)

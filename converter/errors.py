"""Errors a user can cause. The CLI prints them as one paragraph, without a traceback."""
from __future__ import annotations


class UserError(Exception):
    """What failed, the values involved, and the fix, in one paragraph.

    Raise it from library code for anything the user can correct (a path, an option, an
    input file); keep `assert` for our own invariants.
    """

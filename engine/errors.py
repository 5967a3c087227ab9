"""The project's user-error type: what `mcl` reports as one line (exit 2) instead of a traceback.

    from engine.errors import UserError
    raise UserError(f"sha256 mismatch for {path}: got ..., pinned ...; delete it and retry")

Raise UserError (or ValueError / OSError, which engine/cli.py treats the same way) at a boundary, for something
the user can fix: bad input, a missing file, no network, no CUDA device. Every other exception -- a RuntimeError
from torch included -- is a bug or an internal failure and keeps its traceback. UserError subclasses RuntimeError
so code that already catches RuntimeError around such calls keeps working.
"""
from __future__ import annotations


class UserError(RuntimeError):
    """A problem the user can fix; `mcl` prints its message as one line and exits with status 2."""

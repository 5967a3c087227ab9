"""The project's user-error type: what `mcl` reports as one line (exit 2) instead of a traceback.

    from engine.errors import UserError
    raise UserError(f"sha256 mismatch for {path}: got ..., pinned ...; delete it and retry")

Raise UserError (or ValueError / OSError, which engine/cli.py treats the same way) at a boundary, for something
the user can fix: bad input, a missing file, no network, no CUDA device. Every other exception -- a RuntimeError
from torch included -- is a bug or an internal failure and keeps its traceback. UserError subclasses RuntimeError
so code that already catches RuntimeError around such calls keeps working. read_json reads a JSON file that way.
"""
from __future__ import annotations

import json
from pathlib import Path


class UserError(RuntimeError):
    """A problem the user can fix; `mcl` prints its message as one line and exits with status 2."""


def read_json(path: Path):
    """A JSON file's value, or a ValueError of one line naming the file (and the line, for a syntax error)."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested deeper than the reader allows") from None

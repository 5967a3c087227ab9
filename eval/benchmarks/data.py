"""Where the benchmarks' data files are, for the loaders beside this file.

    file = data_file(path, "apps/selected150.jsonl")   # a loader's `path` (a file, a directory or None) -> the file
    data_dir()                                         # $MCL_DATA, else ../shared/data/benchmarks beside the repo
"""
from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "benchmarks")


def data_dir() -> str:
    """The benchmarks directory: $MCL_DATA if set, else ../shared/data/benchmarks next to the repo."""
    return os.environ.get("MCL_DATA") or DEFAULT_DATA


def data_file(path: str | None, relative: str) -> str:
    """Resolve a loader's `path` argument: a file is used as is, a directory (or None: data_dir())
    gets `relative` appended. Raises FileNotFoundError naming what was tried."""
    if path is not None and os.path.isfile(path):
        return path
    full = os.path.join(path or data_dir(), relative)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"benchmark data not found: {full} (pass --data DIR or set MCL_DATA to the "
                                f"benchmarks directory, which holds {relative})")
    return full


def take(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]

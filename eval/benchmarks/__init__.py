"""Benchmark loaders: one module per benchmark, each `load(path=None, split=..., limit=None) -> list[Problem]`.

    from eval.benchmarks import load
    problems = load("mbpp", split="test", limit=10)

`path` may be the benchmarks directory (default: ../shared/data/benchmarks beside the repository, or
$MCL_DATA) or the data file itself. Names: humaneval, humaneval-wst, mbpp, mbpp-py, apps, xcodeeval,
codecontests (the last needs a path: no CodeContests data ships). Where the files are: eval/benchmarks/data.py.
"""
from __future__ import annotations

from engine.agents.problem import Problem


def splits(name: str) -> tuple[str, ...] | None:
    """The splits a benchmark's loader knows (None: any name, e.g. CodeContests' one file per split)."""
    from eval.benchmarks import mbpp
    return {"humaneval": ("test",), "humaneval-wst": ("test",), "mbpp": tuple(mbpp.SPLITS), "mbpp-py": ("test",),
            "apps": ("test",), "xcodeeval": ("validation",), "codecontests": None}[name]


def load(name: str, path: str | None = None, split: str | None = None, limit: int | None = None) -> list[Problem]:
    """Dispatch by benchmark name (the `mcl eval --benchmark` values); split None = the loader's default.
    ValueError for an unknown benchmark or a split the benchmark does not have."""
    from eval.benchmarks import apps, codecontests, humaneval, mbpp, xcodeeval
    loaders = {"humaneval": humaneval.load, "humaneval-wst": humaneval.load_wst, "mbpp": mbpp.load,
               "mbpp-py": mbpp.load_py, "apps": apps.load, "xcodeeval": xcodeeval.load,
               "codecontests": codecontests.load}
    if name not in loaders:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(loaders)}")
    kwargs = {"path": path, "limit": limit}
    if split is not None:
        known = splits(name)
        if known is not None and split not in known:
            raise ValueError(f"benchmark {name!r} has no split {split!r}; its splits: {', '.join(known)}")
        kwargs["split"] = split
    return loaders[name](**kwargs)


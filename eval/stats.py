"""Paired statistics for comparing two models on the same problems: the adapted student against its base.

Both models answer the same n problems, so the comparison is paired: per problem, (base passed, adapted passed).
- `delta`: adapted pass@1 minus base pass@1.
- `ci95`: a paired bootstrap interval of delta (problems resampled with replacement, both models' outcomes kept
  together), percentile method.
- `mcnemar_p`: McNemar's exact test, two-sided: under "no difference" each discordant problem (one model passes, the
  other fails) is a fair coin, so p = P(Binomial(b + c, 1/2) at least as far from (b + c)/2 as observed).

    from eval.stats import paired
    paired({"HumanEval/0": False, ...}, {"HumanEval/0": True, ...})
    # {'n': 164, 'base': 21, 'adapted': 40, 'delta': 0.116, 'ci95': [0.06, 0.17], 'mcnemar_p': 0.0004, 'b': 3, 'c': 22}
"""
from __future__ import annotations

from math import comb

import torch


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: b = base-only passes, c = adapted-only passes."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(k + 1)) / 2 ** n          # P(X <= min(b, c)), X ~ Binomial(n, 1/2)
    return min(1.0, 2 * tail)


def paired_bootstrap(base: list[bool], adapted: list[bool], n_boot: int = 10_000, seed: int = 0) -> list[float]:
    """95% percentile interval of mean(adapted) - mean(base) over problems resampled with replacement."""
    if len(base) != len(adapted) or not base:
        raise ValueError(f"paired_bootstrap: need two equal, non-empty outcome lists (got {len(base)}, {len(adapted)})")
    d = torch.tensor(adapted, dtype=torch.float64) - torch.tensor(base, dtype=torch.float64)     # (n,) in {-1, 0, 1}
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(d), (n_boot, len(d)), generator=g)                            # (n_boot, n)
    means = d[idx].mean(dim=1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [round(lo, 4), round(hi, 4)]


def paired(base: dict[str, bool], adapted: dict[str, bool], n_boot: int = 10_000, seed: int = 0) -> dict:
    """The `paired` block of a summary: base and adapted outcomes keyed by problem id (the same ids on both sides)."""
    if base.keys() != adapted.keys():
        only_b, only_a = sorted(base.keys() - adapted.keys()), sorted(adapted.keys() - base.keys())
        raise ValueError(f"paired: the two runs answered different problems (base only: {only_b[:5]}, "
                         f"adapted only: {only_a[:5]})")
    ids = sorted(base)
    xb, xa = [bool(base[i]) for i in ids], [bool(adapted[i]) for i in ids]
    b = sum(1 for u, v in zip(xb, xa) if u and not v)
    c = sum(1 for u, v in zip(xb, xa) if v and not u)
    n = len(ids)
    return {"n": n, "base": sum(xb), "adapted": sum(xa), "delta": round((sum(xa) - sum(xb)) / n, 4) if n else 0.0,
            "ci95": paired_bootstrap(xb, xa, n_boot, seed) if n else [0.0, 0.0],
            "mcnemar_p": mcnemar_exact(b, c), "b": b, "c": c}

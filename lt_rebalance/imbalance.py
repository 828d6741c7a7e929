"""How imbalanced a train split is, from its class counts alone (numpy, torch-free: ``ltr info`` reads it).

docs/METHODS.md, "Metrics": imbalance factor, Gini coefficient, share of the top 20 % of classes,
and the sizes of the many / medium / few shot groups.
"""
from __future__ import annotations

from typing import Any

import numpy as np

GROUPS = ("many", "medium", "few")
DEFAULT_MANY, DEFAULT_FEW = 100, 20


def check_thresholds(many: int, few: int) -> None:
    """ValueError when the few threshold exceeds the many threshold + 1 (the groups would overlap)."""
    if few > many + 1:
        raise ValueError(f"the few threshold ({few}) must not exceed the many threshold ({many}) + 1")


def _counts(counts: Any) -> np.ndarray:
    return np.asarray(counts, dtype=np.float64).reshape(-1)


def group_sizes(counts: Any, many: int = DEFAULT_MANY, few: int = DEFAULT_FEW) -> dict[str, int]:
    """Classes per shot group: ``many`` (> many train rows), ``medium``, ``few`` (< few)."""
    check_thresholds(many, few)
    n = np.asarray(counts, dtype=np.int64).reshape(-1)
    m, f = int((n > many).sum()), int((n < few).sum())
    return {"many": m, "medium": len(n) - m - f, "few": f}


def imbalance_stats(counts: Any) -> dict[str, float]:
    """How imbalanced a train split is, from its class counts int (C,).

    ``imbalance_factor``: max n_j / min n_j over the classes with at least one row (classes with
    no row are left out of the minimum, and counted in ``empty_classes``); NaN without rows.
    ``gini``: the Gini coefficient of the counts of all C classes, empty ones included:
    Σ_i Σ_k |n_i − n_k| / (2 C Σ_j n_j), 0 for equal counts, (C − 1) / C when one class holds
    every row. ``top20_share``: the share of the train rows in the ceil(C / 5) largest classes.
    Also ``num_classes`` and ``empty_classes``.
    """
    n = _counts(counts)
    if n.size == 0 or (n < 0).any():
        raise ValueError("counts must be a non-empty vector of non-negative class counts")
    C, total = n.size, float(n.sum())
    present = n[n > 0]
    out = {"num_classes": C, "empty_classes": int(C - present.size), "imbalance_factor": float("nan"),
           "gini": float("nan"), "top20_share": float("nan")}
    if total > 0:
        s = np.sort(n)  # ascending: Gini = Σ_i (2i − C − 1) s_i / (C Σ s), i = 1..C
        rank = np.arange(1, C + 1, dtype=np.float64)
        out.update(
            imbalance_factor=float(present.max() / present.min()),
            gini=float(((2 * rank - C - 1) * s).sum() / (C * total)),
            top20_share=float(s[C - -(-C // 5):].sum() / total),
        )
    return out

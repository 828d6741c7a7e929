"""Shot groups from training counts, torch-free (``ltr info`` stays instant): many > ``many``,
few < ``few``, medium otherwise (docs/METHODS.md). :mod:`lt_rebalance.metrics` builds on it."""
from __future__ import annotations

from typing import Any

import numpy as np

GROUPS = ("many", "medium", "few")
DEFAULT_MANY, DEFAULT_FEW = 100, 20


def check_thresholds(many: int, few: int) -> None:
    """ValueError when the few threshold exceeds the many threshold + 1 (the groups would overlap)."""
    if few > many + 1:
        raise ValueError(f"the few threshold ({few}) must not exceed the many threshold ({many}) + 1")


def group_sizes(counts: Any, many: int = DEFAULT_MANY, few: int = DEFAULT_FEW) -> dict[str, int]:
    """Number of classes in each shot group, from training ``counts`` (C,)."""
    check_thresholds(many, few)
    c = np.asarray(counts.cpu() if hasattr(counts, "cpu") else counts, dtype=np.int64)
    m, f = c > many, c < few
    return {"many": int(m.sum()), "medium": int((~m & ~f).sum()), "few": int(f.sum())}

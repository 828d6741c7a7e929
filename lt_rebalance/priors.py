"""Class priors (float64 (C,), summing to 1) that heads' scores are balanced for.

Each head answers :meth:`~lt_rebalance.heads.base.BaseHead.implied_prior` from these; the
shifted-prior correction of :mod:`lt_rebalance.protocols` divides the answer out
(docs/METHODS.md, "Evaluation protocols").
"""
from __future__ import annotations

from typing import Any

import torch


class NoImpliedPrior(ValueError):
    """A head whose scores are balanced for no known class prior; the message says why."""


def normalise(p: torch.Tensor) -> torch.Tensor:
    """``p`` as float64 summing to 1."""
    p = p.to(torch.float64)
    return p / p.sum()


def train_prior(counts: Any) -> torch.Tensor:
    """n_j / N, float64 (C,); a class without train rows counts as one (as :func:`posthoc.log_prior`)."""
    return normalise(torch.as_tensor(counts, dtype=torch.float64).clamp_min(1))


def uniform_prior(counts: Any) -> torch.Tensor:
    """1 / C for each of the C classes of ``counts``."""
    return normalise(torch.ones(len(counts), dtype=torch.float64))

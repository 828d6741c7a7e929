"""A test-agnostic ensemble: logit-adjusted experts of one head, combined for the estimated test prior.

Expert k scores z − τ_k log π (z the base head's logits, π the train prior; τ ∈ {0, 1, 2} by
default: the base head, its balanced version, and one leaning to the tail), so it is balanced for
the prior q_k ∝ p_base π^(−τ_k). On the rows it scores, the ensemble estimates their class prior p̂
by EM (Saerens et al. 2002) on the balanced expert's posteriors, finds the τ* in [min τ, max τ] whose
prior q_τ* is closest to p̂ (least KL(p̂ ‖ q_τ)), and weighs the two experts around τ* linearly. With
experts of one base head the weighted sum of their logits is the logit adjustment at τ* = Σ w_k τ_k,
so no prior needs to be known: the combination follows the test distribution (docs/METHODS.md).
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from ..blocks import linear_logits
from ..priors import NoImpliedPrior, normalise, train_prior
from .base import ARRAY, BaseHead, Interval, Is, check_is_fitted

TAU_GRID = 401  # candidate τ* between the smallest and the largest expert


class LogitAdjustedExperts(BaseHead):
    """Experts z − τ_k log π of a fitted linear ``head``, weighted for the prior estimated on the rows scored.

    Parameters
    ----------
    head : fitted linear head (``linear_form``, ``implied_prior``)
    counts : int (C,)
        Train rows per class (π).
    taus : sequence of float, default=(0, 1, 2)
        The experts' τ; 1 must be among them (its balanced posteriors feed the EM estimate).
    max_iter, tol : EM's limits.

    Attributes
    ----------
    weight_, bias_ : float32 (C, D), (C,)
        The base head's linear layer.
    classes_ : ndarray (C,)

    Notes
    -----
    Transductive: the scores of a row depend on the other rows scored with it (their estimated prior),
    so :meth:`scores` takes every row at once and evaluations score each test subset on its own
    (:attr:`transductive`). :meth:`combination` reports τ*, the expert weights and p̂ of a set.
    """

    _parameter_constraints = {
        "head": [Is(lambda h: hasattr(h, "linear_form"), "a fitted linear head")],
        "counts": [ARRAY],
        "taus": [Is(lambda t: len(t) >= 2 and 1.0 in [float(v) for v in t], "two or more taus including 1")],
        "max_iter": [Interval(int, 1, None)],
        "tol": [Interval(float, 0, None)],
    }
    _state = "weight_"
    _requires_y = False
    transductive = True

    def __init__(self, head: Any, counts: Any, taus: Sequence[float] = (0.0, 1.0, 2.0), *, max_iter: int = 1000,
                 tol: float = 1e-6):
        self.head = head
        self.counts = counts
        self.taus = taus
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, X: Any = None, y: Any = None) -> LogitAdjustedExperts:
        """Nothing to learn: takes the base head's layer and priors. X and y are ignored."""
        self._validate_params()
        self.weight_, self.bias_ = self.head.linear_form()
        C = self.weight_.shape[0]
        self.taus_ = torch.tensor(sorted(float(t) for t in self.taus), dtype=torch.float64)
        self.log_prior_ = train_prior(self.counts).log()
        self.base_prior_ = self.head.implied_prior(self.counts)
        self.n_features_in_ = self.weight_.shape[1]
        self.classes_ = np.arange(C)
        return self

    def implied_prior(self, counts: Any) -> torch.Tensor:
        raise NoImpliedPrior("the experts' combination adapts to the test prior it estimates itself")

    def _expert_prior(self, tau: torch.Tensor) -> torch.Tensor:
        """log q_τ (T, C) of the experts at ``tau`` (T,): log(p_base π^(−τ)) normalised."""
        logq = self.base_prior_.log()[None, :] - tau[:, None] * self.log_prior_[None, :]
        return logq - torch.logsumexp(logq, 1, keepdim=True)

    def combination(self, z: torch.Tensor) -> dict:
        """For base logits z (N, C): ``{"tau", "weights" (per expert), "prior" (p̂, C)}``."""
        from ..protocols import em_prior

        lp = self.log_prior_.to(z.device)
        balanced = normalise(self._expert_prior(torch.ones(1, dtype=torch.float64))[0].exp())
        p_hat, _ = em_prior(z.double() - lp.to(z.device), balanced, max_iter=self.max_iter, tol=self.tol)
        grid = torch.linspace(float(self.taus_[0]), float(self.taus_[-1]), TAU_GRID, dtype=torch.float64)
        p = p_hat.cpu().clamp_min(1e-300)
        kl = (p[None, :] * (p.log()[None, :] - self._expert_prior(grid))).sum(1)
        tau = float(grid[int(kl.argmin())])
        return {"tau": tau, "weights": self._weights(tau), "prior": p_hat.cpu()}

    def _weights(self, tau: float) -> list[float]:
        """Linear interpolation weights of the experts around ``tau`` (two non-zero, summing to 1)."""
        t = self.taus_.tolist()
        k = max(i for i in range(len(t) - 1) if t[i] <= tau) if tau < t[-1] else len(t) - 2
        a = (tau - t[k]) / (t[k + 1] - t[k])
        w = [0.0] * len(t)
        w[k], w[k + 1] = 1.0 - a, a
        return w

    def _scores(self, X: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k (z − τ_k log π) float32 (N, C) with the weights of these rows' estimated prior."""
        z = linear_logits(X, self.weight_, self.bias_)
        weights = torch.tensor(self.combination(z)["weights"], dtype=torch.float64)
        tau = float((weights * self.taus_).sum())
        return z - (tau * self.log_prior_).float().to(z.device)

    def scores_in_blocks(self, X: Any, rows: Optional[int] = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """Every row scored at once (the estimate is over all of them), then handed out in blocks."""
        check_is_fitted(self, self._state)
        s = self._forward(X)
        n = len(s)
        step = rows or max(n, 1)
        for start in range(0, max(n, 1), step):
            yield slice(start, min(start + step, n)), s[start:start + step]

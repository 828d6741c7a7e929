"""tau-normalisation (docs/METHODS.md, "τ-normalisation"): w_j / ||w_j||^tau, bias dropped."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..blocks import chunked_matmul, linear_logits
from ..metrics import accuracy_summary
from ..precision import PRECISIONS, fit_precision
from ..priors import uniform_prior
from .base import (
    ARRAY,
    NONE,
    BaseHead,
    Interval,
    StrOptions,
    as_tensor,
    check_counts,
    check_features,
    check_weight,
)

DEFAULT_TAUS = tuple(round(0.1 * i, 10) for i in range(21))  # linspace(0, 2, 21), the reference's grid
SELECT_METRICS = {"top1": "all", "mean_class": "mean_class", "few": "few"}


# float32 holds magnitudes up to e^88.7; products of scales and logits need room on both sides
_LOG_RANGE = 69.0  # |ln| of 1e30


def _log_norms(W: torch.Tensor) -> torch.Tensor:
    """ln ||w_j|| in float64 (C,); -inf for all-zero rows."""
    return W.double().norm(dim=1).log()


def tau_normalize(weight: Any, tau: float) -> torch.Tensor:
    """w_j / ||w_j||_2^tau for every class row of ``weight`` float (C, D), computed in float64.

    ValueError when a normalised row would leave float32's range (``tau`` far from 1 with norms far
    from 1): the message gives the range of tau that works for this classifier.
    """
    W = as_tensor(weight, torch.float32, getattr(weight, "device", "cpu"))
    logn = _log_norms(W)
    big = float(logn[torch.isfinite(logn)].abs().max()) if torch.isfinite(logn).any() else 0.0
    if abs(1 - tau) * big > _LOG_RANGE:  # the normalised rows have norms ||w||^(1 - tau)
        lo, hi = 1 - _LOG_RANGE / big, 1 + _LOG_RANGE / big
        raise ValueError(
            f"tau = {tau:g} puts this classifier's normalised rows outside float32's range (row norms "
            f"{math.exp(-big):.3g}..{math.exp(big):.3g} to the power 1 - tau); use tau in [{lo:.4g}, {hi:.4g}]"
        )
    return (W.double() / _norm_power(W, tau)[:, None]).float()


def _norm_power(W: torch.Tensor, tau: float) -> torch.Tensor:
    """||w_j||^tau in float64 (C,), norms clamped at 1e-12 (all-zero rows)."""
    return W.double().norm(dim=1).clamp_min(1e-12).pow(tau)


def tau_scales(weight: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """||w_j||^-tau float32 (T, C), each tau's row divided by its largest value (argmax unchanged).

    Computed in log space, so any tau whose scales fit float32 side by side works; ValueError naming
    the range of |tau| that does when some tau spreads them further (all-zero rows, whose logits are 0
    whatever their scale, get 1).
    """
    logn = _log_norms(weight)
    nz = torch.isfinite(logn)
    if not nz.any():
        return torch.ones(len(taus), len(logn), device=weight.device)
    spread = float(logn[nz].max() - logn[nz].min())
    worst = float(taus.abs().max()) if len(taus) else 0.0
    if worst * spread > _LOG_RANGE:
        raise ValueError(
            f"tau = {worst:g} cannot be applied to this classifier: its row norms differ by a factor "
            f"{math.exp(spread):.4g}, so ||w||^tau spans more than float32 can compare; use --taus within "
            f"|tau| <= {_LOG_RANGE / spread:.4g}"
        )
    a = -taus.double()[:, None] * torch.where(nz, logn, 0.0)[None, :]
    a = a - a[:, nz].amax(1, keepdim=True)
    return torch.where(nz, a, 0.0).exp().float()


def select_tau(curve: dict[str, Any], taus: Sequence[float], metric: str = "top1") -> float:
    """The τ of ``taus`` maximising ``curve[SELECT_METRICS[metric]]`` (T values); ties go to the smaller τ."""
    values = torch.nan_to_num(torch.as_tensor(curve[SELECT_METRICS[metric]], dtype=torch.float64), nan=-1.0)
    if (values < 0).all():
        raise ValueError(f"cannot select tau on {metric!r}: it is undefined on this split")
    return float(min(t for t, v in zip(taus, values.tolist()) if v == values.max()))


def tau_sweep(
    X: Any,
    y: Any,
    weight: Any,
    counts: Any,
    taus: Sequence[float] = DEFAULT_TAUS,
    *,
    chunk: int = 8192,
    logits: Optional[torch.Tensor] = None,
    precision: str = "float32",
    **thresholds: int,
) -> dict[str, torch.Tensor]:
    """Accuracy of tau-normalised classifiers for every tau, from ONE matmul of X with W (none when
    ``logits``, X Wᵀ float32 (N, C) on W's device, are given: see :func:`chunked_matmul`).

    logits(tau) = (X Wᵀ) scaled column-wise by ||w_j||^-tau (:func:`tau_scales`, rescaled per tau), so
    X Wᵀ is computed once (in row chunks of ``chunk``) and only the argmax is taken per tau. The argmax over all classes is
    not repeated for every tau: a bound over the whole tau range keeps, per row, only the classes
    that can win at some tau (usually a handful), and the per-tau argmax runs over those; the
    predictions are exactly those of ``argmax(logits * ||w||^-tau)`` (see :func:`_sweep_argmax`).
    ``precision``: of the GEMM ("float32", "bfloat16", "tf32"; :func:`lt_rebalance.blocks.mm`); the
    scaling and argmax are float32.

    Returns
    -------
    dict of float64 (T,) tensors: ``all``, ``mean_class``, ``many``, ``medium``, ``few``.
    """
    W, X, y, taus_t = sweep_inputs(X, y, weight, counts, taus)
    scale = tau_scales(W, taus_t)  # (T, C)
    pred = torch.empty(len(taus_t), X.shape[0], dtype=torch.int64, device=W.device)
    bounds = _scale_bounds(scale) if torch.isfinite(W).all() else None

    def fill(base: torch.Tensor, s: slice) -> None:
        for b in range(0, len(base), _BLOCK):  # blocks that stay in cache
            block = base[b : b + _BLOCK]
            _sweep_argmax(block, scale, bounds, pred[:, s.start + b : s.start + b + len(block)])

    chunked_matmul(X, W, fill, chunk, logits, precision)
    return accuracy_summary(pred, y, counts, **thresholds)


def sweep_inputs(
    X: Any, y: Any, weight: Any, counts: Any, taus: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inputs of a one-GEMM sweep on ``weight``'s device, checked against each other:
    W float32 (C, D), X (N, D) in its stored float dtype
    (checked; upcast per chunk by the sweep), y int64 (N,) in [0, C), counts of length C, taus float32 (T,)."""
    W = check_weight(weight, getattr(weight, "device", "cpu"))
    X, y = check_features(X, y, n_features=W.shape[1], classes=np.arange(W.shape[0]), device=W.device,
                          expecting="weight")
    check_counts(counts, W.shape[0])
    return W, X, y, torch.as_tensor(list(taus), dtype=torch.float32, device=W.device)


# Relative slack of the candidate bounds: far above float32 rounding (~1e-7 per operation), so
# rounding can never drop a class that attains the maximum (or ties with it) at some tau.
_SLACK = 1e-4
_MAX_CANDIDATE_FRACTION = 0.125  # beyond this, the plain per-tau argmax is as fast
_BLOCK = 2048  # rows per candidate search


def _scale_bounds(scale: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Per-class upper and lower bounds (C,) over tau of ``scale`` divided by a per-tau constant.

    Dividing every tau's scale by the same positive constant c_t (here the scale of a class of
    middle norm) does not change that tau's argmax but makes the ranges over tau narrow, so the
    bounds are tight. None when the scales are degenerate (empty, non-finite or not positive).
    """
    if scale.numel() == 0 or not torch.isfinite(scale).all() or not (scale > 0).all():
        return None
    logs = scale.log()
    mid = (logs.amax(1, keepdim=True) + logs.amin(1, keepdim=True)) / 2  # (T, 1)
    rel = (logs - mid).exp()  # (T, C), scale / c_t
    hi, lo = rel.amax(0) * (1 + _SLACK), rel.amin(0) * (1 - _SLACK)
    if not (torch.isfinite(hi).all() and (lo > 0).all()):
        return None
    return hi, lo


def _sweep_argmax(base: torch.Tensor, scale: torch.Tensor, bounds, out: torch.Tensor) -> None:
    """``out[t] = argmax_j base[:, j] * scale[t, j]`` for every t (first index on ties).

    With ``bounds`` = (hi, lo): for a row, u_j = max(b_j hi_j, b_j lo_j) bounds b_j scale[t, j] / c_t
    from above and l_j = min(...) from below, for every t. A class whose u_j is below the row's
    largest l_k is beaten by class k at every tau, so it can be neither the maximum nor tied with
    it; the exact products are then compared only among the remaining candidates, in class order.
    """
    T, C = scale.shape
    n = base.shape[0]
    if bounds is not None and n and T > 1:
        hi, lo = bounds
        P, Q = base * hi, base * lo
        floor = torch.minimum(P, Q).amax(1, keepdim=True)  # a lower bound of every tau's row maximum
        cand = torch.maximum(P, Q, out=P) >= floor
        del Q
        per_row = cand.sum(1)
        K = int(per_row.max())
        if K <= _MAX_CANDIDATE_FRACTION * C:
            rows, cols = cand.nonzero(as_tuple=True)  # row-major: classes in increasing order per row
            pos = torch.arange(len(rows), device=base.device) - (per_row.cumsum(0) - per_row)[rows]
            # candidates packed to the left of (n, K); padding is -inf and loses every comparison
            cols_k = torch.zeros(n, K, dtype=torch.int64, device=base.device)
            cols_k[rows, pos] = cols
            base_k = base.new_full((n, K), -torch.inf)
            base_k[rows, pos] = base[rows, cols]
            best = (base_k[None] * scale[:, cols_k]).argmax(2)  # (T, n): the same products as below
            out.copy_(torch.gather(cols_k.expand(T, n, K), 2, best[..., None])[..., 0])
            return
    for t in range(T):
        torch.argmax(base * scale[t], dim=1, out=out[t])


class TauNorm(BaseHead):
    """tau-normalised stored classifier, with tau selected on a held-out split.

    Parameters
    ----------
    weight : float (C, D)
        The joint (stage-1) classifier weight; its bias is dropped, as in the reference.
    tau : float or None, default=None
        A fixed tau; None selects it in :meth:`fit` from ``taus`` on the data given there.
    taus : sequence of float, default=linspace(0, 2, 21)
    metric : {"top1", "mean_class", "few"}, default="top1"
        What the selection maximises (ties go to the smaller tau).
    precision : {"float32", "bfloat16", "tf32", "auto"}, default="float32"
        Arithmetic of the sweep's GEMM and of scoring (:mod:`lt_rebalance.precision`).

    Attributes
    ----------
    tau_ : float
        The tau in use.
    curve_ : dict of (T,) tensors or None
        Accuracies per tau on the selection split (None for a fixed tau).
    weight_ : float32 (C, D)
        The normalised weight.
    precision_ : str
        The precision the products ran in ("float32", "bfloat16" or "tf32").
    classes_ : ndarray (C,)
        arange(C): row j of ``weight`` is class j, and labels must be ints in [0, C).

    Notes
    -----
    ``predict_proba`` is softmax(X w̃ᵀ). Dividing the rows by ||w_j||^τ changes the logits'
    scale with τ, so these are rankings, not calibrated probabilities (at τ = 1 they are cosine
    similarities times ||x||). Fit :class:`~lt_rebalance.posthoc.TemperatureScaled` on val.
    """

    _parameter_constraints = {
        "weight": [ARRAY],
        "tau": [NONE, Interval(float, None, None)],
        "metric": [StrOptions(set(SELECT_METRICS))],
        "precision": [StrOptions(set(PRECISIONS))],
    }
    _state = "weight_"

    def __init__(
        self,
        weight: Any,
        tau: Optional[float] = None,
        *,
        taus: Sequence[float] = DEFAULT_TAUS,
        metric: str = "top1",
        device: str = "cpu",
        precision: str = "float32",
    ):
        self.weight = weight
        self.tau = tau
        self.taus = taus
        self.metric = metric
        self.device = device
        self.precision = precision

    def fit(self, X: Any = None, y: Any = None, counts: Any = None, *, logits: Optional[torch.Tensor] = None
            ) -> TauNorm:
        """Select tau on (X, y) (the val split) unless ``tau`` is fixed; ``counts`` are train counts.
        ``logits``: X Wᵀ already computed (float32 (N, C), on the head's device), used by the sweep."""
        self._validate_params()
        W = check_weight(self.weight, self.device)
        classes = np.arange(W.shape[0])
        self.precision_ = fit_precision(self.precision, W.device, "tau_norm")
        if self.tau is None:
            if X is None or y is None or counts is None:
                raise ValueError("TauNorm with tau=None selects tau on data: pass X, y and counts to fit")
            X, y = check_features(X, y, n_features=W.shape[1], classes=classes, device=W.device, expecting="weight")
            self.curve_ = tau_sweep(X, y, W, counts, self.taus, logits=logits, precision=self.precision_)
            self.tau_ = select_tau(self.curve_, self.taus, self.metric)
        else:
            self.curve_, self.tau_ = None, float(self.tau)
        self.weight_ = tau_normalize(W, self.tau_)
        self.n_features_in_ = W.shape[1]
        self.classes_ = classes
        return self

    def implied_prior(self, counts: Any) -> torch.Tensor:
        """Uniform: τ-normalisation is the paper's balanced classifier."""
        return uniform_prior(counts)

    def logit_affine(self) -> tuple[torch.Tensor, None]:
        """(||w||^-tau, None): scores = (X Wᵀ) ⊙ ||w||^-tau."""
        return _norm_power(as_tensor(self.weight, torch.float32, self.weight_.device), self.tau_).reciprocal().float(), None

    def linear_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w̃ float32 (C, D), zeros (C,)): the normalised weight, bias dropped."""
        return self.weight_, torch.zeros(self.weight_.shape[0], device=self.weight_.device)

    def _scores(self, X: torch.Tensor) -> torch.Tensor:
        """Logits float32 (N, C) = X w̃ᵀ (no bias)."""
        return linear_logits(X, self.weight_, precision=self.precision_)

"""tau-normalisation (REFERENCE.md, "τ-normalisation"): w_j / ||w_j||^tau, bias dropped."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..metrics import accuracy_summary
from .base import ARRAY, NONE, BaseHead, Interval, StrOptions, as_tensor, check_features, check_is_fitted

DEFAULT_TAUS = tuple(round(0.1 * i, 10) for i in range(21))  # linspace(0, 2, 21), the reference's grid
SELECT_METRICS = {"top1": "all", "mean_class": "mean_class", "few": "few"}


def tau_normalize(weight: Any, tau: float) -> torch.Tensor:
    """w_j / ||w_j||_2^tau for every class row of ``weight`` float (C, D)."""
    W = as_tensor(weight, torch.float32, getattr(weight, "device", "cpu"))
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(tau)


def tau_sweep(
    X: Any,
    y: Any,
    weight: Any,
    counts: Any,
    taus: Sequence[float] = DEFAULT_TAUS,
    *,
    chunk: int = 8192,
    **thresholds: int,
) -> dict[str, torch.Tensor]:
    """Accuracy of tau-normalised classifiers for every tau, from ONE matmul of X with W.

    logits(tau) = (X Wᵀ) scaled column-wise by ||w_j||^-tau, so X Wᵀ is computed once (in row
    chunks of ``chunk``) and only the argmax is taken per tau.

    Returns
    -------
    dict of float64 (T,) tensors: ``all``, ``mean_class``, ``many``, ``medium``, ``few``.
    """
    W = as_tensor(weight, torch.float32, getattr(weight, "device", "cpu"))
    X = check_features(X, n_features=W.shape[1], device=W.device)
    y = as_tensor(y, torch.int64, W.device)
    taus_t = torch.as_tensor(list(taus), dtype=torch.float32, device=W.device)
    scale = W.norm(dim=1).clamp_min(1e-12)[None, :].pow(-taus_t[:, None])  # (T, C)
    pred = torch.empty(len(taus_t), X.shape[0], dtype=torch.int64, device=W.device)
    for start in range(0, X.shape[0], chunk):
        s = slice(start, min(start + chunk, X.shape[0]))
        base = X[s] @ W.T
        for t in range(len(taus_t)):
            torch.argmax(base * scale[t], dim=1, out=pred[t, s])
    return accuracy_summary(pred, y, counts, **thresholds)


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

    Attributes
    ----------
    tau_ : float
        The tau in use.
    curve_ : dict of (T,) tensors or None
        Accuracies per tau on the selection split (None for a fixed tau).
    weight_ : float32 (C, D)
        The normalised weight.
    """

    _parameter_constraints = {
        "weight": [ARRAY],
        "tau": [NONE, Interval(float, None, None)],
        "metric": [StrOptions(set(SELECT_METRICS))],
    }

    def __init__(
        self,
        weight: Any,
        tau: Optional[float] = None,
        *,
        taus: Sequence[float] = DEFAULT_TAUS,
        metric: str = "top1",
        device: str = "cpu",
    ):
        self.weight = weight
        self.tau = tau
        self.taus = taus
        self.metric = metric
        self.device = device

    def fit(self, X: Any = None, y: Any = None, counts: Any = None) -> TauNorm:
        """Select tau on (X, y) (the val split) unless ``tau`` is fixed; ``counts`` are train counts."""
        self._validate_params()
        W = as_tensor(self.weight, torch.float32, self.device)
        if self.tau is None:
            if X is None or y is None or counts is None:
                raise ValueError("TauNorm with tau=None selects tau on data: pass X, y and counts to fit")
            self.curve_ = tau_sweep(X, y, W, counts, self.taus)
            values = self.curve_[SELECT_METRICS[self.metric]]
            if torch.isnan(values).all():
                raise ValueError(f"cannot select tau on {self.metric!r}: it is undefined on this split")
            values = torch.nan_to_num(values, nan=-1.0)
            best = (values == values.max()).nonzero().flatten().tolist()
            self.tau_ = float(min(list(self.taus)[i] for i in best))  # ties go to the smaller tau
        else:
            self.curve_, self.tau_ = None, float(self.tau)
        self.weight_ = tau_normalize(W, self.tau_)
        self.n_features_in_ = W.shape[1]
        return self

    def decision_function(self, X: Any) -> torch.Tensor:
        """Logits float32 (N, C) = X w̃ᵀ (no bias)."""
        check_is_fitted(self, "weight_")
        return check_features(X, n_features=self.n_features_in_, device=self.device) @ self.weight_.T

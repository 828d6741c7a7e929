"""A learning-rate × weight-decay grid of cRT heads trained in one pass, selected on val."""
from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .base import BaseHead, Is
from .crt import CRT
from .training import Schedule

_NUMBERS = Is(
    lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, (int, float)) for x in v),
    "a non-empty sequence of numbers",
)


class CRTGrid(BaseHead):
    """Train one :class:`CRT` per (lr, weight_decay) of ``lrs`` × ``weight_decays`` in one pass.

    The G heads form one [G·C, D] linear layer: every step draws ONE batch (and one view per row)
    for all of them and runs one GEMM, while each head keeps its own learning rate, weight decay,
    momentum buffer and best epoch. Each head equals the head a lone ``CRT`` with the same seed
    trains (same initialisation, batches and view draws). The head with the best val top-1 is
    selected (ties: the earlier grid entry).

    Parameters
    ----------
    estimator : CRT
        Every other setting (epochs, sampler, loss, seed, ...); its lr and weight_decay are ignored.
    lrs : sequence of float
    weight_decays : sequence of float
        The grid is their product, lr varying slowest.

    Attributes
    ----------
    estimators_ : list of G fitted CRT
        In grid order, each with its ``lr``, ``weight_decay``, ``weight_``, ``bias_``, ``history_``.
    val_scores_ : float64 (G,)
        Best val top-1 of each head (-inf for a head whose training diverged).
    best_index_ : int
    best_estimator_ : CRT
    classes_ : ndarray (C,)
        As :class:`CRT`'s.
    """

    _parameter_constraints = {
        "estimator": [Is(lambda v: isinstance(v, CRT), "a CRT")],
        "lrs": [_NUMBERS],
        "weight_decays": [_NUMBERS],
    }
    _state = "best_estimator_"

    def __init__(self, estimator: CRT, lrs: Sequence[float], weight_decays: Sequence[float]):
        self.estimator = estimator
        self.lrs = lrs
        self.weight_decays = weight_decays

    @property
    def grid(self) -> list[tuple[float, float]]:
        """(lr, weight_decay) of each head, in grid order."""
        return list(itertools.product(self.lrs, self.weight_decays))

    def fit(
        self,
        X: Any,
        y: Any,
        X_val: Any,
        y_val: Any,
        *,
        views: Any = None,
        num_classes: Optional[int] = None,
    ) -> CRTGrid:
        """Train every head on (X, y), select on (X_val, y_val); the arguments of :meth:`CRT.fit`."""
        self._validate_params()
        if X_val is None or y_val is None:
            raise ValueError("a cRT grid selects its head on val data: pass X_val and y_val")
        params = self.estimator.get_params()
        trainer = CRT(**params)
        self.classes_, members, plan = trainer._fit_members(X, y, X_val, y_val, views, num_classes, self.grid)
        self.estimators_ = _fitted(params, [{"lr": lr, "weight_decay": wd} for lr, wd in self.grid],
                                   self.classes_, members, plan, trainer.precision_)
        self.val_scores_ = torch.tensor(
            [-float("inf") if e.history_.diverged else max(e.history_.val) for e in self.estimators_],
            dtype=torch.float64,
        )
        self.best_index_ = int(self.val_scores_.argmax())
        self.best_estimator_ = self.estimators_[self.best_index_]
        self.n_features_in_ = self.best_estimator_.n_features_in_
        return self

    @property
    def _device(self) -> torch.device:
        return self.best_estimator_._device

    def implied_prior(self, counts: Any) -> torch.Tensor:
        """The selected head's."""
        return self.best_estimator_.implied_prior(counts)

    def linear_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.best_estimator_.linear_form()

    def _scores(self, X: torch.Tensor) -> torch.Tensor:
        """Logits float32 (N, C) of the selected head."""
        return self.best_estimator_._scores(X)


def fit_seeds(
    estimator: CRT,
    seeds: Sequence[int],
    X: Any,
    y: Any,
    X_val: Any = None,
    y_val: Any = None,
    *,
    views: Any = None,
    num_classes: Optional[int] = None,
) -> list[CRT]:
    """One fitted :class:`CRT` per seed (``estimator``'s other settings), trained in one pass.

    Member g has the initialisation, batch stream and view draws of a lone ``CRT(seed=seeds[g])``
    run, and equals it up to float32 rounding of the batched GEMM; each step is one
    (G, B, D) x (G, D, C) batched GEMM for all seeds.
    """
    params = estimator.get_params()
    trainer = CRT(**params)
    trainer._validate_params()
    grid = [(trainer.lr, trainer.weight_decay)] * len(seeds)
    classes, members, plan = trainer._fit_members(X, y, X_val, y_val, views, num_classes, grid, seeds=list(seeds))
    return _fitted(params, [{"seed": seed} for seed in seeds], classes, members, plan, trainer.precision_)


def _fitted(params: dict, settings: Sequence[dict], classes: np.ndarray, members: Sequence[tuple],
            plan: Schedule, precision: str = "float32") -> list[CRT]:
    """A fitted CRT per member: ``params`` updated by its ``settings``, with ``classes``, its (weight, bias,
    history), the ``plan`` (epochs, batch size) all members ran and the ``precision`` they ran in."""
    out = []
    for extra, (W, b, hist) in zip(settings, members):
        est = CRT(**{**params, **extra})
        est.weight_, est.bias_, est.history_, est.n_features_in_ = W, b, hist, W.shape[1]
        est.classes_, est.schedule_, est.precision_ = classes, plan, precision
        out.append(est)
    return out

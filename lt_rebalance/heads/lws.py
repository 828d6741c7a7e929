"""Learnable weight scaling (REFERENCE.md, "LWS"): logit_j = s_j (w_j·x + b_j), only s trained."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..samplers import make_sampler
from .base import ARRAY, NONE, BaseHead, Interval, as_tensor, check_features, resolve_device
from .training import (
    DEFAULT_BATCH_SIZE,
    ProgressFn,
    effective_batch_size,
    flush_tiny_gradient,
    sgd_constraints,
    train_sgd,
)


class LWS(BaseHead):
    """Per-class scales on the frozen joint classifier, trained with class-balanced sampling.

    Because W and b are frozen, the joint logits of the train rows are computed once (one GEMM)
    and every step only rescales cached logits. When N x C floats exceed ``max_cache_gb``
    (e.g. iNaturalist: 437k x 8142), the logits of each batch are computed from its features instead.

    Cached-feature caveat: the reference trains s on freshly augmented images through the frozen
    backbone; here s sees the cached eval-transform features.

    Parameters
    ----------
    weight, bias : float (C, D), (C,) or None
        The joint classifier (frozen).
    epochs, lr, batch_size, momentum, weight_decay, sampler, schedule, seed
        Reference defaults: 5 epochs, lr 0.2 (Places-LT: 0.1), batch 512 (shrunk to the train
        rows on a smaller set), momentum 0.9, weight decay 5e-4 on s, class-balanced sampling,
        cosine schedule.
    keep_best : bool, default=True
        Keep the epoch with the best val top-1 when val data is given to ``fit``.

    Attributes
    ----------
    scales_ : float32 (C,)
    weight_, bias_ : float32 (C, D), (C,)
        The folded head s·W, s·b (a plain linear layer).
    classes_ : ndarray (C,)
        arange(C): row j of ``weight`` is class j, and labels must be ints in [0, C).
    history_ : TrainHistory

    Notes
    -----
    ``predict_proba`` is softmax(s ⊙ joint logits): trained by cross-entropy under class-balanced
    sampling, so it estimates p(class | x) for a balanced prior; only s is learnt, so it is no
    better calibrated than the joint head. Use :class:`~lt_rebalance.posthoc.TemperatureScaled`.
    """

    _parameter_constraints = {
        **sgd_constraints(),
        "weight": [ARRAY],
        "bias": [ARRAY, NONE],
        "max_cache_gb": [Interval(float, 0, None)],
    }
    _state = "weight_"

    def __init__(
        self,
        weight: Any,
        bias: Optional[Any] = None,
        *,
        epochs: int = 5,
        lr: float = 0.2,
        batch_size: int = DEFAULT_BATCH_SIZE,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        sampler: Any = "cb",
        schedule: str = "cosine",
        keep_best: bool = True,
        seed: int = 0,
        device: str = "auto",
        max_cache_gb: float = 4.0,
        progress: Optional[ProgressFn] = None,
    ):
        self.weight = weight
        self.bias = bias
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.sampler = sampler
        self.schedule = schedule
        self.keep_best = keep_best
        self.seed = seed
        self.device = device
        self.max_cache_gb = max_cache_gb
        self.progress = progress

    def _joint_logits(self, X: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self._b, X, self._W.T)

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> LWS:
        """Train the scales on (X, y); (X_val, y_val) select the best epoch."""
        self._validate_params()
        device = resolve_device(self.device)
        self._W = as_tensor(self.weight, torch.float32, device)
        C, D = self._W.shape
        self._b = torch.zeros(C, device=device) if self.bias is None else as_tensor(self.bias, torch.float32, device)
        classes = np.arange(C)
        X, y = check_features(X, y, n_features=D, classes=classes, device=device, min_samples=1, expecting="weight")
        cache = X.shape[0] * C * 4 <= self.max_cache_gb * 2**30
        with torch.no_grad():
            Z = self._joint_logits(X) if cache else None
        s = torch.ones(C, device=device, requires_grad=True)

        def batch_loss(idx: torch.Tensor) -> torch.Tensor:
            z = Z[idx] if cache else self._joint_logits(X[idx])
            return F.cross_entropy(flush_tiny_gradient(z * s), y[idx])

        validate = None
        if X_val is not None:
            Xv, yv = check_features(X_val, y_val, n_features=D, classes=classes, device=device, expecting="weight")
            with torch.no_grad():
                Zv = self._joint_logits(Xv)

            def validate() -> float:
                return ((Zv * s).argmax(1) == yv).float().mean().item()

        gen = torch.Generator().manual_seed(self.seed)
        self.history_ = train_sgd(
            [s],
            batch_loss,
            make_sampler(self.sampler, y.cpu(), C),
            epochs=self.epochs,
            lr=self.lr,
            batch_size=effective_batch_size(self.batch_size, X.shape[0]),
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            schedule=self.schedule,
            generator=gen,
            validate=validate,
            keep_best=self.keep_best,
            progress=self.progress,
        )
        self.scales_ = s.detach()
        self.weight_ = self._W * self.scales_[:, None]
        self.bias_ = self._b * self.scales_
        self.n_features_in_ = D
        self.classes_ = classes
        del self._W, self._b
        return self

    def _scores(self, X: torch.Tensor) -> torch.Tensor:
        """Logits float32 (N, C) = s ⊙ (X Wᵀ + b)."""
        return torch.addmm(self.bias_, X, self.weight_.T)

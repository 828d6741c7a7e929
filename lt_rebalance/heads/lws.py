"""Learnable weight scaling (REFERENCE.md, "LWS"): logit_j = s_j (w_j·x + b_j), only s trained."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..samplers import make_sampler
from ..blocks import SCORE_ROWS, all_finite, available_memory, linear_logits, row_blocks
from .base import (
    ARRAY,
    NONE,
    BaseHead,
    Interval,
    StrOptions,
    check_bias,
    check_features,
    check_weight,
    resolve_device,
)
from .training import AUTO, ProgressFn, flush_tiny_gradient, plan_schedule, sgd_constraints, train_sgd

REFERENCE_EPOCHS = 5  # the paper's LWS setting


CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class LWS(BaseHead):
    """Per-class scales on the frozen joint classifier, trained with class-balanced sampling.

    Because W and b are frozen, the joint logits of the train (and val) rows are computed once (one
    GEMM, in float32, a block of rows at a time) and cached in ``cache_dtype``; every step only
    rescales cached logits, upcast to float32 per batch (the scales, loss and gradients are float32).
    The default float16 cache halves the memory of a float32 one (iNaturalist 2018: 437k x 8142
    logits are 7.1 GB instead of 14 GB) at a relative rounding error of at most 2^-11 per logit;
    logits beyond float16's range (|z| > 65504) are cached in bfloat16 instead. When the cache does
    not fit ``max_cache_gb``, the logits of each batch are computed from its features (exact float32,
    one GEMM per batch: several times slower).

    Cached-feature caveat: the reference trains s on freshly augmented images through the frozen
    backbone; here s sees the cached eval-transform features.

    Parameters
    ----------
    weight, bias : float (C, D), (C,) or None
        The joint classifier (frozen).
    epochs : int or "auto", default="auto"
        "auto": the reference's 5, raised to ceil(500 / batches per epoch) when that gives fewer
        than 500 optimiser steps (small files); an explicit value is used as given (a
        FewStepsWarning below 500 steps).
    batch_size : int or "auto", default="auto"
        "auto": 512, or N // 8 on fewer than 4096 train rows (at least 8 batches an epoch); an
        explicit value above the train rows is an error.
    lr, momentum, weight_decay, sampler, schedule, seed
        Reference defaults: lr 0.2 (Places-LT: 0.1), momentum 0.9, weight decay 5e-4 on s,
        class-balanced sampling, cosine schedule.
    keep_best : bool, default=True
        Keep the epoch with the best val top-1 when val data is given to ``fit``.
    cache_dtype : {"float16", "bfloat16", "float32"}, default="float16"
        Precision of the cached joint logits (see above).
    max_cache_gb : float or None, default=None
        Largest cache (train + val logits) in GiB; None: 80% of the memory available when ``fit``
        starts (``MemAvailable``; 4 GiB when unknown).

    Attributes
    ----------
    scales_ : float32 (C,)
    cache_dtype_ : str or None
        The precision the logits were cached in; None when they were recomputed per batch.
    weight_, bias_ : float32 (C, D), (C,)
        The folded head s·W, s·b (a plain linear layer).
    classes_ : ndarray (C,)
        arange(C): row j of ``weight`` is class j, and labels must be ints in [0, C).
    history_ : TrainHistory
    schedule_ : Schedule
        The epochs, batch size and optimiser steps actually run.

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
        "max_cache_gb": [Interval(float, 0, None), NONE],
        "cache_dtype": [StrOptions(set(CACHE_DTYPES))],
    }
    _state = "weight_"

    def __init__(
        self,
        weight: Any,
        bias: Optional[Any] = None,
        *,
        epochs: int | str = AUTO,
        lr: float = 0.2,
        batch_size: int | str = AUTO,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        sampler: Any = "cb",
        schedule: str = "cosine",
        keep_best: bool = True,
        seed: int = 0,
        device: str = "auto",
        cache_dtype: str = "float16",
        max_cache_gb: Optional[float] = None,
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
        self.cache_dtype = cache_dtype
        self.max_cache_gb = max_cache_gb
        self.progress = progress

    def _joint_logits(self, X: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self._b, X.float(), self._W.T)

    def _cache_fits(self, rows: int, num_classes: int) -> bool:
        budget = self.max_cache_gb * 2**30 if self.max_cache_gb is not None else 0.8 * (available_memory() or 4 * 2**30)
        return rows * num_classes * CACHE_DTYPES[self.cache_dtype].itemsize <= budget

    def _cached_logits(self, X: torch.Tensor) -> torch.Tensor:
        """Joint logits of X in ``cache_dtype_`` (float16 falls back to bfloat16 on overflow)."""
        Z = linear_logits(X, self._W, self._b, dtype=CACHE_DTYPES[self.cache_dtype_])
        if self.cache_dtype_ == "float16" and not all_finite(Z):
            self.cache_dtype_ = "bfloat16"
            Z = linear_logits(X, self._W, self._b, dtype=torch.bfloat16)
        return Z

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> LWS:
        """Train the scales on (X, y); (X_val, y_val) select the best epoch."""
        self._validate_params()
        device = resolve_device(self.device)
        self._W = check_weight(self.weight, device)
        C, D = self._W.shape
        self._b = check_bias(self.bias, C, device)
        classes = np.arange(C)
        X, y = check_features(X, y, n_features=D, classes=classes, device=device, min_samples=1, expecting="weight")
        self.schedule_ = plan = plan_schedule(X.shape[0], self.epochs, self.batch_size, REFERENCE_EPOCHS)
        if X_val is not None:
            Xv, yv = check_features(X_val, y_val, n_features=D, classes=classes, device=device, expecting="weight")
        n_val = 0 if X_val is None else len(Xv)
        self.cache_dtype_ = self.cache_dtype if self._cache_fits(X.shape[0] + n_val, C) else None
        with torch.no_grad():
            Z = self._cached_logits(X) if self.cache_dtype_ else None
        s = torch.ones(C, device=device, requires_grad=True)

        def batch_loss(idx: torch.Tensor) -> torch.Tensor:
            z = Z[idx].float() if Z is not None else self._joint_logits(X[idx])
            return F.cross_entropy(flush_tiny_gradient(z * s), y[idx])

        validate = None
        if X_val is not None:
            with torch.no_grad():  # val logits: cached like the train ones (float32 without a train cache)
                Zv = self._cached_logits(Xv) if self.cache_dtype_ else linear_logits(Xv, self._W, self._b)

            def validate() -> float:
                hits = sum(((Zv[r].float() * s).argmax(1) == yv[r]).sum() for r in row_blocks(len(yv), SCORE_ROWS))
                return float(hits) / len(yv) if len(yv) else float("nan")  # one device sync per epoch

        gen = torch.Generator().manual_seed(self.seed)
        self.history_ = train_sgd(
            [s],
            batch_loss,
            make_sampler(self.sampler, y.cpu(), C),
            epochs=plan.epochs,
            lr=self.lr,
            batch_size=plan.batch_size,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            schedule=self.schedule,
            generator=gen,
            validate=validate,
            keep_best=self.keep_best,
            progress=self.progress,
            step_work=plan.batch_size * C * (1 if Z is not None else D),
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
        return linear_logits(X, self.weight_, self.bias_)

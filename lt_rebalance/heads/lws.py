"""Learnable weight scaling (docs/METHODS.md, "LWS"): logit_j = s_j (w_j·x + b_j), only s trained.

:class:`JointLogitCalibration` is the training path shared with MARC (:mod:`.marc`): a per-class
affine map of the frozen joint logits, trained from cached logits with the SGD loop of cRT and
the closed-form cross-entropy gradient of :mod:`.losses`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..blocks import (
    SCORE_ROWS,
    all_finite,
    column_affine,
    device_memory,
    linear_logits,
    low_mm,
    low_precision,
    row_blocks,
    tf32_products,
)
from ..devices import resolve_device
from ..precision import PRECISIONS, fit_precision
from ..samplers import final_class_probabilities, make_sampler
from .base import (
    ARRAY,
    NONE,
    BaseHead,
    Interval,
    StrOptions,
    check_bias,
    check_features,
    check_weight,
)
from .linear import LinearDecision
from .losses import LAS_SHAPES, LOSSES, STEP_WORK_PER_LOGIT, affine_cross_entropy, grw_weights, las_smoothing
from .training import (
    AUTO,
    DEFAULT_BATCH_SIZE,
    EpochBatches,
    ProgressFn,
    plan_schedule,
    sgd_constraints,
    train_sgd,
)

REFERENCE_EPOCHS = 5  # the paper's LWS setting (MARC: the same)
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def cache_budget(max_cache_gb: Optional[float], device: Optional[torch.device | str] = None) -> float:
    """Bytes a joint-logit cache may take: ``max_cache_gb`` GiB, or 80 % of the memory available now on
    ``device`` (a CUDA device's free memory, :func:`~lt_rebalance.blocks.device_memory`; the host's
    otherwise; 4 GiB when unknown)."""
    return max_cache_gb * 2**30 if max_cache_gb is not None else 0.8 * (device_memory(device) or 4 * 2**30)


@dataclass
class JointLogits:
    """The joint logits z = X Wᵀ + b of the train rows and of the val rows, as a fit uses them.

    ``train``: (N, C) in ``dtype``, or None when they do not fit the budget (each batch's logits are
    then computed from its features); ``val``: (Nv, C) (float32 when train is not cached) or None
    without val rows; ``dtype``: the cache precision ("float16", "bfloat16", "float32"), None when
    not cached.
    """

    train: Optional[torch.Tensor]
    val: Optional[torch.Tensor]
    dtype: Optional[str]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.train, self.val) if t is not None)

    def check(self, rows: int, val_rows: int, num_classes: int) -> None:
        """ValueError unless these are logits of ``rows`` train and ``val_rows`` val rows of C classes."""
        for name, t, n in (("train", self.train, rows), ("val", self.val, val_rows)):
            if t is not None and tuple(t.shape) != (n, num_classes):
                raise ValueError(f"joint {name} logits have shape {tuple(t.shape)}, expected ({n}, {num_classes})")


def cache_joint_logits(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor, Xv: Optional[torch.Tensor],
                       cache_dtype: str = "float16", max_cache_gb: Optional[float] = None,
                       precision: str = "float32") -> JointLogits:
    """The joint logits of X (and Xv) with (W, b), one GEMM per split, a block of rows at a time.

    Cached in ``cache_dtype`` when train and val together fit :func:`cache_budget`; float16 falls back
    to bfloat16 when a logit overflows it; without room, train logits are left to each batch and
    val logits are float32. ``precision``: of the GEMMs (:func:`lt_rebalance.blocks.linear_logits`).
    """
    n_val = 0 if Xv is None else len(Xv)
    fits = (len(X) + n_val) * W.shape[0] * CACHE_DTYPES[cache_dtype].itemsize <= cache_budget(max_cache_gb, W.device)
    dtype = cache_dtype if fits else None

    def cached(x: torch.Tensor) -> torch.Tensor:
        nonlocal dtype
        Z = linear_logits(x, W, b, dtype=CACHE_DTYPES[dtype], precision=precision)
        if dtype == "float16" and not all_finite(Z):
            dtype = "bfloat16"
            del Z  # freed before the bfloat16 cache is allocated
            Z = linear_logits(x, W, b, dtype=torch.bfloat16, precision=precision)
        return Z

    with torch.no_grad():
        Z = cached(X) if dtype else None
        Zv = None if Xv is None else cached(Xv) if dtype else linear_logits(Xv, W, b, precision=precision)
    return JointLogits(Z, Zv, dtype)


class JointLogitCalibration(LinearDecision, BaseHead):
    """Per-class parameters on the frozen joint logits z = X Wᵀ + b, trained by SGD.

    The calibrated logits are a per-class affine map of the joint ones, z ⊙ a + c. Subclasses say
    which parameters (:meth:`_init_params`), how they give a and c (:meth:`_affine`) and how the
    result folds into a plain linear layer (:meth:`_fold`, which sets ``weight_`` and ``bias_``).
    Because W and b are frozen, the joint logits of the train (and val) rows are computed once
    (one GEMM, float32, a block of rows at a time) and cached in ``cache_dtype``; every step only
    transforms cached logits, upcast to float32 per batch (parameters, loss and gradients are float32). The default float16 cache
    halves a float32 one (iNaturalist 2018: 437k x 8142 logits are 7.1 GB instead of 14 GB) at a
    relative rounding error of at most 2^-11 per logit; logits beyond float16's range
    (|z| > 65504) are cached in bfloat16. When the cache does not fit ``max_cache_gb`` (None: 80 %
    of the memory available when ``fit`` starts, 4 GiB when unknown), each batch's logits are
    computed from its features (exact float32). ``cache_dtype_`` records the precision used (None:
    recomputed). The constructor arguments are documented in :class:`LWS` (MARC and DisAlign
    restate them with their own defaults). Subclass hooks besides those: :meth:`_settings` (the
    settings in effect), :meth:`_batch_loss` and :meth:`_calibrate` (heads whose logits are not a
    per-class affine map, with ``_needs_features``), :meth:`_finish` (fitted attributes).
    """

    _parameter_constraints = {
        **sgd_constraints(),
        "weight": [ARRAY],
        "bias": [ARRAY, NONE],
        "max_cache_gb": [Interval(float, 0, None), NONE],
        "cache_dtype": [StrOptions(set(CACHE_DTYPES))],
        "loss": [StrOptions(set(LOSSES))],
        "rho": [Interval(float, 0, None)],
        "smooth_head": [Interval(float, 0, 1, closed="left")],
        "smooth_tail": [Interval(float, 0, 1, closed="left")],
        "smooth_shape": [StrOptions(set(LAS_SHAPES))],
        "precision": [StrOptions(set(PRECISIONS))],
    }
    _reference_epochs = REFERENCE_EPOCHS
    _reference_batch = DEFAULT_BATCH_SIZE

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
        loss: str = "ce",
        rho: float = 1.2,
        smooth_head: float = 0.3,
        smooth_tail: float = 0.0,
        smooth_shape: str = "concave",
        progress: Optional[ProgressFn] = None,
        precision: str = "float32",
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
        self.loss = loss
        self.rho = rho
        self.smooth_head = smooth_head
        self.smooth_tail = smooth_tail
        self.smooth_shape = smooth_shape
        self.progress = progress
        self.precision = precision

    def _settings(self) -> dict[str, Any]:
        """The training settings in effect: ``lr``, ``weight_decay``, ``sampler``, ``schedule``, ``loss``,
        ``epoch_batches``, ``reference_epochs`` and ``reference_batch`` (what "auto" stands for, and
        the batches of an epoch: :func:`~.training.plan_schedule`); MARC resolves its protocol here."""
        return {"lr": self.lr, "weight_decay": self.weight_decay, "sampler": self.sampler,
                "schedule": self.schedule, "loss": self.loss, "epoch_batches": "full",
                "reference_epochs": self._reference_epochs, "reference_batch": self._reference_batch}

    def _loss_terms(self, loss: str, counts: torch.Tensor) -> dict[str, Optional[torch.Tensor]]:
        """``class_weights`` and ``smoothing`` (C,) of ``loss`` for train counts (C,) (None: unused)."""
        return {
            "class_weights": grw_weights(counts, self.rho).to(counts.device) if loss == "grw" else None,
            "smoothing": (las_smoothing(counts.cpu(), self.smooth_head, self.smooth_tail, self.smooth_shape)
                          .to(counts.device) if loss == "las" else None),
        }

    def _record(self, settings: dict[str, Any]) -> dict[str, Any]:
        """``protocol_params_``: what was run (lr, batch, epochs, sampler, loss and its options)."""
        plan = self.schedule_
        out = {k: v for k, v in settings.items() if not k.startswith("reference_")}
        out = {**out, "epochs": plan.epochs, "batch_size": plan.batch_size,
               "steps_per_epoch": plan.batches_per_epoch, "steps": plan.steps}
        if settings["loss"] == "grw":
            out["rho"] = self.rho
        if settings["loss"] == "las":
            out.update(smooth_head=self.smooth_head, smooth_tail=self.smooth_tail, smooth_shape=self.smooth_shape)
        return out

    def implied_prior(self, counts: Any) -> torch.Tensor:
        """The class prior float64 (C,) the trained scores are balanced for (docs/METHODS.md,
        "Implied priors"): the sampler's p_j ∝ n_j^q times the loss's class weights (GRW:
        n_j^−ρ); label smoothing leaves it unchanged. A class without train rows counts as one."""
        settings = self._settings()
        logp = final_class_probabilities(counts, settings["sampler"]).log()
        if settings["loss"] == "grw":
            logp = logp - self.rho * torch.as_tensor(counts, dtype=torch.float64).clamp_min(1).log()
        return torch.softmax(logp, 0)

    def _init_params(self, W: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _affine(self, params: list[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:  # pragma: no cover
        """(a, c), float32 (C,) each (c may be None: no shift), with calibrated logits z ⊙ a + c."""
        raise NotImplementedError

    def _calibrate(self, z: torch.Tensor, params: list[torch.Tensor], x: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
        """Calibrated logits of joint logits z (n, C) whose features are x (n, D) (unused here)."""
        return column_affine(z, *self._affine(params))

    def _batch_loss(self, z: torch.Tensor, y: torch.Tensor, x: Optional[torch.Tensor], params: list[torch.Tensor],
                    terms: dict) -> torch.Tensor:
        """The mean loss of a batch: joint logits z (B, C), labels y (B,), features x (B, D) or None
        when not needed (:attr:`_needs_features`); ``terms`` from :meth:`_loss_terms`."""
        return affine_cross_entropy(z, y, *self._affine(params), **terms)

    _needs_features = False  # whether _batch_loss and _calibrate use the features of the rows
    _method = "lws"  # the registry name whose precision policy applies (lt_rebalance.precision)

    def _finish(self, W: torch.Tensor, b: torch.Tensor, fitted: list[torch.Tensor]) -> None:
        """Set the fitted attributes from the trained parameters."""
        self._joint_scale = self._affine(fitted)[0]  # weight_ = a ⊙ W (see logit_affine)
        self._fold(W, b, fitted)

    def logit_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, bias_): scores = (X Wᵀ) ⊙ a + bias_."""
        return self._joint_scale, self.bias_

    def _fold(self, W: torch.Tensor, b: torch.Tensor, params: list[torch.Tensor]) -> None:  # pragma: no cover
        raise NotImplementedError

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None, *,
            joint_logits: Optional[JointLogits] = None):
        """Train the parameters on (X, y); (X_val, y_val) select the best epoch.

        ``joint_logits``: the joint logits of these very X and X_val with this ``weight`` and
        ``bias``, already computed (:func:`cache_joint_logits`; ``ltr compare`` shares one between LWS
        and MARC through :class:`lt_rebalance.logit_store.LogitStore`); None: computed here.
        """
        self._validate_params()
        device = resolve_device(self.device)
        precision = self.precision_ = fit_precision(self.precision, device, self._method)
        low = low_precision(precision)
        W = check_weight(self.weight, device)
        C, D = W.shape
        b = check_bias(self.bias, C, device)
        classes = np.arange(C)
        X, y = check_features(X, y, n_features=D, classes=classes, device=device, min_samples=1, expecting="weight")
        run = self._settings()
        self.schedule_ = plan = plan_schedule(X.shape[0], self.epochs, self.batch_size, run["reference_epochs"],
                                              reference_batch=run["reference_batch"],
                                              epoch_batches=run["epoch_batches"])
        terms = self._loss_terms(run["loss"], torch.bincount(y, minlength=C))
        Xv = yv = None
        if X_val is not None:
            Xv, yv = check_features(X_val, y_val, n_features=D, classes=classes, device=device, expecting="weight")
        if joint_logits is None:
            joint_logits = cache_joint_logits(W, b, X, Xv, self.cache_dtype, self.max_cache_gb, precision)
        joint_logits.check(len(X), 0 if Xv is None else len(Xv), C)
        Z, Zv, self.cache_dtype_ = joint_logits.train, joint_logits.val, joint_logits.dtype
        params = [p.requires_grad_() for p in self._init_params(W)]
        Wl = None if low is None else W.T.to(low)  # batches whose logits are not cached: rounded once

        def joint(x: torch.Tensor) -> torch.Tensor:  # logits of a batch's features (not cached)
            if low is None:
                with tf32_products(precision == "tf32" and x.is_cuda):
                    return torch.addmm(b, x.float(), W.T)
            return low_mm(x.to(low), Wl).add_(b)

        def batch_loss(idx: torch.Tensor) -> torch.Tensor:
            z = Z.index_select(0, idx) if Z is not None else joint(X[idx])
            return self._batch_loss(z, y[idx], X[idx].float() if self._needs_features else None, params, terms)

        validate = None
        if Xv is not None:

            def validate() -> float:  # a block of val rows at a time, one device sync per epoch
                hits = sum((self._calibrate(Zv[r].float(), params, Xv[r].float() if self._needs_features else None)
                            .argmax(1) == yv[r]).sum()
                           for r in row_blocks(len(yv), SCORE_ROWS))
                return float(hits) / len(yv) if len(yv) else float("nan")

        gen = torch.Generator().manual_seed(self.seed)
        self.history_ = train_sgd(
            params,
            batch_loss,
            EpochBatches(make_sampler(run["sampler"], y.cpu(), C), run["epoch_batches"]),
            epochs=plan.epochs,
            lr=run["lr"],
            batch_size=plan.batch_size,
            momentum=self.momentum,
            weight_decay=run["weight_decay"],
            schedule=run["schedule"],
            generator=gen,
            validate=validate,
            keep_best=self.keep_best,
            progress=self.progress,
            step_work=plan.batch_size * C * (STEP_WORK_PER_LOGIT if Z is not None else D),
        )
        self._finish(W, b, [p.detach() for p in params])
        self.protocol_params_ = self._record(run)
        self.n_features_in_ = D
        self.classes_ = classes
        return self


class LWS(JointLogitCalibration):
    """Per-class scales on the frozen joint classifier, trained with class-balanced sampling.

    Because W and b are frozen, the joint logits are computed once and cached, by default in
    float16 (see :class:`JointLogitCalibration`: precision, ``max_cache_gb``); every step only
    rescales cached logits.

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
        Precision of the cached joint logits.
    max_cache_gb : float or None, default=None
        Largest cache (train + val logits) in GiB; None: 80% of the memory available at ``fit``.
    loss : {"ce", "grw", "las"}, default="ce"
        Cross-entropy; "grw": weighted by the generalized re-weighting w_j ∝ n_j^−``rho``
        (DisAlign); "las": label-aware smoothing (MiSLAS stage 2) with ε from ``smooth_tail`` (the
        smallest class) to ``smooth_head`` (the largest) along ``smooth_shape``. docs/METHODS.md.
    rho : float, default=1.2
        The GRW exponent (used by loss="grw").
    smooth_head, smooth_tail : float in [0, 1), default=0.3, 0.0
        Label-aware smoothing of the largest and the smallest class (MiSLAS' ImageNet-LT values).
    smooth_shape : {"concave", "linear", "convex"}, default="concave"
    precision : {"float32", "bfloat16", "tf32", "auto"}, default="float32"
        Arithmetic of the joint-logit GEMMs (the cache build, or each batch when not cached) and of
        scoring (:mod:`lt_rebalance.precision`); the parameters, loss and gradients stay float32.

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
    protocol_params_ : dict
        What was run: lr, weight_decay, sampler, schedule, loss (and rho or the smoothing), epochs,
        batch_size, steps_per_epoch, steps.

    Notes
    -----
    ``predict_proba`` is softmax(s ⊙ joint logits): trained by cross-entropy under class-balanced
    sampling, so it estimates p(class | x) for a balanced prior; only s is learnt, so it is no
    better calibrated than the joint head. Use :class:`~lt_rebalance.posthoc.TemperatureScaled`.
    """

    def _init_params(self, W: torch.Tensor) -> list[torch.Tensor]:
        return [torch.ones(W.shape[0], device=W.device)]

    def _affine(self, params: list[torch.Tensor]) -> tuple[torch.Tensor, None]:
        return params[0], None

    def _fold(self, W: torch.Tensor, b: torch.Tensor, params: list[torch.Tensor]) -> None:
        (self.scales_,) = params
        self.weight_ = W * self.scales_[:, None]
        self.bias_ = b * self.scales_

"""Classifier re-training (docs/METHODS.md, "cRT"): a fresh linear head on frozen features."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..blocks import (
    SCORE_ROWS,
    float32_rows,
    linear_logits,
    low_mm,
    low_precision,
    mm,
    row_blocks,
    tf32_products,
)
from ..devices import resolve_device
from ..precision import PRECISIONS, fit_precision
from ..priors import normalise
from ..samplers import final_class_probabilities, make_sampler
from .base import BaseHead, Interval, StrOptions, as_tensor, check_features, check_fit_data
from .losses import LAS_SHAPES, las_smoothing, smoothed_nll
from .training import (
    AUTO,
    ProgressFn,
    Schedule,
    TrainHistory,
    flush_denormals,
    flush_tiny_gradient,
    plan_schedule,
    sgd_constraints,
    train_sgd_members,
)

REFERENCE_EPOCHS = 10  # the reference's cRT epochs (iNaturalist: 30)

LOSSES = ("ce", "balanced-softmax", "las")
CLASS_WEIGHTS = ("none", "cb")


def class_balanced_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Cui et al. (CVPR 2019): w_j ∝ (1 - beta) / (1 - beta^n_j), normalised to sum to C.

    1 - beta^n is computed as -expm1(n log beta), exact for beta next to 1 (where 1 - beta^n
    cancels) and for large n; the common factor 1 - beta cancels in the normalisation.
    """
    n = counts.to(torch.float64).clamp_min(1)
    w = 1 / -torch.expm1(n * math.log(beta))
    return (w / w.sum() * len(counts)).to(torch.float32)


def default_linear_init(num_classes: int, dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's ``nn.Linear`` initialisation: weight and bias ~ U(-1/sqrt(D), 1/sqrt(D))."""
    bound = 1 / math.sqrt(dim)
    w = (torch.rand(num_classes, dim, generator=generator) * 2 - 1) * bound
    b = (torch.rand(num_classes, generator=generator) * 2 - 1) * bound
    return w, b


class CRT(BaseHead):
    """Re-train a linear classifier on cached features with (by default) class-balanced sampling.

    Defaults are the reference's: fresh ``nn.Linear`` initialisation, cross-entropy, SGD momentum
    0.9, weight decay 5e-4, lr 0.2, batch 512, 10 epochs (iNaturalist: 30 epochs, wd 1e-4),
    cosine schedule, the epoch with the best val top-1 kept. On small files the defaults adapt
    (``"auto"``, :func:`~lt_rebalance.heads.training.plan_schedule`): the batch shrinks to give at
    least 8 batches an epoch, and the epochs rise until training takes at least 500 optimiser steps.

    Cached-feature caveat: the reference re-trains on freshly augmented images with the backbone
    in train mode (BatchNorm statistics keep moving). On fixed features this cannot be exact; with
    K augmented train views cached at extraction (``views`` in :meth:`fit`), every step draws a
    random view per row, the faithful approximation. See docs/METHODS.md.

    Parameters
    ----------
    epochs : int or "auto", default="auto"
        "auto": 10, raised to ceil(500 / batches per epoch) when that gives fewer than 500 steps.
        An explicit value is used as given (a FewStepsWarning below 500 steps).
    batch_size : int or "auto", default="auto"
        "auto": 512, or N // 8 on fewer than 4096 train rows (at least 8 batches an epoch); an
        explicit value above the train rows is an error.
    lr, momentum, weight_decay, sampler, schedule, seed
        See above; ``sampler`` is 'ib', 'cb', 'sqrt', 'pb' or a power q.
    keep_best : bool, default=True
        Keep the epoch with the best val top-1 (when val data is given to ``fit``).
    loss : {"ce", "balanced-softmax", "las"}, default="ce"
        Balanced Softmax (Ren et al., NeurIPS 2020) trains on z_j + log n_j and predicts with z_j.
        "las": label-aware smoothing (Zhong et al., MiSLAS, CVPR 2021): class j's label is
        smoothed by ε_j, from ``smooth_tail`` (smallest class) to ``smooth_head`` (largest) along
        ``smooth_shape`` (docs/METHODS.md); it replaces ``label_smoothing``.
    class_weights : {"none", "cb"}, default="none"
        "cb": class-balanced loss weights (Cui et al., CVPR 2019) with ``beta``.
    beta : float, default=0.9999
    label_smoothing : float, default=0.0
    smooth_head, smooth_tail : float in [0, 1), default=0.3, 0.0
        Label-aware smoothing of the largest and smallest class (loss="las"; MiSLAS' ImageNet-LT values).
    smooth_shape : {"concave", "linear", "convex"}, default="concave"
    device : str, default="auto"
    precision : {"float32", "bfloat16", "tf32", "auto"}, default="float32"
        Arithmetic of the forward and backward GEMMs and of scoring (:mod:`lt_rebalance.precision`):
        "bfloat16" rounds each batch, the weights (per step) and the logits' gradient to bfloat16
        for the products; the master weights, momentum, softmax, loss and selection stay float32.

    Attributes
    ----------
    weight_ : float32 (C, D)
    bias_ : float32 (C,)
        Row j is class ``classes_[j]``.
    classes_ : ndarray (C,)
        The sorted train labels, or arange(num_classes) when ``fit`` is given ``num_classes``
        (classes without train rows keep their row).
    history_ : TrainHistory
        Per-epoch loss, lr, val top-1 and the kept epoch.
    schedule_ : Schedule
        The epochs, batch size and optimiser steps actually run.

    Notes
    -----
    ``predict_proba`` is softmax(logits): the head's own cross-entropy model, but trained under
    ``sampler`` (class-balanced by default), so it estimates p(class | x) for a *balanced*
    class prior, not the train or test prior. With ``loss="balanced-softmax"`` the same holds
    by construction. Calibrate on val with :class:`~lt_rebalance.posthoc.TemperatureScaled`.
    """

    _parameter_constraints = {
        **sgd_constraints(),
        "loss": [StrOptions(set(LOSSES))],
        "class_weights": [StrOptions(set(CLASS_WEIGHTS))],
        "beta": [Interval(float, 0, 1, closed="neither")],
        "label_smoothing": [Interval(float, 0, 1, closed="left")],
        "smooth_head": [Interval(float, 0, 1, closed="left")],
        "smooth_tail": [Interval(float, 0, 1, closed="left")],
        "smooth_shape": [StrOptions(set(LAS_SHAPES))],
        "precision": [StrOptions(set(PRECISIONS))],
    }
    _state = "weight_"

    def __init__(
        self,
        *,
        epochs: int | str = AUTO,
        lr: float = 0.2,
        batch_size: int | str = AUTO,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        sampler: Any = "cb",
        schedule: str = "cosine",
        keep_best: bool = True,
        loss: str = "ce",
        class_weights: str = "none",
        beta: float = 0.9999,
        label_smoothing: float = 0.0,
        smooth_head: float = 0.3,
        smooth_tail: float = 0.0,
        smooth_shape: str = "concave",
        seed: int = 0,
        device: str = "auto",
        progress: Optional[ProgressFn] = None,
        precision: str = "float32",
    ):
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.sampler = sampler
        self.schedule = schedule
        self.keep_best = keep_best
        self.loss = loss
        self.class_weights = class_weights
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.smooth_head = smooth_head
        self.smooth_tail = smooth_tail
        self.smooth_shape = smooth_shape
        self.seed = seed
        self.device = device
        self.progress = progress
        self.precision = precision

    def fit(
        self,
        X: Any,
        y: Any,
        X_val: Any = None,
        y_val: Any = None,
        *,
        views: Any = None,
        num_classes: Optional[int] = None,
    ) -> CRT:
        """Train on (X, y), float (N, D) and labels (N,); (X_val, y_val) select the best epoch.
        float16 features stay float16 (each batch is upcast).

        ``views``: optional (K, N, D) augmented train features (any float dtype); each step then
        draws one of the K views per row. ``num_classes``: the labels are ints in [0, num_classes)
        (classes_ = arange(num_classes)); by default classes_ are the distinct labels of y.
        """
        self.classes_, [(self.weight_, self.bias_, self.history_)], self.schedule_ = self._fit_members(
            X, y, X_val, y_val, views, num_classes, [(self.lr, self.weight_decay)]
        )
        self.n_features_in_ = self.weight_.shape[1]
        return self

    def _fit_members(
        self,
        X: Any,
        y: Any,
        X_val: Any,
        y_val: Any,
        views: Any,
        num_classes: Optional[int],
        grid: Sequence[tuple[float, float]],
        seeds: Optional[Sequence[int]] = None,
    ) -> tuple[np.ndarray, list[tuple[torch.Tensor, torch.Tensor, TrainHistory]], Schedule]:
        """Train one head per (lr, weight_decay) of ``grid`` in one pass: classes_, (weight, bias, history)
        of each, and the :class:`Schedule` (epochs, batch size) every member ran.

        Every member starts from the same initialisation and sees the same batches and view draws
        as a lone run with this seed; the G heads form one [G·C, D] layer, so a step is one GEMM.
        ``seeds`` (one per grid entry): member g instead has the initialisation, batches and view
        draws of a lone run with seed ``seeds[g]``; a step is then one batched GEMM (G, B, D) x (G, D, C).
        """
        for lr, wd in grid:
            CRT(**{**self.get_params(), "lr": lr, "weight_decay": wd})._validate_params()
        if self.loss == "las" and self.label_smoothing > 0:
            raise ValueError(f"label_smoothing={self.label_smoothing} applies to loss 'ce' only; loss 'las' sets its "
                             "own per-class smoothing (smooth_head, smooth_tail)")
        device = resolve_device(self.device)
        precision = self.precision_ = fit_precision(self.precision, device, "crt")
        low = low_precision(precision)
        X, y, classes = check_fit_data(X, y, num_classes, device)
        N, D = X.shape
        C = len(classes)
        counts = torch.bincount(y, minlength=C).to(device)
        plan = plan_schedule(N, self.epochs, self.batch_size, REFERENCE_EPOCHS, stacklevel=4)
        if views is not None:  # the K views stay where they are (CPU): each batch's rows move, not all K·N
            on = views.device if isinstance(views, torch.Tensor) else "cpu"
            views = as_tensor(views, views.dtype if isinstance(views, torch.Tensor) else torch.float32, on)
            if views.ndim != 3 or views.shape[1:] != (N, D):
                raise ValueError(f"views must have shape (K, {N}, {D}); got {tuple(views.shape)}")

        G = len(grid)
        if seeds is not None and len(seeds) != G:
            raise ValueError(f"{len(seeds)} seeds for {G} grid entries")
        gens = [torch.Generator().manual_seed(s) for s in (seeds if seeds is not None else [self.seed])]
        inits = [default_linear_init(C, D, g) for g in gens]
        # (G, C, D) and (G, C): one initialisation repeated, or one per seed
        W = torch.stack([w for w, _ in inits]).to(device).expand(G, -1, -1).contiguous().requires_grad_()
        b = torch.stack([v for _, v in inits]).to(device).expand(G, -1).contiguous().requires_grad_()
        shift = torch.log(counts.float().clamp_min(1)) if self.loss == "balanced-softmax" else None
        cw = class_balanced_weights(counts, self.beta) if self.class_weights == "cb" else None
        smoothing = (las_smoothing(counts.cpu(), self.smooth_head, self.smooth_tail, self.smooth_shape).to(device)
                     if self.loss == "las" else None)
        view_gens = [torch.Generator(device=device).manual_seed(s + 1) for s in (seeds if seeds is not None
                                                                                  else [self.seed])]

        grad_buffer = torch.empty(G * C, D, device=device)  # W's gradient, reused by every step

        def weight_gradient(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            """Hook on the logits' gradient g (n, G·C): W.grad = gᵀ x into the reused buffer, b.grad = Σ g.

            Autograd would return a fresh (G·C, D) tensor every step; at iNaturalist size (67 MB)
            its page faults cost about a tenth of the step."""
            g = flush_denormals(g)
            W.grad = mm(g.T, x, precision, out=grad_buffer).view(G, C, D)
            b.grad = g.sum(0).view(G, C)
            return g

        def logits(x: torch.Tensor) -> torch.Tensor:  # (n, G, C), one GEMM for all members
            # class-major (W xᵀ + b)ᵀ: the faster layout of PyTorch's CPU GEMM (blocks.linear_logits)
            if low is None:
                with tf32_products(precision == "tf32" and x.is_cuda):
                    z = torch.addmm(b.detach().view(-1, 1), W.detach().view(G * C, D), x.T).T.contiguous()
            else:  # bfloat16 operands (x already is), float32 logits and bias
                z = low_mm(W.detach().view(G * C, D).to(low), x.to(low).T)
                z = z.add_(b.detach().view(-1, 1)).T.contiguous()
            if torch.is_grad_enabled():  # a leaf: backward stops here, and the hook makes W's gradient
                z.requires_grad_().register_hook(lambda g: weight_gradient(g, x))
            return z.view(len(x), G, C)

        def draw(idx: torch.Tensor) -> torch.Tensor:
            """Features of rows ``idx`` (B,) or, one row set per member, (G, B): a random stored view each."""
            if views is None:
                # features stay in their stored dtype; each batch is upcast (or rounded to bfloat16)
                return X[idx].to(low or torch.float32)
            if idx.ndim == 1:
                v = torch.randint(0, views.shape[0], idx.shape, generator=view_gens[0], device=device)
            else:  # each member's own view stream, as in its lone run
                v = torch.stack([torch.randint(0, views.shape[0], idx.shape[1:], generator=g, device=device)
                                 for g in view_gens])
            return views[v.to(views.device), idx.to(views.device)].to(device=device, dtype=low or torch.float32)

        def batch_loss(idx: torch.Tensor) -> torch.Tensor:  # (G,) mean loss of each member
            xb = draw(idx)
            if idx.ndim == 1:  # shared batch: z (B, G, C)
                z, yb = logits(xb), y[idx][:, None].expand(-1, G)
            else:  # a batch per member: one batched GEMM, z (B, G, C)
                if low is None:
                    with tf32_products(precision == "tf32" and xb.is_cuda):
                        z = torch.baddbmm(b[:, None, :], xb, W.transpose(1, 2))
                else:  # autograd rounds the weight's gradient product to bfloat16 likewise
                    z = torch.bmm(xb, W.to(low).transpose(1, 2)).float() + b[:, None, :]
                z = flush_tiny_gradient(z).transpose(0, 1)
                yb = y[idx].T
            if shift is not None:
                z = z + shift
            if smoothing is not None:  # per-class smoothing, weighted as cross_entropy(weight=cw) weighs
                loss = smoothed_nll(z.reshape(-1, C), yb.reshape(-1), smoothing)
                loss = (loss if cw is None else loss * cw[yb.reshape(-1)]).view(-1, G)
            else:
                loss = F.cross_entropy(
                    z.reshape(-1, C), yb.reshape(-1), weight=cw, label_smoothing=self.label_smoothing,
                    reduction="none",
                ).view(-1, G)
            return loss.sum(0) / (idx.shape[-1] if cw is None else cw[yb].sum(0))

        validate = None
        if X_val is not None:
            Xv, yv = check_features(X_val, y_val, n_features=D, classes=classes, device=device)

            def validate() -> torch.Tensor:  # top-1 of every member, a block of val rows at a time
                hits = sum(((logits(float32_rows(Xv, s) if low is None else Xv[s].to(low)).argmax(2)
                             == yv[s, None]).sum(0)
                            for s in row_blocks(len(yv), SCORE_ROWS)), torch.zeros(G, device=device))
                return hits / len(yv)

        hists = train_sgd_members(
            [W, b],
            batch_loss,
            make_sampler(self.sampler, y.cpu(), C),
            epochs=plan.epochs,
            lrs=[lr for lr, _ in grid],
            batch_size=plan.batch_size,
            momentum=self.momentum,
            weight_decays=[wd for _, wd in grid],
            schedule=self.schedule,
            generator=gens[0] if seeds is None else gens,
            validate=validate,
            keep_best=self.keep_best,
            progress=self.progress,
            step_work=plan.batch_size * D * C * G,
        )
        return classes, [(W[g].detach().clone(), b[g].detach().clone(), h) for g, h in enumerate(hists)], plan

    def implied_prior(self, counts: Any) -> torch.Tensor:
        """The sampler's p_j ∝ n_j^q, times the class-balanced loss weights when used, divided by n_j
        for Balanced Softmax (docs/METHODS.md, "Evaluation protocols")."""
        n = torch.as_tensor(counts, dtype=torch.float64).clamp_min(1)
        p = final_class_probabilities(counts, self.sampler)
        if self.class_weights == "cb":
            p = p * class_balanced_weights(torch.as_tensor(counts), self.beta).to(torch.float64)
        if self.loss == "balanced-softmax":
            p = p / n
        return normalise(p)

    def linear_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight_, self.bias_

    def _scores(self, X: torch.Tensor) -> torch.Tensor:
        """Logits float32 (N, C)."""
        return linear_logits(X, self.weight_, self.bias_, precision=self.precision_)

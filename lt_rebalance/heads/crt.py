"""Classifier re-training (REFERENCE.md, "cRT"): a fresh linear head on frozen features."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..samplers import make_sampler
from .base import BaseHead, Interval, StrOptions, as_tensor, check_features, check_is_fitted, resolve_device
from .training import ProgressFn, TrainHistory, flush_tiny_gradient, sgd_constraints, train_sgd_members

LOSSES = ("ce", "balanced-softmax")
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
    cosine schedule, the epoch with the best val top-1 kept.

    Cached-feature caveat: the reference re-trains on freshly augmented images with the backbone
    in train mode (BatchNorm statistics keep moving). On fixed features this cannot be exact; with
    K augmented train views cached at extraction (``views`` in :meth:`fit`), every step draws a
    random view per row, the faithful approximation. See docs/METHODS.md.

    Parameters
    ----------
    epochs, lr, batch_size, momentum, weight_decay, sampler, schedule, seed
        See above; ``sampler`` is 'ib', 'cb', 'sqrt', 'pb' or a power q.
    keep_best : bool, default=True
        Keep the epoch with the best val top-1 (when val data is given to ``fit``).
    loss : {"ce", "balanced-softmax"}, default="ce"
        Balanced Softmax (Ren et al., NeurIPS 2020) trains on z_j + log n_j and predicts with z_j.
    class_weights : {"none", "cb"}, default="none"
        "cb": class-balanced loss weights (Cui et al., CVPR 2019) with ``beta``.
    beta : float, default=0.9999
    label_smoothing : float, default=0.0
    device : str, default="auto"

    Attributes
    ----------
    weight_ : float32 (C, D)
    bias_ : float32 (C,)
    history_ : TrainHistory
        Per-epoch loss, lr, val top-1 and the kept epoch.
    """

    _parameter_constraints = {
        **sgd_constraints(),
        "loss": [StrOptions(set(LOSSES))],
        "class_weights": [StrOptions(set(CLASS_WEIGHTS))],
        "beta": [Interval(float, 0, 1, closed="neither")],
        "label_smoothing": [Interval(float, 0, 1, closed="left")],
    }

    def __init__(
        self,
        *,
        epochs: int = 10,
        lr: float = 0.2,
        batch_size: int = 512,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        sampler: Any = "cb",
        schedule: str = "cosine",
        keep_best: bool = True,
        loss: str = "ce",
        class_weights: str = "none",
        beta: float = 0.9999,
        label_smoothing: float = 0.0,
        seed: int = 0,
        device: str = "auto",
        progress: Optional[ProgressFn] = None,
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
        self.seed = seed
        self.device = device
        self.progress = progress

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
        """Train on (X, y), float (N, D) and int (N,).

        ``views``: optional (K, N, D) augmented train features (any float dtype); each step then
        draws one of the K views per row. ``num_classes`` defaults to max(y) + 1.
        """
        (self.weight_, self.bias_, self.history_), = self._fit_members(
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
    ) -> list[tuple[torch.Tensor, torch.Tensor, TrainHistory]]:
        """Train one head per (lr, weight_decay) of ``grid`` in one pass: (weight, bias, history) each.

        Every member starts from the same initialisation and sees the same batches and view draws
        as a lone run with this seed; the G heads form one [G·C, D] layer, so a step is one GEMM.
        """
        for lr, wd in grid:
            CRT(**{**self.get_params(), "lr": lr, "weight_decay": wd})._validate_params()
        device = resolve_device(self.device)
        X, y = check_features(X, y, device=device)
        N, D = X.shape
        C = int(num_classes if num_classes is not None else y.max().item() + 1)
        if y.min() < 0 or y.max() >= C:
            raise ValueError(f"labels must lie in [0, {C}); got range [{int(y.min())}, {int(y.max())}]")
        counts = torch.bincount(y, minlength=C).to(device)
        if views is not None:
            views = as_tensor(views, views.dtype if isinstance(views, torch.Tensor) else torch.float32, device)
            if views.ndim != 3 or views.shape[1:] != (N, D):
                raise ValueError(f"views must have shape (K, {N}, {D}); got {tuple(views.shape)}")

        G = len(grid)
        gen = torch.Generator().manual_seed(self.seed)
        w0, b0 = default_linear_init(C, D, gen)
        W = w0.to(device).repeat(G, 1, 1).requires_grad_()  # (G, C, D): every member starts alike
        b = b0.to(device).repeat(G, 1).requires_grad_()  # (G, C)
        shift = torch.log(counts.float().clamp_min(1)) if self.loss == "balanced-softmax" else None
        cw = class_balanced_weights(counts, self.beta) if self.class_weights == "cb" else None
        view_gen = torch.Generator(device=device).manual_seed(self.seed + 1) if views is not None else None

        def logits(x: torch.Tensor) -> torch.Tensor:  # (n, G, C), one GEMM for all members
            return flush_tiny_gradient(torch.addmm(b.view(-1), x, W.view(G * C, D).T)).view(len(x), G, C)

        def batch_loss(idx: torch.Tensor) -> torch.Tensor:  # (G,) mean loss of each member
            if views is None:
                xb = X[idx]
            else:
                v = torch.randint(0, views.shape[0], idx.shape, generator=view_gen, device=device)
                xb = views[v, idx].float()
            z = logits(xb)
            if shift is not None:
                z = z + shift
            yb = y[idx]
            loss = F.cross_entropy(
                z.view(-1, C), yb.repeat_interleave(G), weight=cw, label_smoothing=self.label_smoothing,
                reduction="none",
            ).view(-1, G)
            return loss.sum(0) / (len(idx) if cw is None else cw[yb].sum())

        validate = None
        if X_val is not None:
            Xv, yv = check_features(X_val, y_val, n_features=D, num_classes=C, device=device)

            def validate() -> torch.Tensor:
                return (logits(Xv).argmax(2) == yv[:, None]).float().mean(0)

        hists = train_sgd_members(
            [W, b],
            batch_loss,
            make_sampler(self.sampler, y.cpu(), C),
            epochs=self.epochs,
            lrs=[lr for lr, _ in grid],
            batch_size=self.batch_size,
            momentum=self.momentum,
            weight_decays=[wd for _, wd in grid],
            schedule=self.schedule,
            generator=gen,
            validate=validate,
            keep_best=self.keep_best,
            progress=self.progress,
        )
        return [(W[g].detach().clone(), b[g].detach().clone(), h) for g, h in enumerate(hists)]

    def decision_function(self, X: Any) -> torch.Tensor:
        """Logits float32 (N, C)."""
        check_is_fitted(self, "weight_")
        X = check_features(X, n_features=self.n_features_in_, device=self.weight_.device)
        return torch.addmm(self.bias_, X, self.weight_.T)

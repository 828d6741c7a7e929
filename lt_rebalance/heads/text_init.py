"""Text-initialised cosine classifier (LIFT, Shi et al., ICML 2024) on frozen features
(docs/METHODS.md, "Text heads").

Scores s · cos(x, w_c); W starts from the class-name text embeddings (or at random, to compare) and
is trained by SGD with the logit-adjusted loss CE(s · cos(x, w) + τ log π, y) (Menon et al., ICLR 2021),
which trains the scores for a balanced class prior.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..blocks import SCORE_ROWS, float32_rows, row_blocks
from ..devices import resolve_device
from ..priors import normalise, train_prior
from ..samplers import final_class_probabilities, make_sampler
from .base import ARRAY, BaseHead, Interval, StrOptions, check_features, check_fit_data, check_weight
from .crt import default_linear_init
from .training import AUTO, ProgressFn, plan_schedule, sgd_constraints, train_sgd
from .zero_shot import cosine_logits

REFERENCE_EPOCHS = 10  # LIFT's ImageNet-LT schedule: 10 epochs of batch 128
REFERENCE_BATCH = 128
INITS = ("text", "random")


class TextInitCosine(BaseHead):
    """Cosine classifier initialised from text embeddings, trained with the logit-adjusted loss.

    Parameters
    ----------
    weight : float (C, D)
        The text head (one embedding per class); the initial W with ``init="text"``.
    scale : float, default=25.0
        s, LIFT's cosine-classifier scale.
    init : {"text", "random"}, default="text"
        "random": PyTorch's ``nn.Linear`` initialisation instead (the comparison LIFT makes).
    tau : float, default=1.0
        Weight of log π in the logit-adjusted loss (0: plain cross-entropy).
    epochs, batch_size : int or "auto"
        "auto": LIFT's 10 epochs of batch 128, lengthened to at least 500 steps on small files
        (:func:`~lt_rebalance.heads.training.plan_schedule`).
    lr, momentum, weight_decay, sampler, schedule, seed, keep_best, device
        SGD as in :class:`~lt_rebalance.heads.crt.CRT`; LIFT's lr 0.01, wd 5e-4, momentum 0.9, cosine,
        instance-balanced sampling.

    Attributes
    ----------
    weight_ : float32 (C, D), unit rows
    history_ : TrainHistory
    schedule_ : Schedule
    """

    _parameter_constraints = {
        **sgd_constraints(),
        "weight": [ARRAY],
        "scale": [Interval(float, 0, None, closed="neither")],
        "init": [StrOptions(set(INITS))],
        "tau": [Interval(float, None, None)],
    }
    _state = "weight_"

    def __init__(self, weight: Any, *, scale: float = 25.0, init: str = "text", tau: float = 1.0,
                 epochs: int | str = AUTO, lr: float = 0.01, batch_size: int | str = AUTO, momentum: float = 0.9,
                 weight_decay: float = 5e-4, sampler: Any = "ib", schedule: str = "cosine", keep_best: bool = True,
                 seed: int = 0, device: str = "auto", progress: Optional[ProgressFn] = None):
        self.weight = weight
        self.scale = scale
        self.init = init
        self.tau = tau
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
        self.progress = progress

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None,
            num_classes: Optional[int] = None) -> TextInitCosine:
        """Train on (X, y); with val rows, keep the epoch of the best val top-1."""
        self._validate_params()
        device = resolve_device(self.device)
        text = check_weight(self.weight, device)
        X, y, classes = check_fit_data(X, y, num_classes if num_classes is not None else len(text), device)
        N, D = X.shape
        C = len(classes)
        if text.shape != (C, D):
            raise ValueError(f"the text head has shape {tuple(text.shape)}, expected (C, D) = ({C}, {D})")
        plan = plan_schedule(N, self.epochs, self.batch_size, REFERENCE_EPOCHS, reference_batch=REFERENCE_BATCH,
                             stacklevel=3)
        gen = torch.Generator().manual_seed(self.seed)
        W0 = text if self.init == "text" else default_linear_init(C, D, gen)[0].to(device)
        W = F.normalize(W0, dim=1).clone().requires_grad_()
        Xn = torch.empty(N, D, device=device)  # unit rows, once
        for s in row_blocks(N, SCORE_ROWS):
            Xn[s] = F.normalize(float32_rows(X, s), dim=1)
        counts = torch.bincount(y, minlength=C)
        shift = (self.tau * train_prior(counts).log()).float().to(device)

        def batch_loss(idx: torch.Tensor) -> torch.Tensor:
            z = self.scale * Xn[idx] @ F.normalize(W, dim=1).T
            return F.cross_entropy(z + shift, y[idx])

        validate = None
        if X_val is not None:
            Xv, yv = check_features(X_val, y_val, n_features=D, classes=classes, device=device)

            def validate() -> float:
                Wn = F.normalize(W.detach(), dim=1)
                return cosine_logits(Xv, Wn, self.scale).argmax(1).eq(yv).double().mean().item()

        self.history_ = train_sgd([W], batch_loss, make_sampler(self.sampler, y.cpu(), C), epochs=plan.epochs,
                                  lr=self.lr, batch_size=plan.batch_size, momentum=self.momentum,
                                  weight_decay=self.weight_decay, schedule=self.schedule, generator=gen,
                                  validate=validate, keep_best=self.keep_best, progress=self.progress,
                                  step_work=plan.batch_size * D * C)
        self.weight_ = F.normalize(W.detach(), dim=1)
        self.schedule_ = plan
        self.classes_ = classes
        self.n_features_in_ = D
        return self

    def implied_prior(self, counts: Any) -> torch.Tensor:
        """The sampler's p_j ∝ n_j^q divided by π_j^τ (uniform for LIFT's instance-balanced sampler, τ = 1)."""
        n = torch.as_tensor(counts, dtype=torch.float64).clamp_min(1)
        return normalise(final_class_probabilities(counts, self.sampler) * (n / n.sum()) ** -self.tau)

    def _scores(self, X: torch.Tensor) -> torch.Tensor:
        """s · cos(x, w_c), float32 (N, C)."""
        return cosine_logits(X, self.weight_, self.scale)


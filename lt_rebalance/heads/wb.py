"""Weight balancing, stage 2 (Alshammari et al., CVPR 2022): fine-tune the classifier under MaxNorm."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..blocks import linear_logits, low_precision, tf32_products
from ..devices import resolve_device
from ..precision import PRECISIONS, fit_precision
from ..priors import normalise
from ..samplers import final_class_probabilities, make_sampler
from .base import (
    ARRAY,
    NONE,
    BaseHead,
    Interval,
    StrOptions,
    as_tensor,
    check_features,
)
from .crt import class_balanced_weights
from .linear import LinearDecision
from .training import (
    AUTO,
    SCHEDULES,
    EpochBatches,
    ProgressFn,
    flush_tiny_gradient,
    plan_schedule,
    sgd_constraints,
    train_sgd,
)

REFERENCE_EPOCHS, REFERENCE_BATCH = 10, 64  # the authors' second stage
PROTOCOLS = ("paper", "authors")
# projection, the schedule None stands for, and the batches of an epoch (docs/METHODS.md, "Weight balancing")
PROTOCOL_SETTINGS = {
    "paper": {"projection": "step", "schedule": "cosine", "epoch_batches": "full"},
    "authors": {"projection": "epoch", "schedule": "cosine-reference", "epoch_batches": "partial"},
}


def max_norm_radius(weight: torch.Tensor, thresh: float) -> torch.Tensor:
    """The authors' per-layer MaxNorm radius: min_j ‖w_j‖ + thresh · (max_j ‖w_j‖ − min_j ‖w_j‖)."""
    norms = torch.linalg.vector_norm(weight, dim=1)
    return norms.min() + thresh * (norms.max() - norms.min())


def project_max_norm(weight: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """In place: rows of ``weight`` (C, D) longer than ``radius`` are scaled back onto the ball."""
    norms = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
    return weight.mul_(torch.where(norms > radius, radius / norms, torch.ones_like(norms)))


def cb_softmax_bce(logits: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """The authors' ``CB_loss(..., "softmax", beta)``: binary cross-entropy of p = softmax(z) against
    the one-hot label, each row weighted by its class's weight, averaged over all n × C entries.

    Computed in log space: log p = log_softmax(z); log(1 − p_j) = log1p(−p_j) for every class but
    the row's largest (there p_j ≤ ½), and logsumexp_{k≠j} z_k − logsumexp z for the largest. This
    is the same value as ``F.binary_cross_entropy(z.softmax(1), ...)`` wherever the float32 softmax
    is not saturated; where it is (p_j rounds to 1 for a wrong class), that form clamps log 0 at
    −100 and its gradient (p − y) / max(p (1 − p), 1e-12) explodes.
    """
    logp = logits.log_softmax(1)
    log1mp = torch.log1p(-logp.exp().clamp_max(0.5))  # exact for all but the largest class of a row
    top = logits.argmax(1, keepdim=True)
    rest = logits.scatter(1, top, -torch.inf).logsumexp(1, keepdim=True) - logits.logsumexp(1, keepdim=True)
    log1mp = log1mp.scatter(1, top, rest)
    target = F.one_hot(y, logits.shape[1]).bool()
    return -(class_weights[y][:, None] * torch.where(target, logp, log1mp)).mean()


class WeightBalancing(LinearDecision, BaseHead):
    """Stage 2 of weight balancing: the joint classifier fine-tuned with a class-balanced loss,
    weight decay and a MaxNorm constraint.

    Starting from the stored classifier (W, b), SGD minimises the authors' class-balanced loss
    (Cui et al. weights with ``beta`` on the binary cross-entropy of the softmax) with weight
    decay on W and b; after every step each class row w_j is projected onto the ball
    ‖w_j‖ ≤ r (projected gradient descent), with r = min‖w‖ + thresh·(max‖w‖ − min‖w‖) of the
    starting classifier. The bias is not constrained. Defaults are the authors' public second
    stage (``demo2_second-stage-training.py``): lr 0.01, momentum 0.9, weight decay 0.1, batch 64,
    10 epochs (both "auto": lengthened on small files), cosine schedule, instance-balanced
    sampling, thresh 0.1, beta 0.9999; the epoch with the best val top-1 is kept.

    Two protocols (docs/METHODS.md): ``"paper"`` (default) projects after every step, as the
    paper's PGD, runs ⌊N/B⌋ full batches an epoch and the ``cosine`` schedule; ``"authors"``
    follows their code: it projects once per epoch (after the training pass, before validation),
    keeps the last partial batch (⌈N/B⌉ batches: a DataLoader without drop_last) and steps the
    cosine schedule before each epoch (``cosine-reference``: the last epoch runs at lr 0). Both
    keep the epoch with the best *val* top-1 (their code selects on the test split's mean
    per-class accuracy).

    Parameters
    ----------
    weight, bias : float (C, D), (C,) or None
        The joint classifier to start from.
    epochs : int or "auto", default="auto"
        "auto": the authors' 10, raised to ceil(500 / batches per epoch) when that gives fewer than
        500 optimiser steps (small files), the rule of cRT and LWS.
    batch_size : int or "auto", default="auto"
        "auto": the authors' 64, or N // 8 on fewer than 512 train rows (at least 8 batches an epoch).
    protocol : {"paper", "authors"}, default="paper"
    schedule : str or None, default=None
        None: the protocol's ("cosine"; authors: "cosine-reference").
    lr, momentum, weight_decay, sampler, keep_best, seed
        As for :class:`~lt_rebalance.heads.CRT` (defaults above).
    thresh : float, default=0.1
        Where the MaxNorm radius sits between the smallest and the largest starting row norm.
    beta : float, default=0.9999
        Class-balanced loss: w_c ∝ (1 − beta) / (1 − beta^n_c), summing to C.
    device : str, default="auto"
    precision : {"float32", "bfloat16", "tf32", "auto"}, default="float32"
        Arithmetic of the training and scoring GEMMs (:mod:`lt_rebalance.precision`); weights,
        momentum, loss and the MaxNorm projection stay float32.

    Attributes
    ----------
    weight_, bias_ : float32 (C, D), (C,)
    radius_ : float
        The MaxNorm radius r.
    norms_ : float32 (C,)
        ‖w_j‖ after training (each at most r).
    classes_ : ndarray (C,)
        arange(C): row j of ``weight`` is class j.
    history_ : TrainHistory
    schedule_ : Schedule
        The epochs, batch size and optimiser steps actually run.
    protocol_params_ : dict
        ``protocol`` and what it ran: lr, weight_decay, sampler, schedule, loss ("cb-softmax-bce"),
        beta, projection ("step" or "epoch"), epoch_batches, epochs, batch_size, steps_per_epoch, steps.

    References
    ----------
    Alshammari, Wang, Ramanan, Kong, *Long-tailed recognition via weight balancing*, CVPR 2022;
    code: github.com/ShadeAlsha/LTR-weight-balancing.
    """

    _parameter_constraints = {
        **sgd_constraints(),
        "weight": [ARRAY],
        "bias": [ARRAY, NONE],
        "thresh": [Interval(float, 0, None)],
        "beta": [Interval(float, 0, 1, closed="neither")],
        "protocol": [StrOptions(set(PROTOCOLS))],
        "schedule": [StrOptions(set(SCHEDULES)), NONE],
        "precision": [StrOptions(set(PRECISIONS))],
    }

    def __init__(
        self,
        weight: Any,
        bias: Optional[Any] = None,
        *,
        epochs: int | str = AUTO,
        lr: float = 0.01,
        batch_size: int | str = AUTO,
        momentum: float = 0.9,
        weight_decay: float = 0.1,
        sampler: Any = "ib",
        schedule: Optional[str] = None,
        keep_best: bool = True,
        thresh: float = 0.1,
        beta: float = 0.9999,
        protocol: str = "paper",
        seed: int = 0,
        device: str = "auto",
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
        self.thresh = thresh
        self.beta = beta
        self.protocol = protocol
        self.seed = seed
        self.device = device
        self.progress = progress
        self.precision = precision

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> WeightBalancing:
        """Fine-tune on (X, y), float (N, D) and int (N,); (X_val, y_val) select the best epoch."""
        self._validate_params()
        device = resolve_device(self.device)
        precision = self.precision_ = fit_precision(self.precision, device, "wb")
        low = low_precision(precision)
        W = as_tensor(self.weight, torch.float32, device).clone()
        C, D = W.shape
        b = torch.zeros(C, device=device) if self.bias is None else as_tensor(self.bias, torch.float32, device).clone()
        classes = np.arange(C)
        X, y = check_features(X, y, n_features=D, classes=classes, device=device, min_samples=1, expecting="weight")
        run = dict(PROTOCOL_SETTINGS[self.protocol])
        if self.schedule is not None:
            run["schedule"] = self.schedule
        self.schedule_ = plan = plan_schedule(X.shape[0], self.epochs, self.batch_size, REFERENCE_EPOCHS,
                                              reference_batch=REFERENCE_BATCH, epoch_batches=run["epoch_batches"])
        cw = class_balanced_weights(torch.bincount(y, minlength=C), self.beta)
        radius = max_norm_radius(W, self.thresh)
        W.requires_grad_()
        b.requires_grad_()

        def batch_loss(idx: torch.Tensor) -> torch.Tensor:
            if low is None:
                with tf32_products(precision == "tf32" and W.is_cuda):
                    z = torch.addmm(b, X[idx].float(), W.T)
            else:  # bfloat16 operands (autograd rounds the gradient products likewise), float32 logits
                z = torch.mm(X[idx].to(low), W.to(low).T).float() + b
            return cb_softmax_bce(flush_tiny_gradient(z), y[idx], cw)

        validate = None
        if X_val is not None:
            Xv, yv = check_features(X_val, y_val, n_features=D, classes=classes, device=device, expecting="weight")

            def validate() -> float:
                return (linear_logits(Xv, W, b, precision=precision).argmax(1) == yv).float().mean().item()

        self.history_ = train_sgd(
            [W, b],
            batch_loss,
            EpochBatches(make_sampler(self.sampler, y.cpu(), C), run["epoch_batches"]),
            epochs=plan.epochs,
            lr=self.lr,
            batch_size=plan.batch_size,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            schedule=run["schedule"],
            generator=torch.Generator().manual_seed(self.seed),
            validate=validate,
            keep_best=self.keep_best,
            progress=self.progress,
            after_step=(lambda: project_max_norm(W, radius)) if run["projection"] == "step" else None,
            after_epoch=(lambda: project_max_norm(W, radius)) if run["projection"] == "epoch" else None,
            step_work=plan.batch_size * C * D,
        )
        self.weight_, self.bias_ = W.detach(), b.detach()
        self.radius_ = radius.item()
        self.norms_ = torch.linalg.vector_norm(self.weight_, dim=1)
        self.protocol_params_ = {
            "protocol": self.protocol, "lr": self.lr, "weight_decay": self.weight_decay, "sampler": self.sampler,
            "schedule": run["schedule"], "loss": "cb-softmax-bce", "beta": self.beta, "projection": run["projection"],
            "epoch_batches": run["epoch_batches"], "epochs": plan.epochs, "batch_size": plan.batch_size,
            "steps_per_epoch": plan.batches_per_epoch, "steps": plan.steps,
        }
        self.n_features_in_ = D
        self.classes_ = classes
        return self

    def implied_prior(self, counts: Any) -> torch.Tensor:
        """The class prior float64 (C,) the scores are balanced for: the sampler's p_j ∝ n_j^q times the
        class-balanced loss weights (docs/METHODS.md, "Implied priors of the re-weighted heads"; the
        binary cross-entropy of each softmax output is a proper scoring rule, so the weighted loss is
        minimised by the posterior under that prior). A class without train rows counts as one."""
        w = class_balanced_weights(torch.as_tensor(counts), self.beta).to(torch.float64)
        return normalise(final_class_probabilities(counts, self.sampler) * w)

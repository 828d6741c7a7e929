"""The SGD loop shared by cRT and LWS: sampler batches, learning-rate schedule, keep-best-on-val.

Schedules (per epoch e of T, base rate lr):

* ``cosine`` (default): lr_e = lr/2 (1 + cos(pi e / T)); the first epoch runs at lr, the last above 0.
* ``cosine-reference``: lr_e = lr/2 (1 + cos(pi (e+1) / T)), which is what the reference does by
  stepping ``CosineAnnealingLR`` before each epoch: its last epoch runs at lr = 0.
* ``constant``: lr_e = lr.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..samplers import BaseSampler

SCHEDULES = ("cosine", "cosine-reference", "constant")

# progress(epoch, num_epochs, mean_loss, val_score_or_None)
ProgressFn = Callable[[int, int, float, Optional[float]], None]


def learning_rate(lr: float, epoch: int, epochs: int, schedule: str) -> float:
    """The learning rate of ``epoch`` (0-based) out of ``epochs`` under ``schedule``."""
    if schedule == "cosine":
        return 0.5 * lr * (1 + math.cos(math.pi * epoch / epochs))
    if schedule == "cosine-reference":
        return 0.5 * lr * (1 + math.cos(math.pi * (epoch + 1) / epochs))
    if schedule == "constant":
        return lr
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


@dataclass
class TrainHistory:
    """Per-epoch record of a run; ``best_epoch`` is the epoch whose parameters were kept."""

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    best_epoch: int = -1


def train_sgd(
    params: list[torch.Tensor],
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    sampler: BaseSampler,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    momentum: float,
    weight_decay: float,
    schedule: str,
    generator: torch.Generator,
    validate: Optional[Callable[[], float]] = None,
    keep_best: bool = True,
    progress: Optional[ProgressFn] = None,
) -> TrainHistory:
    """SGD (momentum, weight decay) over ``epochs`` of sampler batches.

    ``batch_loss(idx)`` returns the mean loss of the rows ``idx`` (int64 (B,), on the params'
    device). ``validate()`` returns a score (higher is better) after each epoch; with ``keep_best``
    the parameters of the best epoch are restored at the end (ties keep the earlier epoch).
    """
    learning_rate(lr, 0, epochs, schedule)  # validates the schedule name
    device = params[0].device
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    hist = TrainHistory()
    best_score, best_params = -math.inf, None
    for epoch in range(epochs):
        lr_e = learning_rate(lr, epoch, epochs, schedule)
        for group in opt.param_groups:
            group["lr"] = lr_e
        batches = sampler.epoch(epoch, epochs, batch_size, generator).to(device, non_blocking=True)
        total = torch.zeros((), device=device)
        for idx in batches:
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(idx)
            loss.backward()
            opt.step()
            total += loss.detach()
        hist.loss.append(total.item() / len(batches))
        if not math.isfinite(hist.loss[-1]):
            raise ValueError(
                f"training diverged: the loss is {hist.loss[-1]} in epoch {epoch + 1}; lower the learning rate "
                "or rescale the features (e.g. divide them by their mean L2 norm)"
            )
        hist.lr.append(lr_e)
        score = None
        if validate is not None:
            with torch.no_grad():
                score = float(validate())
            hist.val.append(score)
            if keep_best and score > best_score:
                best_score, hist.best_epoch = score, epoch
                best_params = [p.detach().clone() for p in params]
        if progress is not None:
            progress(epoch, epochs, hist.loss[-1], score)
    if keep_best and best_params is not None:
        with torch.no_grad():
            for p, best in zip(params, best_params):
                p.copy_(best)
    else:
        hist.best_epoch = epochs - 1
    return hist


def sgd_constraints() -> dict[str, list]:
    """Parameter constraints shared by the heads trained with :func:`train_sgd`."""
    from .base import Interval, Is, StrOptions

    sampler_ok = Is(
        lambda v: v in ("ib", "cb", "sqrt", "pb") or (isinstance(v, (int, float)) and not isinstance(v, bool)),
        "'ib', 'cb', 'sqrt', 'pb' or a power q",
    )
    return {
        "epochs": [Interval(int, 1, None)],
        "lr": [Interval(float, 0, None, closed="neither")],
        "batch_size": [Interval(int, 1, None)],
        "momentum": [Interval(float, 0, 1, closed="left")],
        "weight_decay": [Interval(float, 0, None)],
        "sampler": [sampler_ok],
        "schedule": [StrOptions(set(SCHEDULES))],
        "seed": [Interval(int, None, None)],
    }

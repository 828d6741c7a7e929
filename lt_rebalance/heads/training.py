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
from typing import Callable, Optional, Sequence

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
    diverged: bool = False  # the loss stopped being finite (grid members only; a lone run raises)


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
    (hist,) = train_sgd_members(
        [params],
        lambda idx: batch_loss(idx).reshape(1),
        sampler,
        epochs=epochs,
        lrs=[lr],
        batch_size=batch_size,
        momentum=momentum,
        weight_decays=[weight_decay],
        schedule=schedule,
        generator=generator,
        validate=None if validate is None else lambda: torch.tensor([float(validate())], dtype=torch.float64),
        keep_best=keep_best,
        progress=progress,
    )
    return hist


def train_sgd_members(
    members: list[list[torch.Tensor]],
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    sampler: BaseSampler,
    *,
    epochs: int,
    lrs: Sequence[float],
    batch_size: int,
    momentum: float,
    weight_decays: Sequence[float],
    schedule: str,
    generator: torch.Generator,
    validate: Optional[Callable[[], torch.Tensor]] = None,
    keep_best: bool = True,
    progress: Optional[ProgressFn] = None,
) -> list[TrainHistory]:
    """:func:`train_sgd` for G independent members sharing one sampler stream (a hyper-parameter grid).

    Member g owns the tensors ``members[g]`` and its own rate ``lrs[g]`` and weight decay
    ``weight_decays[g]`` (one optimizer parameter group each, so its updates are exactly those of a
    lone run). ``batch_loss(idx)`` returns the (G,) mean losses (their sum is minimised: members do
    not interact); ``validate()`` returns (G,) scores, and each member keeps its own best epoch.
    A member whose loss stops being finite is marked ``diverged`` and frozen out of the selection;
    when every member has diverged, training stops with a ValueError. ``progress`` sees the mean
    loss of the live members and their best val score.
    """
    learning_rate(lrs[0], 0, epochs, schedule)  # validates the schedule name
    params = [p for member in members for p in member]
    device = params[0].device
    opt = torch.optim.SGD(
        [{"params": m, "lr": lr, "weight_decay": wd} for m, lr, wd in zip(members, lrs, weight_decays)],
        lr=lrs[0],
        momentum=momentum,
    )
    hists = [TrainHistory() for _ in members]
    best_score = torch.full((len(members),), -math.inf, dtype=torch.float64)
    best_params: list[Optional[list[torch.Tensor]]] = [None] * len(members)
    live = torch.ones(len(members), dtype=torch.bool)
    for epoch in range(epochs):
        for group, base_lr, h in zip(opt.param_groups, lrs, hists):
            group["lr"] = learning_rate(base_lr, epoch, epochs, schedule)
            h.lr.append(group["lr"])
        batches = sampler.epoch(epoch, epochs, batch_size, generator).to(device, non_blocking=True)
        total = torch.zeros(len(members), device=device)
        for idx in batches:
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(idx)
            loss.sum().backward()
            opt.step()
            total += loss.detach()
        losses = (total / len(batches)).cpu().double()
        live &= torch.isfinite(losses)
        for g, h in enumerate(hists):
            h.loss.append(losses[g].item())
            h.diverged = not live[g].item()
        if not live.any():
            raise ValueError(
                f"training diverged: the loss is {losses[0].item()} in epoch {epoch + 1}; lower the learning rate "
                "or rescale the features (e.g. divide them by their mean L2 norm)"
            )
        score = None
        if validate is not None:
            with torch.no_grad():
                scores = torch.as_tensor(validate(), dtype=torch.float64).cpu().reshape(len(members))
            for g, h in enumerate(hists):
                h.val.append(scores[g].item())
                if keep_best and live[g] and scores[g] > best_score[g]:
                    best_score[g], h.best_epoch = scores[g], epoch
                    best_params[g] = [p.detach().clone() for p in members[g]]
            score = scores[live].max().item()
        if progress is not None:
            progress(epoch, epochs, losses[live].mean().item(), score)
    for member, best, h in zip(members, best_params, hists):
        if keep_best and best is not None:
            with torch.no_grad():
                for p, b in zip(member, best):
                    p.copy_(b)
        else:
            h.best_epoch = epochs - 1
    return hists


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

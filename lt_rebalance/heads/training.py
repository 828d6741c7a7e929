"""The SGD loop shared by cRT and LWS: sampler batches, learning-rate schedule, keep-best-on-val.

Schedules (per epoch e of T, base rate lr):

* ``cosine`` (default): lr_e = lr/2 (1 + cos(pi e / T)); the first epoch runs at lr, the last above 0.
* ``cosine-reference``: lr_e = lr/2 (1 + cos(pi (e+1) / T)), which is what the reference does by
  stepping ``CosineAnnealingLR`` before each epoch: its last epoch runs at lr = 0.
* ``constant``: lr_e = lr.

Default length (``epochs="auto"``, ``batch_size="auto"``, :func:`plan_schedule`): the batch is
512, or N // 8 for N < 4096 train rows (at least 8 batches an epoch; at least 1 row); the epochs
are the reference's (cRT 10, LWS 5), raised to ceil(500 / (N // batch)) when that gives fewer
than :data:`MIN_STEPS` = 500 optimiser steps. ImageNet-LT (226 batches of 512 per epoch),
Places-LT (122) and iNaturalist keep the reference's schedule; the demo's 318 rows get 63 epochs
of 8 batches of 39 instead of 10 steps. Explicit settings are used as given, with a
:class:`FewStepsWarning` below 500 steps.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..samplers import SAMPLERS, BaseSampler

SCHEDULES = ("cosine", "cosine-reference", "constant")
EPOCH_BATCHES = ("full", "partial", "drop-last")
AUTO = "auto"
DEFAULT_BATCH_SIZE = 512  # the reference's batch
MIN_STEPS = 500  # optimiser steps that "auto" epochs guarantee (the reference runs >= 610 on its datasets)
MIN_BATCHES_PER_EPOCH = 8  # "auto" batch: an epoch (one val check for keep-best) is at least 8 steps


class FewStepsWarning(UserWarning):
    """Explicit epochs and batch size give fewer than :data:`MIN_STEPS` optimiser steps."""


@dataclass(frozen=True)
class Schedule:
    """The training length :func:`plan_schedule` chose; ``auto`` names the settings the rule filled in."""

    epochs: int
    batch_size: int
    batches_per_epoch: int
    auto: tuple[str, ...] = ()

    @property
    def steps(self) -> int:
        return self.epochs * self.batches_per_epoch


def plan_schedule(n_rows: int, epochs: int | str, batch_size: int | str, reference_epochs: int,
                  *, min_steps: int = MIN_STEPS, stacklevel: int = 3, reference_batch: int = DEFAULT_BATCH_SIZE,
                  epoch_batches: str = "full") -> Schedule:
    """Resolve ``"auto"`` epochs and batch size for ``n_rows`` train rows (rule in the module docstring).

    An explicit ``batch_size`` larger than ``n_rows`` is a ValueError; explicit settings that give
    fewer than ``min_steps`` steps warn (:class:`FewStepsWarning`) but are kept. ``reference_batch``:
    the batch "auto" stands for on a large file (512; the heads with other published batches pass
    theirs). ``epoch_batches``: "full" (⌊N/B⌋ batches an epoch), "partial" (⌈N/B⌉: the last,
    partial batch kept, as a DataLoader without drop_last) or "drop-last" (⌊N/B⌋ − 1, at least 1:
    the MARC authors' loop, which stops at step ⌊N/B⌋); :class:`EpochBatches` draws them.
    """
    if n_rows < 1:
        raise ValueError("no train rows to train on")
    if epoch_batches not in EPOCH_BATCHES:
        raise ValueError(f"unknown epoch_batches {epoch_batches!r}; choose one of {', '.join(EPOCH_BATCHES)}")
    if batch_size == AUTO:
        batch = max(1, min(reference_batch, n_rows // MIN_BATCHES_PER_EPOCH))
    elif batch_size > n_rows:
        raise ValueError(f"batch_size={batch_size} is larger than the {n_rows} train rows; pass at most {n_rows}, "
                         f"or batch_size='auto' ({DEFAULT_BATCH_SIZE}, or N // {MIN_BATCHES_PER_EPOCH} on a small set)")
    else:
        batch = int(batch_size)
    per_epoch = {"full": n_rows // batch, "partial": -(-n_rows // batch),
                 "drop-last": max(1, n_rows // batch - 1)}[epoch_batches]
    auto = tuple(k for k, v in (("epochs", epochs), ("batch_size", batch_size)) if v == AUTO)
    if epochs == AUTO:
        plan = Schedule(max(reference_epochs, math.ceil(min_steps / per_epoch)), batch, per_epoch, auto)
    else:
        plan = Schedule(int(epochs), batch, per_epoch, auto)
        if plan.steps < min_steps:
            warnings.warn(
                f"{plan.epochs} epochs of {per_epoch} batch(es) of {batch} rows are only {plan.steps} optimiser "
                f"steps (fewer than {min_steps}), so the head may underfit; leave epochs at 'auto' (at least "
                f"{min_steps} steps) or raise them", FewStepsWarning, stacklevel=stacklevel,
            )
    return plan

# progress(epoch, num_epochs, mean_loss, val_score_or_None)
ProgressFn = Callable[[int, int, float, Optional[float]], None]


SMALL_STEP = 2**24  # multiply-adds of one step below which training runs on one intra-op thread


@contextlib.contextmanager
def one_thread(enabled: bool = True) -> Iterator[None]:
    """One intra-op torch thread while inside (when ``enabled``).

    Small tensors gain nothing from more threads, and on a loaded machine the threads contend (a
    few-hundred-row cRT runs an order of magnitude slower on two threads than on one).
    """
    before = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    after_step: Optional[Callable[[], None]] = None,
    after_epoch: Optional[Callable[[], None]] = None,
    step_work: Optional[int] = None,
) -> TrainHistory:
    """SGD (momentum, weight decay) over ``epochs`` of sampler batches.

    ``batch_loss(idx)`` returns the mean loss of the rows ``idx`` (int64 (B,), on the params'
    device). ``validate()`` returns a score (higher is better) after each epoch; with ``keep_best``
    the parameters of the best epoch are restored at the end (ties keep the earlier epoch).
    ``after_step()``, when given, runs (without autograd) after every optimizer step, e.g. a
    projection of the parameters onto a constraint set (projected gradient descent); ``after_epoch()``
    likewise after each epoch's last step, before its validation (the weight-balancing authors'
    once-per-epoch projection). A sampler whose ``epoch`` returns a list of 1-D index tensors
    (:class:`EpochBatches` with "partial") gives batches of unequal sizes.
    ``step_work``: multiply-adds of one step; below :data:`SMALL_STEP` training runs on one thread.
    """
    (hist,) = train_sgd_members(
        params,
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
        stacked=False,
        after_step=after_step,
        after_epoch=after_epoch,
        step_work=step_work,
    )
    return hist


class _MemberSGD:
    """torch.optim.SGD (momentum, no dampening, no Nesterov) with one lr and weight decay per member.

    ``stacked``: every parameter holds the G members along its first dimension (one tensor for a
    whole grid, so the forward pass is one GEMM); otherwise the parameters form a single member.
    Per step and parameter: d = grad + wd·p; buf = d (first step) or momentum·buf + d; p -= lr·buf.
    """

    def __init__(self, params: list[torch.Tensor], momentum: float, weight_decays: torch.Tensor, stacked: bool):
        self.params, self.momentum, self.stacked = params, momentum, stacked
        self.weight_decays = weight_decays
        self.bufs: list[Optional[torch.Tensor]] = [None] * len(params)

    def _per_member(self, values: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return values.view((-1,) + (1,) * (p.ndim - 1)) if self.stacked else values.view(())

    @torch.no_grad()
    def step(self, lrs: torch.Tensor) -> None:
        for i, p in enumerate(self.params):
            # in place: the fresh gradient tensor becomes d (a new (C, D) tensor each step would cost
            # its page faults: at iNaturalist size a quarter of the update's time)
            d = p.grad.addcmul_(p, self._per_member(self.weight_decays, p))
            if self.bufs[i] is None:
                self.bufs[i] = d.clone()  # d may be a gradient buffer its head reuses (cRT's)
            else:
                self.bufs[i].mul_(self.momentum).add_(d)
            p.addcmul_(self.bufs[i], self._per_member(lrs, p), value=-1.0)
            p.grad = None

    def member(self, p: torch.Tensor, g: int) -> torch.Tensor:
        return p[g] if self.stacked else p


def train_sgd_members(
    params: list[torch.Tensor],
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    sampler: BaseSampler,
    *,
    epochs: int,
    lrs: Sequence[float],
    batch_size: int,
    momentum: float,
    weight_decays: Sequence[float],
    schedule: str,
    generator: torch.Generator | Sequence[torch.Generator],
    validate: Optional[Callable[[], torch.Tensor]] = None,
    keep_best: bool = True,
    progress: Optional[ProgressFn] = None,
    stacked: bool = True,
    after_step: Optional[Callable[[], None]] = None,
    after_epoch: Optional[Callable[[], None]] = None,
    step_work: Optional[int] = None,
) -> list[TrainHistory]:
    """:func:`train_sgd` for G independent members sharing one sampler stream (a hyper-parameter grid).

    Each tensor of ``params`` holds the G members along its first dimension (``stacked``), so one
    forward pass serves them all; member g has its own rate ``lrs[g]``, weight decay
    ``weight_decays[g]`` and momentum buffer, so its updates are those of a lone run.
    ``batch_loss(idx)`` returns the (G,) mean losses (their sum is minimised: members do not
    interact); ``validate()`` returns (G,) scores, and each member keeps its own best epoch.
    ``generator`` may also be a sequence of G generators (members of different seeds): each member
    then draws its own batches, and ``batch_loss`` receives (G, batch_size) indices.
    A member whose loss stops being finite is marked ``diverged`` and frozen out of the selection;
    when every member has diverged, training stops with a ValueError. ``progress`` sees the mean
    loss of the live members and their best val score. ``after_step``, ``after_epoch`` as in
    :func:`train_sgd`.
    """
    learning_rate(lrs[0], 0, epochs, schedule)  # validates the schedule name
    with one_thread(step_work is not None and step_work < SMALL_STEP and params[0].device.type == "cpu"):
        return _train(params, batch_loss, sampler, epochs, lrs, batch_size, momentum, weight_decays, schedule,
                      generator, validate, keep_best, progress, stacked, after_step, after_epoch)


def flush_tiny_gradient(logits: torch.Tensor) -> torch.Tensor:
    """Make the gradient reaching ``logits`` free of denormal floats (|g| < 1.2e-38 set to 0).

    Once a head fits well, softmax gradients underflow into denormals, and CPU matrix multiplies
    on denormal inputs run several times slower (an ImageNet-LT cRT epoch about twice as long).
    Values that small do not change an SGD step. ``torch.set_flush_denormal`` would only cover
    the calling thread, not the GEMM's worker threads. Returns ``logits`` (hook registered).
    """
    if logits.requires_grad and logits.dtype == torch.float32:
        logits.register_hook(flush_denormals)
    return logits


def flush_denormals(g: torch.Tensor) -> torch.Tensor:
    """``g`` with its denormal entries (|g| < 1.2e-38, float32) set to 0 (a new tensor)."""
    return g.masked_fill(g.abs() < torch.finfo(torch.float32).tiny, 0.0)


def _train(params, batch_loss, sampler, epochs, lrs, batch_size, momentum, weight_decays, schedule, generator,
           validate, keep_best, progress, stacked, after_step=None, after_epoch=None) -> list[TrainHistory]:
    G = len(lrs)
    device = params[0].device
    opt = _MemberSGD(params, momentum, torch.tensor(weight_decays, dtype=params[0].dtype, device=device), stacked)
    hists = [TrainHistory() for _ in range(G)]
    best_score = torch.full((G,), -math.inf, dtype=torch.float64)
    best_params: list[Optional[list[torch.Tensor]]] = [None] * G
    live = torch.ones(G, dtype=torch.bool)
    for epoch in range(epochs):
        epoch_lrs = [learning_rate(base_lr, epoch, epochs, schedule) for base_lr in lrs]
        for h, lr_e in zip(hists, epoch_lrs):
            h.lr.append(lr_e)
        lr_t = torch.tensor(epoch_lrs, dtype=params[0].dtype, device=device)
        if isinstance(generator, torch.Generator):
            batches = sampler.epoch(epoch, epochs, batch_size, generator)
            batches = (batches.to(device, non_blocking=True) if isinstance(batches, torch.Tensor)
                       else [b.to(device, non_blocking=True) for b in batches])  # batches of unequal sizes
        else:  # one batch stream per member: (batches, G, batch_size)
            batches = torch.stack([sampler.epoch(epoch, epochs, batch_size, g) for g in generator], dim=1)
            batches = batches.to(device, non_blocking=True)
        total = torch.zeros(G, device=device)
        for idx in batches:
            loss = batch_loss(idx)
            loss.sum().backward()
            opt.step(lr_t)
            if after_step is not None:
                with torch.no_grad():
                    after_step()
            total += loss.detach()
            del loss  # its graph's leaves (cRT's logits and their gradient) are freed before the next step
        if after_epoch is not None:
            with torch.no_grad():
                after_epoch()
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
                scores = torch.as_tensor(validate(), dtype=torch.float64).cpu().reshape(G)
            for g, h in enumerate(hists):
                h.val.append(scores[g].item())
                if keep_best and live[g] and scores[g] > best_score[g]:
                    best_score[g], h.best_epoch = scores[g], epoch
                    best_params[g] = [opt.member(p, g).detach().clone() for p in params]
            score = scores[live].max().item()
        if progress is not None:
            progress(epoch, epochs, losses[live].mean().item(), score)
    for g, (best, h) in enumerate(zip(best_params, hists)):
        if keep_best and best is not None:
            with torch.no_grad():
                for p, b in zip(params, best):
                    opt.member(p, g).copy_(b)
        else:
            h.best_epoch = epochs - 1
    return hists


class EpochBatches:
    """A sampler whose epochs hold the batches of ``epoch_batches`` (:func:`plan_schedule`).

    "full": ``base``'s own ⌊N/B⌋ batches. "drop-last": the first max(1, ⌊N/B⌋ − 1) of them.
    "partial": ``base`` draws N rows (a permutation of all rows for "ib") split into ⌈N/B⌉
    batches, the last one partial, returned as a list of 1-D tensors.
    """

    def __init__(self, base: BaseSampler, epoch_batches: str = "full"):
        self.base, self.epoch_batches = base, epoch_batches

    def epoch(self, epoch: int, num_epochs: int, batch_size: int, generator: torch.Generator):
        if self.epoch_batches == "partial":
            base = self.base
            return list(base._draw(len(base.index.labels), epoch, num_epochs, generator).split(batch_size))
        batches = self.base.epoch(epoch, num_epochs, batch_size, generator)
        return batches[: max(1, len(batches) - 1)] if self.epoch_batches == "drop-last" else batches

    def class_probabilities(self, epoch: int = 0, num_epochs: int = 1) -> torch.Tensor:
        return self.base.class_probabilities(epoch, num_epochs)


def sgd_constraints() -> dict[str, list]:
    """Parameter constraints shared by the heads trained with :func:`train_sgd`."""
    from .base import Interval, Is, StrOptions

    sampler_ok = Is(
        lambda v: v in SAMPLERS or (isinstance(v, (int, float)) and not isinstance(v, bool)),
        "'ib', 'cb', 'sqrt', 'pb' or a power q",
    )
    auto = StrOptions({AUTO})
    return {
        "epochs": [Interval(int, 1, None), auto],
        "lr": [Interval(float, 0, None, closed="neither")],
        "batch_size": [Interval(int, 1, None), auto],
        "momentum": [Interval(float, 0, 1, closed="left")],
        "weight_decay": [Interval(float, 0, None)],
        "sampler": [sampler_ok],
        "schedule": [StrOptions(set(SCHEDULES))],
        "seed": [Interval(int, None, None)],
    }

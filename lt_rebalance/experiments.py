"""Run a method on a feature file and report it per split and per shot group.

These runners are what the ``ltr`` commands, ``ltr compare`` and ``ltr demo`` call. Each returns
``(result, head)``: a JSON-ready dict ``{"method": ..., <split>: metrics, ...}`` where metrics are
those of :func:`lt_rebalance.metrics.evaluate` (accuracies as fractions in [0, 1]), and the fitted
head (for saving, exporting or plotting).

Hyper-parameters are never chosen on the test split unless the caller asks for it: the
selection split of tau-normalisation and the keep-best epoch of cRT/LWS use ``val``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import torch

from .blocks import all_finite, available_memory, column_affine, linear_logits
from .heads import CRT, KNN, LWS, MARC, NCM, JointHead, LinearProbe, TauNorm, WeightBalancing, tau_sweep
from .heads.base import resolve_device
from .heads.crt_grid import CRTGrid, fit_seeds
from .heads.linear_probe import fit_C_grid
from .heads.lws import JointLogitCalibration
from .heads.tau_norm import DEFAULT_TAUS
from .metrics import (
    DEFAULT_FEW,
    DEFAULT_MANY,
    affine_row_statistics,
    evaluate,
    evaluate_rows,
    head_row_statistics,
)
from .names import DEFAULT_METHODS, HEAD_METHODS, METHOD_NAMES, TRAINED_METHODS, canonical_method
from .posthoc import (
    LogitAdjustment,
    TemperatureScaled,
    calibration_from_rows,
    logit_adjust_sweep,
    pc_softmax,
    select_tau,
)
from .protocols import Protocol, implied_prior, paired_differences, protocol_report, seed_summary
from .store import RANDOM_HEAD_NOTE, FeatureStore

CURVE_KEYS = ("all", "many", "medium", "few", "mean_class")


@dataclass
class Context:
    """A feature file and the choices shared by every method of a run.

    ``eval_splits``: the splits to report (default: val and test when present, else every
    non-train split). Loaded splits and the stored classifier are cached, so ``compare`` reads
    each of them once.

    ``max_memory``: the bytes this run may use (None: the memory available when a split is first
    loaded). When the file's features exceed half of it, splits are memory-mapped instead of read
    (:meth:`FeatureStore.features`): every method then streams them a block of rows at a time,
    and cRT gathers its batches from the mapped train split; results are the same bytes, so
    identical. LWS's logit cache gets the other half.
    """

    store: FeatureStore
    eval_splits: Sequence[str] = ()
    device: str = "cpu"
    seed: int = 0
    thresholds: dict = field(default_factory=dict)  # many=, few= for the shot groups
    protocol: Protocol = field(default_factory=Protocol)  # shifted priors, bootstrap (lt_rebalance.protocols)
    max_memory: Optional[int] = None
    # keep X Wᵀ of each evaluation split with the stored classifier, for the heads that are per-class
    # affine maps of it (set by ``compare`` when several such methods run): see :meth:`evaluate`
    share_joint_logits: bool = False
    _cache: dict = field(default_factory=dict, repr=False)
    # bootstrap samples of the last report, split -> {metric: (B,)}: paired differences in ``compare``
    samples: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.eval_splits:
            present = [s for s in ("val", "test") if s in self.store.splits]
            self.eval_splits = present or [s for s in self.store.splits if s != "train"]

    @property
    def group_thresholds(self) -> dict[str, int]:
        """The shot-group thresholds in use, ``{"many": .., "few": ..}``, defaults filled in."""
        return {"many": DEFAULT_MANY, "few": DEFAULT_FEW, **self.thresholds}

    @property
    def counts(self) -> torch.Tensor:
        return self.store.counts_tensor()

    def _require_finite(self, X: torch.Tensor, subject: str, unit: str) -> None:
        """Say that the file holds NaN or Inf (which, where) before a method blames its own numbers
        (an "overflow", a "diverged" training). ``unit`` names a row of X (a value for 1-D X)."""
        if not all_finite(X):
            bad = ~torch.isfinite(X)
            n = int((bad.flatten(0, -2).any(dim=-1) if X.ndim > 1 else bad).sum())
            kinds = " and ".join(k for k, found in (("NaN", X.isnan().any()), ("Inf", X.isinf().any())) if found)
            raise ValueError(
                f"{self.store.path}: {subject} has {n} {unit} with {kinds} values; "
                f"`ltr check {self.store.path}` lists every problem, re-extract the file to fix it"
            )

    def load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(X, y) of ``split``, read once: features in the stored dtype (float16 stays float16: the
        heads upcast a block of rows at a time), labels int64."""
        if split not in self._cache:
            X, y = self.store.load(split, dtype="stored", mmap=self.memory_mapped)
            self._require_finite(X, f"split {split!r}", "feature row(s)")
            self._cache[split] = (X, y)
        return self._cache[split]

    @property
    def memory_budget(self) -> Optional[int]:
        """``max_memory``, or the memory available now; None when unknown."""
        return self.max_memory if self.max_memory is not None else available_memory()

    @property
    def memory_mapped(self) -> bool:
        """Whether splits are memory-mapped: the features exceed half of :attr:`memory_budget`.

        Decided once, when first asked (splits loaded later follow the same plan, however the
        memory available changes meanwhile), and shared by copies of this context."""
        if ("memory_mapped",) not in self._cache:
            budget = self.memory_budget
            self._cache[("memory_mapped",)] = budget is not None and self.store.feature_bytes() > budget / 2
        return self._cache[("memory_mapped",)]

    def views(self, k: int) -> torch.Tensor:
        """The first ``k`` stored augmented views of train, (k, N, D) in the stored dtype, checked finite."""
        V = self.store.views("train", k, dtype="stored")
        self._require_finite(V, "split 'train'", f"row(s) of its first {k} augmented views")
        return V

    @property
    def joint_logits_cache(self) -> dict:
        """The ``logits_cache`` LWS and MARC share (:meth:`JointLogitCalibration.fit`): the joint
        logits of train and val, computed once per run; :meth:`release_joint_logits` frees them."""
        return self._cache.setdefault("joint_logits", {})

    def release_joint_logits(self) -> None:
        self._cache.pop("joint_logits", None)

    def head(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The stored stage-1 classifier (:meth:`FeatureStore.head`), read once and checked finite."""
        if ("head",) not in self._cache:  # in the cache, so copies (``dataclasses.replace``, --seeds) share it
            W, b = self.store.head()
            self._require_finite(W, "the stored classifier", "class row(s) of /head/weight")
            if b is not None:
                self._require_finite(b, "the stored classifier", "value(s) of /head/bias")
            self._cache[("head",)] = (W, b)
        return self._cache[("head",)]

    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        if "train" not in self.store.splits:
            raise ValueError(f"{self.store.path} has no 'train' split, which this method trains on")
        if self.store.splits["train"].rows == 0:
            raise ValueError(f"split 'train' of {self.store.path} has no rows, and this method trains on it; "
                             "give a file whose train split holds features")
        return self.load("train")

    def has_rows(self, split: str) -> bool:
        """Whether the file has ``split`` with at least one row."""
        return split in self.store.splits and self.store.splits[split].rows > 0

    def val(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        return self.load("val") if "val" in self.store.splits else (None, None)

    def _shared_joint_logits(self, head: Any, split: str) -> Optional[tuple]:
        """(R, a, c) such that ``head``'s scores on ``split`` are R ⊙ a + c, R = X Wᵀ (float32 (N, C))
        of the stored classifier W, computed once per split and kept; None unless
        :attr:`share_joint_logits` is set, the head is a per-class affine map of W (the joint
        head, tau-norm, LWS, MARC, logit adjustment and PC softmax of it) and R takes at most an
        eighth of :attr:`memory_budget`."""
        if not (self.share_joint_logits and self.store.has_head and hasattr(head, "_affine_of")):
            return None
        affine = head._affine_of(self.head()[0])
        R = None if affine is None else self.stored_logits(split, head._device)
        return None if R is None else (R, *affine)

    def stored_logits(self, split: str, device: Any) -> Optional[torch.Tensor]:
        """X Wᵀ of ``split`` with the stored classifier (no bias), float32 (N, C) on ``device``,
        computed once and kept; None unless :attr:`share_joint_logits` is set, no ``max_memory``
        was given, the splits are not memory-mapped and it takes at most an eighth of
        :attr:`memory_budget`."""
        if not (self.share_joint_logits and self.store.has_head):
            return None
        key = ("eval_logits", split, str(device))
        if key not in self._cache:
            X, _ = self.load(split)
            W = self.head()[0]
            budget = self.memory_budget
            # not under --max-memory or a memory-mapped file: that budget is the features' and LWS's
            fits = self.max_memory is None and not self.memory_mapped and (
                budget is None or len(X) * W.shape[0] * 4 <= budget / 8)
            self._cache[key] = linear_logits(X, W.to(device)) if fits else None
        return self._cache[key]

    def release_shared_logits(self) -> None:
        """Free the logits kept for :attr:`share_joint_logits`."""
        for key in [k for k in self._cache if isinstance(k, tuple) and k[0] == "eval_logits"]:
            del self._cache[key]

    def evaluate(self, head: Any, split: str, out: dict, protocol: bool = True) -> dict:
        """Metrics of ``head`` on ``split``; with ``protocol``, its numbers go into ``out``.

        ``out`` receives ``"ci": {split: ..}`` (bootstrap) and, on the test split, ``"shifted"`` and
        ``"shifted_corrected"`` (:func:`lt_rebalance.protocols.protocol_report`). With
        :attr:`share_joint_logits`, heads built on the stored classifier are scored from its kept
        logits (the same scores up to float32 rounding; one GEMM per split for all of them).
        """
        X, y = self.load(split)
        shared = self._shared_joint_logits(head, split)
        if not (protocol and self.protocol.active):  # block-wise: no (N, C) score matrix is held
            if shared is not None:
                return evaluate_rows(affine_row_statistics(*shared, y, len(self.counts)), y, self.counts,
                                     **self.thresholds)
            return head.evaluate(X, y, self.counts, **self.thresholds)
        scores = head.scores(X) if shared is None else column_affine(*shared)  # the protocols need every score
        metrics = evaluate(scores, y, self.counts, **self.thresholds)
        implied = None
        if self.protocol.test_priors and split == "test":
            try:
                implied = implied_prior(head, self.counts)
            except ValueError:  # a head of unknown prior: plain shifted numbers only
                pass
        extra = protocol_report(scores, y, self.counts, self.protocol, shifted=split == "test",
                                implied=implied, **self.thresholds)
        if "_samples" in extra:
            self.samples[split] = extra.pop("_samples")
            out.setdefault("ci", {})[split] = extra.pop("ci")
        out.update(extra)
        out["protocol"] = self.protocol.describe()
        return metrics

    def report(self, head: Any, protocol: bool = True) -> dict[str, dict]:
        """Metrics of a fitted head on every evaluation split, plus the protocol's keys (see :meth:`evaluate`)."""
        out: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        if protocol and self.protocol.test_priors and "test" not in self.eval_splits:
            raise ValueError("--test-priors are evaluated on the test split; add it to --splits")
        if protocol and self.protocol.active:
            self.samples.clear()
        for split in self.eval_splits:
            out[split] = self.evaluate(head, split, extra, protocol)
        return {**out, **extra}


def _joint_head(ctx: Context) -> JointHead:
    W, b = ctx.head()
    return JointHead(W, b, device=ctx.device).fit()


def run_joint(ctx: Context) -> tuple[dict, JointHead]:
    """The stored stage-1 classifier (logits = X Wᵀ + b)."""
    head = _joint_head(ctx)
    return {"method": "joint", **ctx.report(head)}, head


def run_ncm(ctx: Context, variant: str = "cl2n") -> tuple[dict, NCM]:
    X, y = ctx.train()
    head = NCM(variant, device=ctx.device).fit(X, y, num_classes=ctx.store.num_classes)
    return {"method": "ncm", "variant": variant, **ctx.report(head)}, head


def parse_taus(text: str) -> list[float]:
    """'0:2:21' -> linspace(0, 2, 21); '0,0.5,1' -> [0, 0.5, 1]."""
    text = text.strip()
    try:
        if ":" in text:
            start, stop, num = text.split(":")
            n = int(num)
            if n < 1:
                raise ValueError
            taus = torch.linspace(float(start), float(stop), n, dtype=torch.float64).tolist()
        else:
            taus = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(
            f"cannot parse taus {text!r}; use START:STOP:NUM (e.g. 0:2:21) or a comma list (e.g. 0,0.5,1)"
        ) from None
    if not taus:
        raise ValueError("no tau values given; use START:STOP:NUM (e.g. 0:2:21) or a comma list")
    if not all(math.isfinite(t) for t in taus):
        raise ValueError(f"taus must be finite numbers; got {text!r}")
    return [round(t, 10) for t in taus]


def _sweep_report(
    ctx: Context,
    method: str,
    sweep: Callable[[torch.Tensor, torch.Tensor], dict],
    make_head: Callable[[float], Any],
    taus: Sequence[float],
    select_on: Optional[str],
    metric: str,
    eval_split: str,
) -> tuple[dict, Any]:
    """Curves of ``sweep(X, y)`` on val and test, tau selected on ``select_on``, ``make_head(tau)`` reported."""
    curve_splits = [s for s in ("val", "test") if s in ctx.store.splits]
    for s in (select_on, eval_split):
        if s is not None and s not in ctx.store.splits:
            raise ValueError(f"{ctx.store.path} has no split {s!r}; available: {', '.join(ctx.store.splits)}")
    if select_on is not None and not ctx.has_rows(select_on):
        raise ValueError(f"split {select_on!r} of {ctx.store.path} has no rows, so tau cannot be selected on it; "
                         "pass --select-on test (reported as such) or --select-on none (curves only)")
    if eval_split not in curve_splits:
        curve_splits.append(eval_split)
    curves = {}
    for split in curve_splits:
        c = sweep(*ctx.load(split))
        curves[split] = {k: c[k].tolist() for k in CURVE_KEYS}
    result = {"method": method, "taus": list(taus), "curves": curves, "metric": metric}
    if select_on is None:
        return {**result, "selected_tau": None, "selected_on": None, eval_split: None}, None
    try:
        tau = select_tau(curves[select_on], taus, metric)
    except ValueError:
        raise ValueError(f"cannot select tau on {select_on!r} by {metric!r}: it is undefined on that split") from None
    head = make_head(tau)
    extra: dict[str, Any] = {}
    ctx.samples.clear()
    metrics = ctx.evaluate(head, eval_split, extra)
    return {**result, "selected_tau": tau, "selected_on": select_on, eval_split: metrics, **extra}, head


def run_tau_sweep(
    ctx: Context,
    taus: Sequence[float] = DEFAULT_TAUS,
    select_on: Optional[str] = "val",
    metric: str = "top1",
    eval_split: str = "test",
) -> tuple[dict, Optional[TauNorm]]:
    """tau-normalisation curves on val and test, tau selected on ``select_on`` (None: no selection).

    Returns ``{"method": "tau_norm", "taus", "curves": {split: {all, many, medium, few,
    mean_class}}, "selected_tau", "selected_on", "metric", eval_split: metrics at the selected tau}``.
    """
    W = ctx.head()[0].to(ctx.device)  # the sweep runs on W's device: each split moves there once
    return _sweep_report(
        ctx, "tau_norm", lambda X, y: tau_sweep(X, y, W, ctx.counts, taus, **ctx.thresholds),
        lambda tau: TauNorm(W, tau, device=ctx.device).fit(), taus, select_on, metric, eval_split,
    )


def run_logit_adjust(
    ctx: Context,
    taus: Sequence[float] = DEFAULT_TAUS,
    select_on: Optional[str] = "val",
    metric: str = "top1",
    eval_split: str = "test",
) -> tuple[dict, Optional[LogitAdjustment]]:
    """Logit adjustment of the stored classifier (z − tau·log π); the JSON shape of :func:`run_tau_sweep`."""
    base = _joint_head(ctx)
    return _sweep_report(
        ctx, "logit_adjust",
        lambda X, y: logit_adjust_sweep(X, y, base.weight_, base.bias_, ctx.counts, taus, **ctx.thresholds),
        lambda tau: LogitAdjustment(base, ctx.counts, tau).fit(), taus, select_on, metric, eval_split,
    )


MAX_EPOCH_LINES = 20  # per-epoch progress lines of a run (many short epochs are logged every k-th)


def _epoch_logger(method: str, log: Optional[Callable[[str], None]]):
    if log is None:
        return None

    def progress(epoch: int, epochs: int, loss: float, val: Optional[float]) -> None:
        every = math.ceil(epochs / MAX_EPOCH_LINES)
        if epoch % every and epoch + 1 != epochs:
            return
        v = "" if val is None else f"  val top-1 {100 * val:.2f}%"
        log(f"{method} epoch {epoch + 1}/{epochs}  loss {loss:.4f}{v}")

    return progress


def _history(h) -> dict:
    return {"loss": h.loss, "lr": h.lr, "val_top1": h.val, "best_epoch": h.best_epoch}


def _trained_params(head: Any, drop: Sequence[str]) -> dict:
    """``params`` of a cRT/LWS result: its settings, with the epochs and batch size actually run.

    ``auto`` lists the settings that were "auto" (:func:`~lt_rebalance.heads.training.plan_schedule`),
    ``steps`` the optimiser steps.
    """
    plan = head.schedule_
    shown = {k: v for k, v in head.get_params().items() if k not in ("progress", "device", *drop)}
    return {**shown, "epochs": plan.epochs, "batch_size": plan.batch_size, "steps": plan.steps,
            "auto": list(plan.auto)}


def run_crt(
    ctx: Context,
    views: int = 0,
    log: Optional[Callable[[str], None]] = None,
    grid: Optional[tuple[Sequence[float], Sequence[float]]] = None,
    seeds: Optional[Sequence[int]] = None,
    **params: Any,
) -> tuple[dict, CRT]:
    """cRT with ``params`` (CRT's keyword arguments); ``views`` > 0 trains on K stored views.

    ``seeds`` (more than one): one head per seed, trained in one pass (:func:`fit_seeds`); the
    first seed's head is reported, with ``"over_seeds"`` as in :func:`run_seeds`.

    ``grid`` = (lrs, weight_decays) trains every combination in one pass (:class:`CRTGrid`) and
    selects the best val top-1; the result (of the selected head) then also has ``"grid"``: one
    ``{"lr", "weight_decay", "best_epoch", "diverged", <split>: metrics}`` per head, and ``"selected"``.
    """
    X, y = ctx.train()
    Xv, yv = ctx.val()
    V = ctx.views(views) if views else None
    params = {"seed": ctx.seed, **params}
    head = CRT(device=ctx.device, progress=_epoch_logger("crt", log), **params)
    fit = dict(views=V, num_classes=ctx.store.num_classes)
    extra: dict[str, Any] = {}
    others: Optional[list[dict]] = None
    if seeds is not None and len(seeds) > 1:
        if grid is not None:
            raise ValueError("a cRT grid with several seeds: run one seed per grid, or one (lr, weight decay) pair")
        members = fit_seeds(head, seeds, X, y, Xv, yv, **fit)
        diverged = [e.seed for e in members if e.history_.diverged]
        if diverged:
            raise ValueError(f"cRT training diverged with seed(s) {diverged}; lower the learning rate or rescale "
                             "the features (e.g. divide them by their mean L2 norm)")
        head = members[0]
        others = [ctx.report(e, protocol=False) for e in members[1:]]
    elif grid is None:
        head.fit(X, y, Xv, yv, **fit)
    else:
        if Xv is None:
            raise ValueError(f"a cRT grid selects its head on val, and {ctx.store.path} has no 'val' split")
        search = CRTGrid(head, *grid).fit(X, y, Xv, yv, **fit)
        head = search.best_estimator_
        extra["grid"] = [
            {
                "lr": e.lr,
                "weight_decay": e.weight_decay,
                "best_epoch": e.history_.best_epoch,
                "diverged": e.history_.diverged,
                **({s: None for s in ctx.eval_splits} if e.history_.diverged else ctx.report(e, protocol=False)),
            }
            for e in search.estimators_
        ]
        extra["selected"] = {
            "index": search.best_index_, "lr": head.lr, "weight_decay": head.weight_decay,
            "selected_on": "val", "metric": "top1", "val_top1": search.val_scores_[search.best_index_].item(),
        }
    reported = ctx.report(head)
    if others is not None:
        extra["over_seeds"] = {"seeds": list(seeds), **seed_summary([reported, *others], ctx.eval_splits)}
    return {
        "method": "crt",
        "params": {**_trained_params(head, ()), "views": views},
        "history": _history(head.history_),
        **reported,
        **extra,
    }, head


def _run_on_joint(ctx: Context, method: str, cls: type, log: Optional[Callable[[str], None]], params: dict
                  ) -> tuple[dict, Any]:
    """A head trained by SGD from the stored classifier (LWS, MARC, WB): ``cls(W, b, **params)``."""
    W, b = ctx.head()
    X, y = ctx.train()
    Xv, yv = ctx.val()
    params = {"seed": ctx.seed, **params}
    fit = {}
    if issubclass(cls, JointLogitCalibration):
        if ctx.share_joint_logits:  # LWS and MARC of one compare (or the seeds of one) share the joint logits
            fit["logits_cache"] = ctx.joint_logits_cache
        if ctx.max_memory is not None:  # the logit cache gets the other half
            params.setdefault("max_cache_gb", ctx.max_memory / 2 / 2**30)
    head = cls(W, b, device=ctx.device, progress=_epoch_logger(method, log), **params).fit(X, y, Xv, yv, **fit)
    cache = {"logits_cache": head.cache_dtype_} if hasattr(head, "cache_dtype_") else {}  # precision it trained on
    return {"method": method, "params": _trained_params(head, ("weight", "bias")), **cache,
            "history": _history(head.history_), **ctx.report(head)}, head


def run_lws(ctx: Context, log: Optional[Callable[[str], None]] = None, **params: Any) -> tuple[dict, LWS]:
    """LWS on the stored classifier with ``params`` (LWS's keyword arguments)."""
    return _run_on_joint(ctx, "lws", LWS, log, params)


def run_marc(ctx: Context, log: Optional[Callable[[str], None]] = None, **params: Any) -> tuple[dict, MARC]:
    """MARC (ω_j z_j + β_j ‖w_j‖) on the stored classifier; the result adds ``omega`` and ``beta`` (C,)."""
    result, head = _run_on_joint(ctx, "marc", MARC, log, params)
    return {**result, "omega": head.omega_, "beta": head.beta_}, head


def run_wb(ctx: Context, log: Optional[Callable[[str], None]] = None, **params: Any) -> tuple[dict, WeightBalancing]:
    """Weight balancing stage 2 from the stored classifier; the result adds the MaxNorm ``radius``
    and the per-class weight ``norms`` (C,) after training."""
    result, head = _run_on_joint(ctx, "wb", WeightBalancing, log, params)
    return {**result, "radius": head.radius_, "norms": head.norms_}, head


def run_knn(ctx: Context, k: int = 20, temperature: float = 0.07, balance: float = 0.0) -> tuple[dict, KNN]:
    """Weighted kNN on the train rows (votes exp(sim / T) of the k nearest, divided by n_c^balance)."""
    X, y = ctx.train()
    head = KNN(k, temperature, balance=balance, device=ctx.device).fit(X, y, num_classes=ctx.store.num_classes)
    return {"method": "knn", "k": k, "temperature": temperature, "balance": balance, **ctx.report(head)}, head


def run_linear_probe(
    ctx: Context, C: float = 1.0, C_grid: Optional[Sequence[float]] = None, **params: Any
) -> tuple[dict, LinearProbe]:
    """L-BFGS logistic regression (scikit-learn's objective) with ``params`` (LinearProbe's keywords).

    With ``C_grid`` every C is fitted and the best val top-1 is kept; the result then also has
    ``"grid"``: one ``{"C", "val_top1", "n_iter", "converged"}`` per C, and ``"selected_on": "val"``.
    """
    X, y = ctx.train()
    probe = LinearProbe(C, device=ctx.device, **params)
    extra: dict[str, Any] = {}
    if C_grid:
        Xv, yv = ctx.val()
        if Xv is None:
            raise ValueError(f"a C grid selects C on val, and {ctx.store.path} has no 'val' split")
        probe, extra["grid"] = fit_C_grid(probe, X, y, Xv, yv, C_grid, ctx.store.num_classes)
        extra["selected_on"] = "val"
    else:
        probe.fit(X, y, ctx.store.num_classes)
    shown = {k: v for k, v in probe.get_params().items() if k not in ("device", "chunk")}
    return {"method": "linear_probe", **shown, "n_iter": probe.n_iter_, "converged": probe.converged_,
            **extra, **ctx.report(probe)}, probe


def run_tau_selected(ctx: Context) -> tuple[dict, TauNorm]:
    """tau-norm with tau selected on val (as in ``compare``), reported on every eval split."""
    if not ctx.has_rows("val"):
        raise ValueError("tau-norm needs a 'val' split with rows to select tau on (see `ltr tau-sweep --select-on`)")
    W, _ = ctx.head()
    Xv, yv = ctx.load("val")
    head = TauNorm(W, device=ctx.device)
    head.fit(Xv, yv, ctx.counts, logits=ctx.stored_logits("val", resolve_device(ctx.device)))
    return {"method": "tau_norm", "selected_tau": head.tau_, "selected_on": "val", **ctx.report(head)}, head


def run_logit_adjust_selected(ctx: Context) -> tuple[dict, LogitAdjustment]:
    """Logit adjustment of the stored classifier, tau selected on val (as in ``compare``)."""
    if not ctx.has_rows("val"):
        raise ValueError("logit adjustment needs a 'val' split with rows to select tau on "
                         "(see `ltr logit-adjust --select-on`)")
    base = _joint_head(ctx)
    head = LogitAdjustment(base, ctx.counts).fit(*ctx.load("val"), logits=ctx.stored_logits("val", base._device))
    return {"method": "logit_adjust", "selected_tau": head.tau_, "selected_on": "val", **ctx.report(head)}, head


def run_pc_softmax(ctx: Context) -> tuple[dict, LogitAdjustment]:
    """PC softmax: the stored classifier's logits minus log π (logit adjustment at tau = 1)."""
    head = pc_softmax(_joint_head(ctx), ctx.counts)
    return {"method": "pc_softmax", "tau": 1.0, **ctx.report(head)}, head


_RUNNERS: dict[str, Callable[..., tuple[dict, Any]]] = {
    "joint": run_joint,
    "ncm": run_ncm,
    "crt": run_crt,
    "tau_norm": run_tau_selected,
    "lws": run_lws,
    "logit_adjust": run_logit_adjust_selected,
    "pc_softmax": run_pc_softmax,
    "marc": run_marc,
    "wb": run_wb,
    "knn": run_knn,
    "linear_probe": run_linear_probe,
}
# name -> (runner, needs a stored head), in the order ``compare`` runs them (names: lt_rebalance.names)
METHODS: dict[str, tuple[Callable[..., tuple[dict, Any]], bool]] = {
    name: (_RUNNERS[name], name in HEAD_METHODS) for name in METHOD_NAMES
}
SELECTED_ON_VAL = ("tau_norm", "logit_adjust")  # skipped by ``compare`` when the file has no val rows
JOINT_LOGIT_METHODS = ("lws", "marc")  # trained on the cached joint logits (Context.joint_logits_cache)
# scored as per-class affine maps of the stored classifier's logits (Context.share_joint_logits)
JOINT_AFFINE_METHODS = ("joint", "tau_norm", "lws", "logit_adjust", "pc_softmax", "marc")


def run_seeds(ctx: Context, method: str, seeds: Sequence[int], **kwargs: Any) -> tuple[dict, Any]:
    """Train ``method`` (crt, lws, marc, wb: :data:`~lt_rebalance.names.TRAINED_METHODS`) once per seed; the first
    seed's result and head.

    cRT trains its seeds as members of one batched run (:func:`run_crt`); LWS, MARC and WB run them in turn.

    The result gains ``"over_seeds": {"seeds": [...], <split>: {metric: {"mean", "std"}}}`` (sample
    std); the protocol (bootstrap, shifted priors) is computed for the first seed's head only.
    """
    if method not in TRAINED_METHODS:
        raise ValueError(f"--seeds applies to the trained heads ({', '.join(TRAINED_METHODS)}); got {method!r}")
    if method == "crt" and kwargs.get("grid") is None:
        return run_crt(ctx, seeds=seeds, **kwargs)  # the seeds as members of one batched run
    runner = METHODS[method][0]
    runs = []
    try:  # the seeds share the joint logits (LWS, MARC) and the kept evaluation logits
        for i, seed in enumerate(seeds):
            sub = replace(ctx, seed=seed, protocol=ctx.protocol if i == 0 else Protocol(), share_joint_logits=True)
            result, head = runner(sub, **kwargs)
            runs.append((result, head))
    finally:
        if not ctx.share_joint_logits:  # not inside a compare that still needs them
            ctx.release_joint_logits()
            ctx.release_shared_logits()
    first, head = runs[0]
    first["over_seeds"] = {"seeds": list(seeds), **seed_summary([r for r, _ in runs], ctx.eval_splits)}
    return first, head


def run_calibrate(
    ctx: Context, method: str, eval_split: str = "test", log: Optional[Callable[[str], None]] = None, **params: Any
) -> tuple[dict, TemperatureScaled]:
    """Temperature scaling of ``method``'s head (a :data:`METHODS` name; ``params`` go to its runner).

    T is fitted on val; NLL and ECE before and after are reported on ``eval_split``, over all rows
    and per shot group: ``{"method": "calibrate", "base_method", "temperature", "fit_on": "val",
    "eval_split", "before": {all|many|medium|few: {nll, ece, n}}, "after": {...}}``.
    """
    method = canonical_method(method)
    for split in ("val", eval_split):
        if split not in ctx.store.splits:
            raise ValueError(
                f"{ctx.store.path} has no {split!r} split, which calibration needs; available: "
                f"{', '.join(ctx.store.splits)}"
            )
    runner, needs_head = METHODS[method]
    if needs_head and not ctx.store.has_head:
        raise ValueError(f"{ctx.store.path} has no stored classifier, which {method} needs")
    _, head = runner(ctx, **({"log": log} if method in TRAINED_METHODS else {}), **params)
    scaled = TemperatureScaled(head).fit(*ctx.load("val"))
    X, y = ctx.load(eval_split)
    before, after = (
        calibration_from_rows(head_row_statistics(h, X, y, len(ctx.counts)), y, ctx.counts, **ctx.thresholds)
        for h in (head, scaled)
    )
    return {
        "method": "calibrate",
        "base_method": method,
        "temperature": scaled.temperature_,
        "fit_on": "val",
        "eval_split": eval_split,
        "before": before,
        "after": after,
    }, scaled


def compare(
    ctx: Context,
    methods: Optional[Sequence[str]] = None,
    overrides: Optional[dict[str, dict]] = None,
    log: Optional[Callable[[str], None]] = None,
    heads: Optional[dict[str, Any]] = None,
    seeds: Optional[Sequence[int]] = None,
    samples: Optional[list] = None,
) -> dict:
    """Run ``methods`` (default: :data:`DEFAULT_METHODS` that the file supports) with defaults; time each.

    ``overrides`` maps a method to keyword arguments for its runner (e.g. fewer epochs).
    ``heads``, when given, receives each method's fitted head (name -> head), e.g. to save one.
    ``seeds``: the trained heads run once per seed (:func:`run_seeds`). With ``ctx.protocol.bootstrap``
    each row gains ``"ci"`` and ``"vs_best"`` (paired differences against the best row, same
    resamples); ``samples``, when given, receives each row's bootstrap samples (for pooling files).
    Returns ``{"rows": [{"method", <split>: metrics, "seconds", ...}], "skipped": [...]}``.
    A random-init stored classifier (``/head`` attribute ``random_init``) is no stage-1 classifier:
    by default the methods built on it are skipped; named in ``methods``, they run and their row
    has ``"note"`` saying so.
    """
    names = [canonical_method(m) for m in methods] if methods else list(DEFAULT_METHODS)
    rows, skipped, row_samples = [], [], []
    ctx.share_joint_logits = len(set(names) & set(JOINT_AFFINE_METHODS)) > 1
    try:
        for i, name in enumerate(names):
            if not set(names[i:]) & set(JOINT_LOGIT_METHODS):
                ctx.release_joint_logits()  # no later method trains on the cached joint logits
            if not set(names[i:]) & set(JOINT_AFFINE_METHODS):
                ctx.release_shared_logits()  # nor is scored from the kept evaluation logits
            runner, needs_head = METHODS[name]
            if needs_head and not ctx.store.has_head:
                skipped.append({"method": name, "reason": "the file has no stored classifier"})
                continue
            note = RANDOM_HEAD_NOTE if needs_head and ctx.store.head_random_init else None
            if note and not methods:
                skipped.append({"method": name, "reason": note})
                continue
            kwargs = dict((overrides or {}).get(name, {}))
            if name in TRAINED_METHODS:
                kwargs["log"] = log
            t0 = time.perf_counter()
            try:
                if seeds and len(seeds) > 1 and name in TRAINED_METHODS:
                    row, head = run_seeds(ctx, name, seeds, **kwargs)
                else:
                    row, head = runner(replace(ctx, seed=seeds[0]) if seeds and name in TRAINED_METHODS else ctx, **kwargs)
            except ValueError as e:
                if name in SELECTED_ON_VAL and not ctx.has_rows("val"):
                    skipped.append({"method": name, "reason": str(e)})
                    continue
                raise
            if heads is not None:
                heads[name] = head
            row.pop("history", None)
            if note:
                row["note"] = note
            row["seconds"] = round(time.perf_counter() - t0, 4)
            rows.append(row)
            row_samples.append(dict(ctx.samples))
            if log:
                p = row.get("params", {})
                steps = f" ({p['epochs']} epochs x batch {p['batch_size']} = {p['steps']} steps)" if "steps" in p else ""
                log(f"{name}: {row['seconds']:.2f} s{steps}")
    finally:
        ctx.release_joint_logits()
        ctx.release_shared_logits()
        ctx.share_joint_logits = False
    if ctx.protocol.bootstrap and samples is None:
        paired_differences(rows, row_samples, ctx.protocol.ci_level)
    if samples is not None:
        samples.extend(row_samples)
    return {"rows": rows, "skipped": skipped, "eval_splits": list(ctx.eval_splits), "thresholds": ctx.group_thresholds}


def check_same_classes(contexts: Sequence[Context]) -> None:
    """ValueError (with the reason) unless every file has the same classes, train counts and splits."""
    first = contexts[0]
    for ctx in contexts[1:]:
        a, b = first.store, ctx.store
        if b.num_classes != a.num_classes:
            reason = f"{b.num_classes} classes vs {a.num_classes}"
        elif a.class_names is not None and b.class_names is not None and a.class_names != b.class_names:
            i = next(k for k, (x, y) in enumerate(zip(a.class_names, b.class_names)) if x != y)
            reason = f"class {i} is {b.class_names[i]!r} vs {a.class_names[i]!r}"
        elif not torch.equal(ctx.counts, first.counts):
            i = int((ctx.counts != first.counts).nonzero()[0])
            reason = f"class {i} has {int(ctx.counts[i])} train rows vs {int(first.counts[i])}"
        elif list(ctx.eval_splits) != list(first.eval_splits):
            reason = f"evaluation splits {', '.join(ctx.eval_splits)} vs {', '.join(first.eval_splits)}"
        else:
            continue
        raise ValueError(f"cannot compare {b.path} with {a.path}: {reason}; the files of one compare must "
                         "share classes, train counts and splits (stage-1 representations of one dataset)")


def compare_files(
    contexts: Sequence[Context],
    labels: Sequence[str],
    methods: Optional[Sequence[str]] = None,
    overrides: Optional[dict[str, dict]] = None,
    log: Optional[Callable[[str], None]] = None,
    heads: Optional[dict[str, dict[str, Any]]] = None,
    seeds: Optional[Sequence[int]] = None,
) -> dict:
    """:func:`compare` on several feature files (``labels``: their paths as given) in one result.

    Every row and skipped entry gains ``"features"``. With a bootstrap, the paired differences are
    against the best row of all files when their test labels are identical (same rows, same order:
    the same resamples apply), else against the best row of the same file. ``heads``, when given,
    receives label -> method -> fitted head. For one file, ``"features"`` is its path, else the list.
    """
    check_same_classes(contexts)
    rows, skipped, samples, owners = [], [], [], []
    for label, ctx in zip(labels, contexts):
        if log and len(contexts) > 1:
            log(f"== {label}")
        file_heads = {} if heads is not None else None
        part = compare(ctx, methods, overrides, log, heads=file_heads, seeds=seeds, samples=samples)
        if heads is not None:
            heads[label] = file_heads
        for r in (*part["rows"], *part["skipped"]):
            r["features"] = label
        rows += part["rows"]
        skipped += part["skipped"]
        owners += [label] * len(part["rows"])
    if contexts[0].protocol.bootstrap:
        same_test = all("test" in c.store.splits and torch.equal(c.load("test")[1], contexts[0].load("test")[1])
                        for c in contexts) if "test" in contexts[0].store.splits else False
        groups = [list(range(len(rows)))] if same_test else \
            [[i for i, o in enumerate(owners) if o == label] for label in labels]
        for g in groups:
            paired_differences([rows[i] for i in g], [samples[i] for i in g], contexts[0].protocol.ci_level)
    return {"rows": rows, "skipped": skipped, "eval_splits": list(contexts[0].eval_splits),
            "thresholds": contexts[0].group_thresholds, "features": labels[0] if len(labels) == 1 else list(labels),
            **({"protocol": contexts[0].protocol.describe()} if contexts[0].protocol.active else {})}

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
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from .heads import CRT, KNN, LWS, MARC, NCM, JointHead, LinearProbe, TauNorm, WeightBalancing, tau_sweep
from .heads.base import all_finite
from .heads.crt_grid import CRTGrid
from .heads.linear_probe import fit_C_grid
from .heads.tau_norm import DEFAULT_TAUS
from .metrics import DEFAULT_FEW, DEFAULT_MANY
from .posthoc import (
    LogitAdjustment,
    TemperatureScaled,
    calibration_metrics,
    logit_adjust_sweep,
    pc_softmax,
    select_tau,
)
from .store import FeatureStore

CURVE_KEYS = ("all", "many", "medium", "few", "mean_class")


@dataclass
class Context:
    """A feature file and the choices shared by every method of a run.

    ``eval_splits``: the splits to report (default: val and test when present, else every
    non-train split). Loaded splits and the stored classifier are cached, so ``compare`` reads
    each of them once.
    """

    store: FeatureStore
    eval_splits: Sequence[str] = ()
    device: str = "cpu"
    seed: int = 0
    thresholds: dict = field(default_factory=dict)  # many=, few= for the shot groups
    _cache: dict = field(default_factory=dict, repr=False)
    _head: Optional[tuple] = field(default=None, repr=False)

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

    def load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._cache:
            X, y = self.store.load(split)
            if not all_finite(X):
                bad = int((~torch.isfinite(X)).any(dim=1).sum())
                raise ValueError(
                    f"{self.store.path}: split {split!r} has {bad} feature row(s) with NaN/Inf values; "
                    f"`ltr check {self.store.path}` lists every problem, re-extract the file to fix it"
                )
            self._cache[split] = (X, y)
        return self._cache[split]

    def head(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The stored stage-1 classifier (:meth:`FeatureStore.head`), read once."""
        if self._head is None:
            self._head = self.store.head()
        return self._head

    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        if "train" not in self.store.splits:
            raise ValueError(f"{self.store.path} has no 'train' split, which this method trains on")
        return self.load("train")

    def val(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        return self.load("val") if "val" in self.store.splits else (None, None)

    def report(self, head: Any) -> dict[str, dict]:
        """Metrics of a fitted head on every evaluation split."""
        out = {}
        for split in self.eval_splits:
            X, y = self.load(split)
            out[split] = head.evaluate(X, y, self.counts, **self.thresholds)
        return out


def _joint_head(ctx: Context) -> JointHead:
    W, b = ctx.head()
    return JointHead(W, b).fit()


def run_joint(ctx: Context) -> tuple[dict, JointHead]:
    """The stored stage-1 classifier (logits = X Wᵀ + b)."""
    head = _joint_head(ctx)
    return {"method": "joint", **ctx.report(head)}, head


def run_ncm(ctx: Context, variant: str = "cl2n") -> tuple[dict, NCM]:
    X, y = ctx.train()
    head = NCM(variant).fit(X, y, num_classes=ctx.store.num_classes)
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
    X, y = ctx.load(eval_split)
    metrics = head.evaluate(X, y, ctx.counts, **ctx.thresholds)
    return {**result, "selected_tau": tau, "selected_on": select_on, eval_split: metrics}, head


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
    W, _ = ctx.head()
    return _sweep_report(
        ctx, "tau_norm", lambda X, y: tau_sweep(X, y, W, ctx.counts, taus, **ctx.thresholds),
        lambda tau: TauNorm(W, tau).fit(), taus, select_on, metric, eval_split,
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


def _epoch_logger(method: str, log: Optional[Callable[[str], None]]):
    if log is None:
        return None

    def progress(epoch: int, epochs: int, loss: float, val: Optional[float]) -> None:
        v = "" if val is None else f"  val top-1 {100 * val:.2f}%"
        log(f"{method} epoch {epoch + 1}/{epochs}  loss {loss:.4f}{v}")

    return progress


def _history(h) -> dict:
    return {"loss": h.loss, "lr": h.lr, "val_top1": h.val, "best_epoch": h.best_epoch}


def run_crt(
    ctx: Context,
    views: int = 0,
    log: Optional[Callable[[str], None]] = None,
    grid: Optional[tuple[Sequence[float], Sequence[float]]] = None,
    **params: Any,
) -> tuple[dict, CRT]:
    """cRT with ``params`` (CRT's keyword arguments); ``views`` > 0 trains on K stored views.

    ``grid`` = (lrs, weight_decays) trains every combination in one pass (:class:`CRTGrid`) and
    selects the best val top-1; the result (of the selected head) then also has ``"grid"``: one
    ``{"lr", "weight_decay", "best_epoch", "diverged", <split>: metrics}`` per head, and ``"selected"``.
    """
    X, y = ctx.train()
    Xv, yv = ctx.val()
    V = ctx.store.views("train", views, dtype="stored") if views else None
    params = {"seed": ctx.seed, **params}
    head = CRT(device=ctx.device, progress=_epoch_logger("crt", log), **params)
    fit = dict(views=V, num_classes=ctx.store.num_classes)
    extra: dict[str, Any] = {}
    if grid is None:
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
                **({s: None for s in ctx.eval_splits} if e.history_.diverged else ctx.report(e)),
            }
            for e in search.estimators_
        ]
        extra["selected"] = {
            "index": search.best_index_, "lr": head.lr, "weight_decay": head.weight_decay,
            "selected_on": "val", "metric": "top1", "val_top1": search.val_scores_[search.best_index_].item(),
        }
    shown = {k: v for k, v in head.get_params().items() if k not in ("progress", "device")}
    return {
        "method": "crt",
        "params": {**shown, "views": views},
        "history": _history(head.history_),
        **ctx.report(head),
        **extra,
    }, head


def _run_on_joint(ctx: Context, method: str, cls: type, log: Optional[Callable[[str], None]], params: dict
                  ) -> tuple[dict, Any]:
    """A head trained by SGD from the stored classifier (LWS, MARC, WB): ``cls(W, b, **params)``."""
    W, b = ctx.head()
    X, y = ctx.train()
    Xv, yv = ctx.val()
    params = {"seed": ctx.seed, **params}
    head = cls(W, b, device=ctx.device, progress=_epoch_logger(method, log), **params).fit(X, y, Xv, yv)
    shown = {k: v for k, v in head.get_params().items() if k not in ("progress", "device", "weight", "bias")}
    return {"method": method, "params": shown, "history": _history(head.history_), **ctx.report(head)}, head


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
    if "val" not in ctx.store.splits:
        raise ValueError("tau-norm needs a 'val' split to select tau on (see `ltr tau-sweep --select-on`)")
    W, _ = ctx.head()
    Xv, yv = ctx.load("val")
    head = TauNorm(W).fit(Xv, yv, ctx.counts)
    return {"method": "tau_norm", "selected_tau": head.tau_, "selected_on": "val", **ctx.report(head)}, head


def run_logit_adjust_selected(ctx: Context) -> tuple[dict, LogitAdjustment]:
    """Logit adjustment of the stored classifier, tau selected on val (as in ``compare``)."""
    if "val" not in ctx.store.splits:
        raise ValueError("logit adjustment needs a 'val' split to select tau on (see `ltr logit-adjust --select-on`)")
    head = LogitAdjustment(_joint_head(ctx), ctx.counts).fit(*ctx.load("val"))
    return {"method": "logit_adjust", "selected_tau": head.tau_, "selected_on": "val", **ctx.report(head)}, head


def run_pc_softmax(ctx: Context) -> tuple[dict, LogitAdjustment]:
    """PC softmax: the stored classifier's logits minus log π (logit adjustment at tau = 1)."""
    head = pc_softmax(_joint_head(ctx), ctx.counts)
    return {"method": "pc_softmax", "tau": 1.0, **ctx.report(head)}, head


# name -> (runner, needs a stored head); ``compare`` runs them in this order
METHODS: dict[str, tuple[Callable[..., tuple[dict, Any]], bool]] = {
    "joint": (run_joint, True),
    "ncm": (run_ncm, False),
    "crt": (run_crt, False),
    "tau_norm": (run_tau_selected, True),
    "lws": (run_lws, True),
    "logit_adjust": (run_logit_adjust_selected, True),
    "pc_softmax": (run_pc_softmax, True),
    "marc": (run_marc, True),
    "wb": (run_wb, True),
    "knn": (run_knn, False),
    "linear_probe": (run_linear_probe, False),
}
SELECTED_ON_VAL = ("tau_norm", "logit_adjust")  # skipped by ``compare`` when the file has no val split
TRAINED = ("crt", "lws", "marc", "wb")  # runners that take ``log`` (per-epoch progress)
# run by ``compare`` only when named: each costs more than the rest of the study on ImageNet-LT-sized
# files on a CPU (kNN: one eval x train similarity GEMM; the probe: up to max_iter passes of two GEMMs)
OPT_IN = ("knn", "linear_probe")
DEFAULT_METHODS = tuple(m for m in METHODS if m not in OPT_IN)


def run_calibrate(
    ctx: Context, method: str, eval_split: str = "test", log: Optional[Callable[[str], None]] = None, **params: Any
) -> tuple[dict, TemperatureScaled]:
    """Temperature scaling of ``method``'s head (a :data:`METHODS` name; ``params`` go to its runner).

    T is fitted on val; NLL and ECE before and after are reported on ``eval_split``, over all rows
    and per shot group: ``{"method": "calibrate", "base_method", "temperature", "fit_on": "val",
    "eval_split", "before": {all|many|medium|few: {nll, ece, n}}, "after": {...}}``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    for split in ("val", eval_split):
        if split not in ctx.store.splits:
            raise ValueError(
                f"{ctx.store.path} has no {split!r} split, which calibration needs; available: "
                f"{', '.join(ctx.store.splits)}"
            )
    runner, needs_head = METHODS[method]
    if needs_head and not ctx.store.has_head:
        raise ValueError(f"{ctx.store.path} has no stored classifier, which {method} needs")
    _, head = runner(ctx, **({"log": log} if method in TRAINED else {}), **params)
    scaled = TemperatureScaled(head).fit(*ctx.load("val"))
    X, y = ctx.load(eval_split)
    before, after = (
        calibration_metrics(h.decision_function(X), y, ctx.counts, **ctx.thresholds) for h in (head, scaled)
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
) -> dict:
    """Run ``methods`` (default: :data:`DEFAULT_METHODS` that the file supports) with defaults; time each.

    ``overrides`` maps a method to keyword arguments for its runner (e.g. fewer epochs).
    ``heads``, when given, receives each method's fitted head (name -> head), e.g. to save one.
    Returns ``{"rows": [{"method", <split>: metrics, "seconds", ...}], "skipped": [...]}``.
    """
    names = list(methods or DEFAULT_METHODS)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    rows, skipped = [], []
    for name in names:
        runner, needs_head = METHODS[name]
        if needs_head and not ctx.store.has_head:
            skipped.append({"method": name, "reason": "the file has no stored classifier"})
            continue
        kwargs = dict((overrides or {}).get(name, {}))
        if name in TRAINED:
            kwargs["log"] = log
        t0 = time.perf_counter()
        try:
            row, head = runner(ctx, **kwargs)
        except ValueError as e:
            if name in SELECTED_ON_VAL and "val" not in ctx.store.splits:
                skipped.append({"method": name, "reason": str(e)})
                continue
            raise
        if heads is not None:
            heads[name] = head
        row.pop("history", None)
        row["seconds"] = round(time.perf_counter() - t0, 4)
        rows.append(row)
        if log:
            log(f"{name}: {row['seconds']:.2f} s")
    return {"rows": rows, "skipped": skipped, "eval_splits": list(ctx.eval_splits), "thresholds": ctx.group_thresholds}

"""The τ sweeps of ``ltr tau-sweep`` and ``ltr logit-adjust``: curves on val and test, τ selected on
val (or as asked), the head at that τ reported."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

from ..evaluation import Evaluation, evaluate_split
from ..heads import TauNorm, tau_sweep
from ..heads.tau_norm import DEFAULT_TAUS
from ..posthoc import LogitAdjustment, logit_adjust_sweep, select_tau
from ..session import Session
from . import MethodRun
from .stored_head import joint_head

CURVE_KEYS = ("all", "many", "medium", "few", "mean_class")


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


def _sweep(
    session: Session,
    method: str,
    sweep: Callable[[torch.Tensor, torch.Tensor], dict],
    make_head: Callable[[float], Any],
    taus: Sequence[float],
    select_on: Optional[str],
    metric: str,
    eval_split: str,
) -> MethodRun:
    """Curves of ``sweep(X, y)`` on val and test, τ selected on ``select_on``, ``make_head(τ)`` reported."""
    store = session.store
    curve_splits = [s for s in ("val", "test") if s in store.splits]
    for s in (select_on, eval_split):
        if s is not None and s not in store.splits:
            raise ValueError(f"{store.path} has no split {s!r}; available: {', '.join(store.splits)}")
    if select_on is not None and not session.has_rows(select_on):
        raise ValueError(f"split {select_on!r} of {store.path} has no rows, so tau cannot be selected on it; "
                         "pass --select-on test (reported as such) or --select-on none (curves only)")
    if eval_split not in curve_splits:
        curve_splits.append(eval_split)
    curves = {}
    for split in curve_splits:
        c = sweep(*session.load(split))
        curves[split] = {k: c[k].tolist() for k in CURVE_KEYS}
    result = {"method": method, "taus": list(taus), "curves": curves, "metric": metric}
    if select_on is None:
        return MethodRun({**result, "selected_tau": None, "selected_on": None, eval_split: None}, None)
    try:
        tau = select_tau(curves[select_on], taus, metric)
    except ValueError:
        raise ValueError(f"cannot select tau on {select_on!r} by {metric!r}: it is undefined on that split") from None
    head = make_head(tau)
    ev = Evaluation({eval_split: evaluate_split(session, head, eval_split)})
    if session.protocol.active:
        ev.protocol = session.protocol.describe()
    return MethodRun({**result, "selected_tau": tau, "selected_on": select_on, **ev.result()}, head, ev.samples)


def run_tau_sweep(
    session: Session,
    taus: Sequence[float] = DEFAULT_TAUS,
    select_on: Optional[str] = "val",
    metric: str = "top1",
    eval_split: str = "test",
) -> MethodRun:
    """τ-normalisation curves on val and test, τ selected on ``select_on`` (None: no selection).

    Result: ``{"method": "tau_norm", "taus", "curves": {split: {all, many, medium, few,
    mean_class}}, "selected_tau", "selected_on", "metric", eval_split: metrics at the selected τ}``.
    """
    W = session.head()[0].to(session.device)  # the sweep runs on W's device: each split moves there once
    precision = session.precision_for("tau_norm")
    run = _sweep(
        session, "tau_norm",
        lambda X, y: tau_sweep(X, y, W, session.counts, taus, precision=precision, **session.thresholds),
        lambda tau: TauNorm(W, tau, device=session.device, precision=precision).fit(), taus, select_on, metric,
        eval_split,
    )
    run.result["precision"] = precision
    return run


def run_logit_adjust_sweep(
    session: Session,
    taus: Sequence[float] = DEFAULT_TAUS,
    select_on: Optional[str] = "val",
    metric: str = "top1",
    eval_split: str = "test",
    empty_classes: str = "one-row",
) -> MethodRun:
    """Logit adjustment of the stored classifier (z − τ·log π); the result shape of :func:`run_tau_sweep`,
    with ``"empty_classes"``: how a class without train rows is adjusted (:class:`LogitAdjustment`)."""
    base = joint_head(session, "logit_adjust")
    run = _sweep(
        session, "logit_adjust",
        lambda X, y: logit_adjust_sweep(X, y, base.weight_, base.bias_, session.counts, taus,
                                        empty_classes=empty_classes, precision=base.precision_,
                                        **session.thresholds),
        lambda tau: LogitAdjustment(base, session.counts, tau, empty_classes=empty_classes).fit(), taus, select_on,
        metric, eval_split,
    )
    run.result["empty_classes"] = empty_classes
    run.result["precision"] = base.precision_
    return run

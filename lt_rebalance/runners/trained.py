"""Methods trained by SGD on the cached features: cRT (a fresh linear head), and LWS, MARC, DisAlign and
weight balancing (trained from the stored classifier)."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

from ..evaluation import report
from ..heads import CRT, LWS, MARC, DisAlign, WeightBalancing
from ..heads.crt_grid import CRTGrid, fit_seeds
from ..heads.lws import JointLogitCalibration
from ..logit_store import LogitStore, joint_cache_gb
from ..protocols import seed_summary
from ..session import Session
from . import MethodRun, evaluated

Log = Optional[Callable[[str], None]]
MAX_EPOCH_LINES = 20  # per-epoch progress lines of a run (many short epochs are logged every k-th)
# what a head's protocol_params_ records beyond its parameters, copied into a result's params
RECORDED = ("protocol", "loss", "projection", "epoch_batches", "steps_per_epoch")


def epoch_logger(method: str, log: Log):
    """The ``progress`` callback of a trained head: at most :data:`MAX_EPOCH_LINES` lines to ``log``."""
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
    """``params`` of a trained result: its settings, with the epochs and batch size actually run.

    ``auto`` lists the settings that were "auto" (:func:`~lt_rebalance.heads.training.plan_schedule`),
    ``steps`` the optimiser steps. Settings a protocol resolved (None in ``get_params``: MARC's lr,
    sampler, loss; weight balancing's schedule) are the values run, and what the head records of its
    protocol beyond its parameters (:data:`RECORDED`) is added.
    """
    plan = head.schedule_
    shown = {k: v for k, v in head.get_params().items() if k not in ("progress", "device", *drop)}
    ran = getattr(head, "protocol_params_", {})  # settings a protocol resolved (None in get_params)
    shown.update({k: ran[k] for k, v in shown.items() if v is None and k in ran})
    shown.update({k: ran[k] for k in RECORDED if k in ran and k not in shown})
    return {**shown, "epochs": plan.epochs, "batch_size": plan.batch_size, "steps": plan.steps,
            "auto": list(plan.auto)}


def run_crt(
    session: Session,
    views: int = 0,
    log: Log = None,
    grid: Optional[tuple[Sequence[float], Sequence[float]]] = None,
    seeds: Optional[Sequence[int]] = None,
    **params: Any,
) -> MethodRun:
    """cRT with ``params`` (CRT's keyword arguments); ``views`` > 0 trains on K stored views.

    ``seeds`` (more than one): one head per seed, trained in one pass (:func:`fit_seeds`); the
    first seed's head is reported, with ``"over_seeds"`` as in :func:`lt_rebalance.study.run_seeds`.

    ``grid`` = (lrs, weight_decays) trains every combination in one pass (:class:`CRTGrid`) and
    selects the best val top-1; the result (of the selected head) then also has ``"grid"``: one
    ``{"lr", "weight_decay", "best_epoch", "diverged", <split>: metrics}`` per head, and ``"selected"``.
    """
    X, y = session.train()
    Xv, yv = session.val()
    V = session.views(views) if views else None
    params = {"seed": session.seed, "precision": session.precision_for("crt"), **params}
    head = CRT(device=session.device, progress=epoch_logger("crt", log), **params)
    fit = dict(views=V, num_classes=session.num_classes)
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
        others = [report(session, e, protocol=False) for e in members[1:]]
    elif grid is None:
        head.fit(X, y, Xv, yv, **fit)
    else:
        if Xv is None:
            raise ValueError(f"a cRT grid selects its head on val, and {session.store.path} has no 'val' split")
        search = CRTGrid(head, *grid).fit(X, y, Xv, yv, **fit)
        head = search.best_estimator_
        extra["grid"] = [
            {
                "lr": e.lr,
                "weight_decay": e.weight_decay,
                "best_epoch": e.history_.best_epoch,
                "diverged": e.history_.diverged,
                **({s: None for s in session.eval_splits} if e.history_.diverged
                   else report(session, e, protocol=False)),
            }
            for e in search.estimators_
        ]
        extra["selected"] = {
            "index": search.best_index_, "lr": head.lr, "weight_decay": head.weight_decay,
            "selected_on": "val", "metric": "top1", "val_top1": search.val_scores_[search.best_index_].item(),
        }
    run = evaluated(session, head, {"method": "crt", "params": {**_trained_params(head, ()), "views": views},
                                    "history": _history(head.history_)})
    if others is not None:
        extra["over_seeds"] = {"seeds": list(seeds), **seed_summary([run.result, *others], session.eval_splits)}
    run.result.update(extra)
    return run


def _run_on_stored(session: Session, method: str, cls: type, log: Log, params: dict,
                   logits: Optional[LogitStore]) -> MethodRun:
    """A head trained by SGD from the stored classifier (LWS, MARC, DisAlign, WB): ``cls(W, b, **params)``.

    LWS, MARC and DisAlign train on the joint logits of train and val (DisAlign's gate also reads
    each batch's features, from the train rows): ``logits`` holds them for the run
    (shared by the methods and seeds of one ``compare``); without it the head computes its own.
    """
    W, b = session.head()
    X, y = session.train()
    Xv, yv = session.val()
    params = {"seed": session.seed, "precision": session.precision_for(method), **params}
    fit = {}
    if issubclass(cls, JointLogitCalibration):
        params.setdefault("max_cache_gb", joint_cache_gb(session))
        if logits is not None:
            fit["joint_logits"] = logits.joint_logits(params.get("cache_dtype", "float16"),
                                                      precision=params["precision"])
    head = cls(W, b, device=session.device, progress=epoch_logger(method, log), **params).fit(X, y, Xv, yv, **fit)
    cache = {"logits_cache": head.cache_dtype_} if issubclass(cls, JointLogitCalibration) else {}
    return evaluated(session, head, {"method": method, "params": _trained_params(head, ("weight", "bias")), **cache,
                                     "history": _history(head.history_)}, logits)


def run_lws(session: Session, log: Log = None, logits: Optional[LogitStore] = None, **params: Any) -> MethodRun:
    """LWS on the stored classifier with ``params`` (LWS's keyword arguments)."""
    return _run_on_stored(session, "lws", LWS, log, params, logits)


def run_marc(session: Session, log: Log = None, logits: Optional[LogitStore] = None, **params: Any) -> MethodRun:
    """MARC (ω_j z_j + β_j ‖w_j‖) on the stored classifier; the result adds ``omega`` and ``beta`` (C,)."""
    run = _run_on_stored(session, "marc", MARC, log, params, logits)
    run.result.update(omega=run.head.omega_, beta=run.head.beta_)
    return run


def run_disalign(session: Session, log: Log = None, logits: Optional[LogitStore] = None, **params: Any
                 ) -> MethodRun:
    """DisAlign on the stored classifier with ``params`` (DisAlign's keyword arguments); the result adds
    ``alpha`` and ``beta`` (C,), the per-class scale and bias. Its scores are no affine map of the kept
    logits (the gate depends on x): it is evaluated from the features."""
    run = _run_on_stored(session, "disalign", DisAlign, log, params, logits)
    run.result.update(alpha=run.head.alpha_, beta=run.head.beta_)
    return run


def run_wb(session: Session, log: Log = None, **params: Any) -> MethodRun:
    """Weight balancing stage 2 from the stored classifier; the result adds the MaxNorm ``radius``
    and the per-class weight ``norms`` (C,) after training."""
    run = _run_on_stored(session, "wb", WeightBalancing, log, params, None)
    run.result.update(radius=run.head.radius_, norms=run.head.norms_.cpu())  # one copy, not a sync per class
    return run

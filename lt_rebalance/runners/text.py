"""Methods that use the file's text head (``/text_head``, written by ``ltr text-head``): zero-shot,
its GLA debiasing, GLA's combination with a trained classifier, and LIFT's text-initialised cosine
classifier (docs/METHODS.md, "Text heads")."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from ..heads import CRT, GLA, LinearProbe, TextInitCosine, ZeroShot, ZeroShotDebiased
from ..heads.tau_norm import DEFAULT_TAUS
from ..session import Session
from ..text_store import TextHead, read_text_head
from . import MethodRun, evaluated
from .stored_head import joint_head
from .trained import _history, _trained_params, epoch_logger

Log = Optional[Callable[[str], None]]
CLASSIFIERS = ("auto", "joint", "crt", "linear_probe")


def text_head(session: Session) -> TextHead:
    """The file's text head (FeatureFileError, a ValueError, when it has none)."""
    return read_text_head(session.store)


def _source(t: TextHead) -> dict:
    return {"text_head": {"model": t.model, "pretrained": t.pretrained, "templates": len(t.templates),
                          "logit_scale": t.logit_scale}}


def run_zero_shot(session: Session) -> MethodRun:
    """logit_scale · cos(x, t_c) with the file's text head."""
    t = text_head(session)
    head = ZeroShot(t.weight, t.logit_scale, device=session.device).fit()
    return evaluated(session, head, {"method": "zero_shot", **_source(t)})


def _debiased(session: Session, t: TextHead, tau: Optional[float], taus: Sequence[float], temperature: Any,
              target: str) -> ZeroShotDebiased:
    if not session.has_rows("val"):
        raise ValueError(f"{session.store.path} has no val rows: the pre-training prior and tau are estimated on val")
    head = ZeroShotDebiased(t.weight, t.logit_scale, tau=tau, taus=taus, temperature=temperature, target=target,
                            device=session.device)
    return head.fit(*session.load("val"))


def run_zero_shot_debiased(session: Session, tau: Optional[float] = None, taus: Sequence[float] = DEFAULT_TAUS,
                           temperature: Any = "auto", target: str = "labels") -> MethodRun:
    """Zero-shot minus τ · log q̂ (GLA's estimate of the pre-training prior on val), τ selected on val
    unless given. The result adds ``temperature``, ``selected_tau``, ``selected_on``, ``prior_target``
    and ``log_prior`` (C,)."""
    t = text_head(session)
    head = _debiased(session, t, tau, taus, temperature, target)
    return evaluated(session, head, {
        "method": "zero_shot_debiased", **_source(t), "temperature": head.temperature_, "selected_tau": head.tau_,
        "selected_on": "val" if tau is None else None, "prior_target": target, "log_prior": head.log_prior_})


def _classifier(session: Session, which: str, log: Log, params: dict) -> tuple[str, Any]:
    """The trained classifier GLA combines with the zero-shot scores: its name and fitted head."""
    if which == "auto":
        which = "joint" if session.store.has_head and not session.store.head_random_init else "linear_probe"
    if which == "joint":
        return which, joint_head(session)
    X, y = session.train()
    if which == "crt":
        Xv, yv = session.val()
        head = CRT(device=session.device, progress=epoch_logger("gla (crt)", log), **{"seed": session.seed, **params})
        return which, head.fit(X, y, Xv, yv, num_classes=session.num_classes)
    if which == "linear_probe":
        return which, LinearProbe(device=session.device, **params).fit(X, y, session.num_classes)
    raise ValueError(f"unknown GLA classifier {which!r}; choose one of {', '.join(CLASSIFIERS)}")


def run_gla(session: Session, classifier: str = "auto", temperature: Any = "auto", target: str = "labels",
            log: Log = None, **params: Any) -> MethodRun:
    """GLA: debiased zero-shot scores plus ``classifier`` (``auto``: the stored head when the file has a
    trained one, else the linear probe; ``crt``; ``linear_probe``; ``params`` go to it), both priors
    removed. The result adds ``classifier``, ``temperature`` and ``log_prior`` (C,)."""
    t = text_head(session)
    zs = _debiased(session, t, 1.0, (1.0,), temperature, target)
    name, f = _classifier(session, classifier, log, params)
    head = GLA(zs, f, session.counts).fit()
    return evaluated(session, head, {"method": "gla", **_source(t), "classifier": name,
                                     "temperature": zs.temperature_, "prior_target": target,
                                     "log_prior": zs.log_prior_})


def run_text_init(session: Session, log: Log = None, init: str = "text", **params: Any) -> MethodRun:
    """LIFT's cosine classifier (scale 25) initialised from the text head (``init="random"``: not) and
    trained with the logit-adjusted loss; ``params`` are TextInitCosine's keywords."""
    t = text_head(session)
    X, y = session.train()
    Xv, yv = session.val()
    head = TextInitCosine(t.weight, init=init, device=session.device, progress=epoch_logger("text_init", log),
                          **{"seed": session.seed, **params})
    head.fit(X, y, Xv, yv, num_classes=session.num_classes)
    return evaluated(session, head, {"method": "text_init", **_source(t),
                                     "params": _trained_params(head, ("weight",)),
                                     "history": _history(head.history_)})

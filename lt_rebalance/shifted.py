"""One head on the test split under shifted test priors: plain, known-prior and estimated-prior numbers.

For every shift of the protocol (:mod:`lt_rebalance.shifts`: LADE's forward-R, backward-R and
uniform, and step-R, dirichlet-A, knockout-P, tweakone-RHO), the test rows of the subset are scored
as they are (``"shifted"``) and after a prior correction (``"shifted_corrected"``): with the subset's
true prior (``known_prior``) and with the prior each estimator of the protocol finds on the
subset's scores (``em``, ``bbse``, ``rlls``, ``mapls``: :mod:`lt_rebalance.label_shift`), each with its
error against the true prior. Random kinds are drawn ``shift_draws`` times: numbers are means over
the draws, with their standard deviation (docs/METHODS.md, "Evaluation protocols").
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch

from .protocols import Protocol, correct_known, em_prior, shifted_metrics

METRICS = ("all", "many", "medium", "few", "n")


def prior_error(estimate: Any, true: np.ndarray) -> dict[str, float]:
    """{"l1": ‖p̂ − p‖₁, "mse": mean (p̂ − p)²} of an estimated prior against the true one."""
    d = np.asarray(torch.as_tensor(estimate, dtype=torch.float64).cpu()) - true
    return {"l1": float(np.abs(d).sum()), "mse": float(np.mean(d ** 2))}


def _mean(entries: list[dict]) -> dict:
    """The entries' numbers averaged (NaN-skipping per key); with several, ``"std"`` of each metric."""
    out: dict[str, Any] = {}
    for k, v in entries[0].items():
        if isinstance(v, dict):
            out[k] = _mean([e[k] for e in entries])
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = np.array([e[k] for e in entries], dtype=np.float64)
            ok = vals[~np.isnan(vals)]
            out[k] = float(ok.mean()) if len(ok) else float("nan")
            if isinstance(v, int) and len(entries) == 1:
                out[k] = v
        else:
            out[k] = v
    std = {k: float(np.nanstd([e[k] for e in entries], ddof=1)) for k in METRICS
           if len(entries) > 1 and k in entries[0] and not all(np.isnan(e[k]) for e in entries)}
    return {**out, **({"std": std} if std else {})}


def _corrections(kept: torch.Tensor, y: torch.Tensor, counts: Any, true: np.ndarray, implied: torch.Tensor,
                 protocol: Protocol, val: Optional[tuple[torch.Tensor, torch.Tensor]], thresholds: dict) -> dict:
    """``{"known_prior": metrics, <estimator>: {metrics, "prior_error", ...}}`` of the kept scores."""
    from .label_shift import estimate_prior_details

    rows = torch.ones(len(kept), dtype=torch.bool, device=kept.device)

    def metrics(pred: torch.Tensor) -> dict:
        return shifted_metrics(pred.to(kept.device), y, counts, rows, **thresholds)

    out = {"known_prior": metrics(correct_known(kept, torch.from_numpy(true), implied).argmax(1))}
    for method in protocol.prior_estimators:
        if method == "em" and protocol.calibration is None:  # Saerens et al.'s EM on the scores as they are
            p_em, iters = em_prior(kept, implied, max_iter=protocol.em_iterations, tol=protocol.em_tol)
            out["em"] = {**metrics(correct_known(kept, p_em, implied).argmax(1)), "em_iterations": iters,
                         "prior_error": prior_error(p_em, true)}
            continue
        probs = torch.softmax(kept.to(torch.float64), 1)
        options = {"max_iter": protocol.em_iterations, "tol": protocol.em_tol} if method == "em" else {}
        est = estimate_prior_details(probs, method, val_probs=None if val is None else val[0],
                                     val_labels=None if val is None else val[1], source_prior=implied,
                                     calibration=protocol.calibration if method in ("em", "mapls") else None,
                                     **options)
        extra = {k: v for k, v in (("em_iterations", est.iterations), ("lam", est.lam),
                                   ("temperature", est.temperature)) if v is not None}
        out[method] = {**metrics(est.adjusted_scores(probs).argmax(1)), **extra,
                       "prior_error": est.error(true), **({"notes": est.notes} if est.notes else {})}
    return out


def shifted_report(scores: torch.Tensor, labels: Any, counts: Any, implied: Optional[torch.Tensor],
                   protocol: Protocol, reason: Optional[str] = None,
                   val: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                   rescore: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, **thresholds: int) -> dict:
    """``{"shifted": {name: metrics}, "shifted_corrected": {name: {"known_prior", <estimator>...}}}``.

    ``scores`` (N, C) of the test split; ``implied``: the prior they are balanced for
    (:meth:`~lt_rebalance.heads.base.BaseHead.implied_prior`); ``val``: (val scores (Nv, C), val
    labels) for the estimators that need a labelled source sample (BBSE, RLLS, calibration);
    ``rescore(rows)``: the scores of a subset scored on its own (a transductive head), else ``scores[rows]``.
    ``"shifted"[name]`` holds ``all, many, medium, few, n`` and the subset's true ``"prior"`` (C,);
    random kinds also ``"draws"`` and ``"std"``. Without ``implied`` (a head of unknown prior)
    ``shifted_corrected`` is ``{"reason": reason}``.
    """
    from .shifts import is_random, shift_subset

    labels = torch.as_tensor(labels, dtype=torch.int64).to(scores.device)
    C = len(counts)
    test_counts = torch.bincount(labels.cpu(), minlength=C)
    if int(test_counts.min()) == 0:
        missing = (test_counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"shifted test priors need test rows of every class; classes {missing[:10]} have none")
    if val is not None:
        val = (torch.softmax(val[0].to(torch.float64), 1), torch.as_tensor(val[1], dtype=torch.int64))
    shifted, corrected = {}, {}
    for name in protocol.test_priors:
        draws = protocol.shift_draws if is_random(name) else 1
        plain, fixed, priors = [], [], []
        for d in range(draws):
            idx, true = shift_subset(name, labels.cpu(), counts, seed=protocol.shift_seed + d,
                                     replace=protocol.shift_replace)
            rows = torch.from_numpy(idx).to(scores.device)
            y = labels[rows]
            sub = scores[rows] if rescore is None else rescore(rows)
            plain.append(shifted_metrics(sub.argmax(1), y, counts, torch.ones_like(y, dtype=torch.bool), **thresholds))
            priors.append(true)
            if implied is not None:
                fixed.append(_corrections(sub, y, counts, true, implied, protocol, val, thresholds))
        shifted[name] = {**_mean(plain), "prior": np.mean(priors, axis=0).tolist(),
                         **({"draws": draws} if is_random(name) else {})}
        if fixed:
            corrected[name] = _mean(fixed)
    if implied is None:
        corrected = {"reason": reason or "the method declares no implied class prior"}
    return {"shifted": shifted, "shifted_corrected": corrected}

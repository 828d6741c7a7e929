"""Estimators of an unknown test (target) class prior under label shift (docs/METHODS.md,
"Label-shift estimation").

Label shift: p_t(x | y) = p_s(x | y), only the class prior changes. Given a classifier's probabilities
on the unlabelled test rows (and, for some estimators, on a labelled held-out source sample, val),
:func:`estimate_prior` returns the test prior, float64 (C,), non-negative, summing to 1:

* ``"em"`` — maximum-likelihood EM (MLLS; Saerens, Latinne & Decaestecker, Neural Computation 2002):
  :func:`em_iterate`, the iteration ``protocols.em_prior`` runs.
* ``"mapls"`` — maximum a-posteriori label shift (Ye et al., WACV 2024): EM whose M-step mixes the
  mean posterior with a uniform prior, q ← λ·mean + (1 − λ)·u, λ from the authors' rule
  (:func:`mapls_lambda`) or fixed.
* ``"bbse"`` — black-box shift estimation (Lipton, Wang & Smola, ICML 2018): solve C w = μ with
  C[i, j] = P(pred = i, y = j) on val and μ the predicted marginal on test (:func:`bbse_weights`).
* ``"rlls"`` — regularised learning of label shift (Azizzadenesheli et al., ICLR 2019):
  min ‖C θ − b‖ + ρ‖θ‖, θ = w − 1 ≥ −1 (:func:`rlls_theta`).

``calibration="temperature"|"bcts"`` first recalibrates the probabilities on val (temperature scaling;
bias-corrected temperature scaling, Alexandari, Kundaje & Shrikumar, ICML 2020: ``calibration.fit_bcts``).
Fallbacks (singular confusion matrix, clipped weights, λ clipped) emit a :class:`LabelShiftWarning`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from .calibration import log_probs, recalibrate

METHODS = ("em", "bbse", "rlls", "mapls")
CALIBRATIONS = (None, "temperature", "bcts")
MODES = ("hard", "soft")
ROW_SUM_TOL = 1e-4  # |sum of a probability row - 1| allowed (float32 softmax of 8k classes is within 1e-5)
_OPTIONS = {  # each method's options and defaults (docs/METHODS.md gives their sources)
    "em": {"max_iter": 1000, "tol": 1e-6},
    "mapls": {"lam": None, "max_iter": 100, "tol": 0.0},
    "bbse": {"mode": "hard"},
    "rlls": {"mode": "hard", "alpha": 0.01, "delta": 0.05},
}


class LabelShiftWarning(UserWarning):
    """An estimate that needed a fallback: singular confusion matrix, clipped weights, clipped λ."""


@dataclass
class PriorEstimate:
    """What :func:`estimate_prior_details` found. ``prior``/``source_prior``: float64 (C,)."""

    method: str
    prior: np.ndarray
    source_prior: np.ndarray
    iterations: Optional[int] = None  # em, mapls
    lam: Optional[float] = None  # mapls
    temperature: Optional[float] = None  # calibration
    bias: Optional[np.ndarray] = None  # bcts, centred (C,)
    notes: list[str] = field(default_factory=list)  # the warnings emitted

    @property
    def weights(self) -> np.ndarray:
        """Importance weights p_t / p_s (C,) (0 where the source prior is 0)."""
        s = self.source_prior
        return np.divide(self.prior, s, out=np.zeros_like(self.prior), where=s > 0)

    def adjusted_scores(self, test_probs: Any) -> torch.Tensor:
        """Test log-posteriors under the estimated prior, float64 (N, C), up to a per-row constant:
        the (recalibrated) log-probabilities + log p̂ − log p_s. Their argmax is the corrected
        prediction; a class of estimated prior 0 gets −inf."""
        z = log_probs(_probs("test_probs", test_probs))
        if self.temperature is not None:
            b = 0.0 if self.bias is None else torch.from_numpy(self.bias).to(z.device)
            z = z / self.temperature + b
        shift = np.log(self.prior, out=np.full_like(self.prior, -np.inf), where=self.prior > 0) - np.log(self.source_prior)
        return z + torch.from_numpy(shift).to(z.device)

    def error(self, true_prior: Any) -> dict[str, float]:
        """{"l1": ‖p̂ − p‖₁, "mse": mean (p̂ − p)²} against the true prior (C,)."""
        d = self.prior - np.asarray(true_prior, dtype=np.float64)
        return {"l1": float(np.abs(d).sum()), "mse": float(np.mean(d ** 2))}


# -- input checks ------------------------------------------------------------------------------------

def _probs(name: str, a: Any) -> torch.Tensor:
    """(N, C) probabilities as float64, each row renormalised; ValueError unless a distribution."""
    t = a.detach() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (N, C) array of probabilities; got shape {tuple(t.shape)}")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} hold NaN or Inf values; pass probabilities (softmax of the scores)")
    if bool((t < 0).any()):
        raise ValueError(f"{name} hold negative values; pass probabilities (softmax of the scores), not scores")
    s = t.sum(1)
    bad = ((s - 1).abs() > ROW_SUM_TOL).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{name} are not distributions: row {i} sums to {float(s[i]):.6g} "
                         f"(each row must sum to 1 within {ROW_SUM_TOL:g})")
    return t / s[:, None]


def _labels(a: Any, n: int, C: int, device: torch.device) -> torch.Tensor:
    y = a.detach() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"val_labels must be (N,) with N = {n} (the rows of val_probs); got shape {tuple(y.shape)}")
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise ValueError("val_labels must be integer class indices")
    y = y.to(torch.int64)
    if n and (int(y.min()) < 0 or int(y.max()) >= C):
        raise ValueError(f"val_labels must lie in [0, {C}); got {int(y.min())}..{int(y.max())}")
    return y.to(device)


def _distribution(name: str, a: Any, C: int) -> torch.Tensor:
    p = torch.as_tensor(np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a), dtype=torch.float64)
    if p.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},), one entry per class; got {tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()) or abs(float(p.sum()) - 1) > 1e-6:
        raise ValueError(f"{name} must be a distribution: finite, non-negative, summing to 1")
    return p


def _missing_classes(y: torch.Tensor, C: int, method: str, calibration: Optional[str]) -> None:
    support = torch.bincount(y.cpu(), minlength=C)
    missing = (support == 0).nonzero().flatten().tolist()
    if not missing:
        return
    which = f"classes {missing[:10]}{' ...' if len(missing) > 10 else ''} ({len(missing)} of {C})"
    if method in ("bbse", "rlls"):
        why = f"{method.upper()} cannot estimate their weights (their columns of the confusion matrix are 0)"
    else:
        why = f"{calibration} calibration makes the val label marginal the source prior, which would be 0 for them"
    raise ValueError(f"the val split has no row of {which}; {why}")


# -- EM (MLLS) and MAPLS -------------------------------------------------------------------------------

def em_iterate(P: torch.Tensor, source: torch.Tensor, *, lam: float = 1.0, anchor: Optional[torch.Tensor] = None,
               max_iter: int = 1000, tol: float = 1e-6) -> tuple[torch.Tensor, int]:
    """EM for the target prior, float64 (C,), from posteriors ``P`` (N, C) that hold under ``source``.

    From p = source, each step reweights P's rows by w = p / source, renormalises them and takes
    their mean — p ← w ⊙ Pᵀ(1 / (P w)) / N, two matrix-vector products (Saerens et al., 2002) —
    and, when ``lam`` < 1, mixes it with ``anchor``: p ← λ·p + (1 − λ)·anchor, renormalised (MAPLS's
    M-step). Stops when p moves less than ``tol`` (max-norm; 0: run ``max_iter`` steps). Returns
    (p, steps run).
    """
    if max_iter < 1:
        raise ValueError(f"EM needs at least one iteration; got max_iter={max_iter}")
    source = source.to(P)
    p, iterations, moved = source.clone(), 0, math.inf
    while iterations < max_iter and moved >= tol:
        w = p / source
        new = w * torch.mv(P.T, 1.0 / torch.mv(P, w)) / P.shape[0]
        if lam != 1.0:
            new = lam * new + (1.0 - lam) * anchor.to(P)
            new = new / new.sum()
        moved = float((new - p).abs().max())
        p, iterations = new, iterations + 1
    return p, iterations


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p ‖ q + 1e-8), terms with p = 0 dropped (the MAPLS authors' ``kl_div``)."""
    p, q = p.double().cpu(), q.double().cpu() + 1e-8
    nz = p > 0
    return float((p[nz] * torch.log(p[nz] / q[nz])).sum())


def mapls_lambda(P: torch.Tensor, source: torch.Tensor, max_iter: int = 100) -> float:
    """MAPLS's mixing weight λ (the authors' ``get_lamda``), a float in [0, 1].

    With q the MLLS estimate after ``max_iter`` steps, u uniform, d = KL(· ‖ · + 1e-8):
    TU = d(q, u), TS = d(q, source), SU = d(source, u); g(d, γ) = γd / (1 + γd),
    γ(λ₀) = (1 / (1 − λ₀) − 1) / 0.5; SU' = 1 − g(SU, γ(0.2)); TU' = g(TU, γ(SU')),
    TS' = g(TS, γ(SU')); λ = 0.9·TU' + 0.1·(1 − TS'). A value outside [0, 1] (the rule divides by
    1 − SU', 0 for a uniform source up to the 1e-8) is clipped, with a warning.
    """
    u = torch.full_like(source, 1.0 / len(source))
    q, _ = em_iterate(P, source, max_iter=max_iter, tol=0.0)
    tu, ts, su = (np.float64(_kl(a, b)) for a, b in ((q, u), (q, source), (source, u)))
    with np.errstate(all="ignore"):
        gamma = lambda lam0: (1 / (1 - lam0) - 1) / np.float64(0.5)  # noqa: E731
        g = lambda d, gm: gm * d / (1 + gm * d)  # noqa: E731
        su_conf = 1 - g(su, gamma(np.float64(0.2)))
        lam = 0.9 * g(tu, gamma(su_conf)) + 0.1 * (1 - g(ts, gamma(su_conf)))
    if not (0.0 <= lam <= 1.0):
        clipped = float(np.clip(np.nan_to_num(lam, nan=1.0), 0.0, 1.0))
        warnings.warn(f"MAPLS: the authors' rule gave lambda = {float(lam):.6g}; clipped to {clipped:g}",
                      LabelShiftWarning, stacklevel=3)
        lam = clipped
    return float(lam)


# -- BBSE and RLLS ---------------------------------------------------------------------------------------

def confusion_matrix(P: torch.Tensor, y: torch.Tensor, mode: str = "hard") -> torch.Tensor:
    """C[i, j] = P(pred = i, y = j) on labelled rows, float64 (C, C); soft: P's rows instead of one-hots."""
    n, C = P.shape
    if mode == "hard":
        flat = torch.bincount(P.argmax(1) * C + y, minlength=C * C)
        return flat.view(C, C).to(torch.float64) / n
    return torch.zeros(C, C, dtype=torch.float64, device=P.device).index_add_(0, y, P).T / n


def predicted_marginal(P: torch.Tensor, mode: str = "hard") -> torch.Tensor:
    """Mean predicted class distribution (C,) float64: argmax frequencies (hard) or mean of P (soft)."""
    if mode == "hard":
        return torch.bincount(P.argmax(1), minlength=P.shape[1]).to(torch.float64) / P.shape[0]
    return P.mean(0)


def bbse_weights(Cm: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """w solving C w = μ (C (C, C), μ (C,)); least squares (minimum norm) when C is singular or
    ill-conditioned, with a :class:`LabelShiftWarning`. Negative weights are not clipped here."""
    from scipy.linalg import LinAlgWarning, solve

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", LinAlgWarning)
            return solve(Cm, mu)
    except (np.linalg.LinAlgError, LinAlgWarning):
        never = np.flatnonzero(Cm.sum(1) == 0).tolist()
        why = f" (classes {never[:10]}{' ...' if len(never) > 10 else ''} are never predicted on val)" if never else ""
        warnings.warn(f"BBSE: the val confusion matrix is singular or ill-conditioned{why}; "
                      "the weights are its least-squares (minimum-norm) solution", LabelShiftWarning, stacklevel=3)
        return np.linalg.lstsq(Cm, mu, rcond=None)[0]


def rlls_rho(num_classes: int, n: int, delta: float = 0.05) -> float:
    """3Δ_C = 3·(2·log(2C/δ)/(3n) + √(2·log(2C/δ)/n)): the authors' ``compute_3deltaC`` (n: val rows)."""
    L = math.log(2 * num_classes / delta)
    return 3 * (2 * L / (3 * n) + math.sqrt(2 * L / n))


def rlls_objective(theta: np.ndarray, Cm: np.ndarray, b: np.ndarray, rho: float) -> float:
    """‖C θ − b‖₂ + ρ‖θ‖₂."""
    return float(np.linalg.norm(Cm @ theta - b) + rho * np.linalg.norm(theta))


def rlls_theta(Cm: np.ndarray, b: np.ndarray, rho: float) -> np.ndarray:
    """θ (C,) minimising ‖C θ − b‖₂ + ρ‖θ‖₂ subject to θ ≥ −1 (RLLS, w = 1 + θ).

    The objective is convex but not smooth where C θ = b or θ = 0, so the minimiser is taken among
    three candidates by the exact objective: θ = 0 (optimal iff ‖Cᵀb‖ ≤ ρ‖b‖), the exact fit
    C θ = b when it is feasible, and L-BFGS-B (scipy) with the bounds θ ≥ −1, started
    at half the best step along Cᵀb (away from both kinks).
    """
    from scipy.optimize import minimize

    C = len(b)
    nb = float(np.linalg.norm(b))
    if nb == 0 or float(np.linalg.norm(Cm.T @ b)) <= rho * nb:
        return np.zeros(C)

    def f(x: np.ndarray) -> tuple[float, np.ndarray]:
        r = Cm @ x - b
        nr, nx = float(np.linalg.norm(r)), float(np.linalg.norm(x))
        grad = (Cm.T @ r) / nr if nr > 0 else np.zeros(C)
        if nx > 0:
            grad = grad + rho * x / nx
        return (nr + rho * nx) / nb, grad / nb

    g = Cm.T @ b  # start off both kinks: half the best step along C'b
    Cg = Cm @ g
    x0 = np.maximum(0.5 * float(b @ Cg) / float(Cg @ Cg) * g, -1.0)
    res = minimize(f, x0, jac=True, method="L-BFGS-B", bounds=[(-1.0, None)] * C,
                   options={"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-12})
    candidates = [np.zeros(C), np.maximum(res.x, -1.0)]
    try:
        from scipy.linalg import LinAlgWarning, solve
        with warnings.catch_warnings():
            warnings.simplefilter("error", LinAlgWarning)
            exact = solve(Cm, b)
        if bool((exact >= -1).all()):
            candidates.append(exact)
    except (np.linalg.LinAlgError, LinAlgWarning):
        pass
    return min(candidates, key=lambda t: rlls_objective(t, Cm, b, rho))


def _target_from_weights(w: np.ndarray, source: np.ndarray, method: str) -> np.ndarray:
    if bool((w < 0).any()):
        warnings.warn(f"{method.upper()}: {int((w < 0).sum())} negative importance weights clipped to 0",
                      LabelShiftWarning, stacklevel=3)
        w = np.clip(w, 0, None)
    q = w * source
    if not q.sum() > 0:
        raise ValueError(f"{method.upper()} estimated every class weight as 0; no target prior follows")
    return q / q.sum()


# -- the entry point -------------------------------------------------------------------------------------

def estimate_prior(test_probs: Any, method: str, *, val_probs: Any = None, val_labels: Any = None,
                   source_prior: Any = None, **options: Any) -> np.ndarray:
    """The test prior, numpy float64 (C,), non-negative, summing to 1 (see :func:`estimate_prior_details`)."""
    return estimate_prior_details(test_probs, method, val_probs=val_probs, val_labels=val_labels,
                                  source_prior=source_prior, **options).prior


def estimate_prior_details(test_probs: Any, method: str, *, val_probs: Any = None, val_labels: Any = None,
                           source_prior: Any = None, calibration: Optional[str] = None,
                           **options: Any) -> PriorEstimate:
    """Estimate the test prior by ``method`` (:data:`METHODS`); returns a :class:`PriorEstimate`.

    ``test_probs``, ``val_probs``: (N, C) probabilities (numpy or torch); ``val_labels`` (N_val,) int.
    The **source** (whose prior the probabilities are posteriors under):
    em / mapls without calibration: ``source_prior`` (the method's implied prior; None: uniform);
    bbse / rlls, and em / mapls with ``calibration``: the val sample, whose label marginal is the
    source prior (``source_prior`` is then not used). val is needed by bbse, rlls and calibration
    and must hold every class. Options: em ``max_iter=1000, tol=1e-6``; mapls ``lam=None`` (the
    authors' rule), ``max_iter=100, tol=0`` (their fixed 100 steps); bbse ``mode="hard"|"soft"``;
    rlls ``mode``, ``alpha=0.01``, ``delta=0.05`` (ρ = α·3Δ_C). ValueError on bad input.
    """
    if method not in METHODS:
        raise ValueError(f"unknown label-shift estimator {method!r}; use one of {', '.join(METHODS)}")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}; use None, 'temperature' or 'bcts'")
    unknown = sorted(set(options) - set(_OPTIONS[method]))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {method!r}; it takes {sorted(_OPTIONS[method])} "
                         "and calibration")
    opt = {**_OPTIONS[method], **options}
    if "mode" in opt and opt["mode"] not in MODES:
        raise ValueError(f"{method} mode must be 'hard' or 'soft'; got {opt['mode']!r}")
    if opt.get("lam") is not None and not 0.0 <= float(opt["lam"]) <= 1.0:
        raise ValueError(f"mapls lam must lie in [0, 1]; got {opt['lam']}")
    if method == "rlls" and not (opt["alpha"] >= 0 and 0 < opt["delta"] < 1):
        raise ValueError(f"rlls needs alpha >= 0 and 0 < delta < 1; got alpha={opt['alpha']}, delta={opt['delta']}")

    P = _probs("test_probs", test_probs)
    C = P.shape[1]
    needs_val = method in ("bbse", "rlls") or calibration is not None
    if needs_val and (val_probs is None or val_labels is None):
        what = f"calibration {calibration!r}" if method in ("em", "mapls") else method.upper()
        raise ValueError(f"{what} needs a labelled source sample: pass val_probs and val_labels")
    V = y = None
    if val_probs is not None:
        V = _probs("val_probs", val_probs).to(P.device)
        if V.shape[1] != C:
            raise ValueError(f"val_probs have {V.shape[1]} classes but test_probs have {C}")
        if val_labels is not None:
            y = _labels(val_labels, V.shape[0], C, P.device)
    if needs_val:
        _missing_classes(y, C, method, calibration)

    out = PriorEstimate(method=method, prior=np.empty(0), source_prior=np.empty(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LabelShiftWarning)
        if calibration is not None:
            V, P, out.temperature, out.bias = recalibrate(V, y, P, calibration)
        if needs_val:
            source = torch.bincount(y, minlength=C).to(torch.float64) / len(y)
        elif source_prior is not None:
            source = _distribution("source_prior", source_prior, C).to(P.device)
        else:
            source = torch.full((C,), 1.0 / C, dtype=torch.float64, device=P.device)
        if method in ("em", "mapls") and bool((source == 0).any()):
            zero = (source == 0).nonzero().flatten().tolist()[:10]
            raise ValueError(f"the source prior is 0 for classes {zero}; EM divides by it")
        out.source_prior = source.cpu().numpy()

        if method == "em":
            q, out.iterations = em_iterate(P, source, max_iter=int(opt["max_iter"]), tol=float(opt["tol"]))
            prior = q.cpu().numpy()
        elif method == "mapls":
            lam = mapls_lambda(P, source, int(opt["max_iter"])) if opt["lam"] is None else float(opt["lam"])
            u = torch.full_like(source, 1.0 / C)
            q, out.iterations = em_iterate(P, source, lam=lam, anchor=u, max_iter=int(opt["max_iter"]),
                                           tol=float(opt["tol"]))
            out.lam, prior = lam, q.cpu().numpy()
        else:
            Cm = confusion_matrix(V, y, opt["mode"]).cpu().numpy()
            mu = predicted_marginal(P, opt["mode"]).cpu().numpy()
            if method == "bbse":
                w = bbse_weights(Cm, mu)
            else:
                rho = float(opt["alpha"]) * rlls_rho(C, V.shape[0], float(opt["delta"]))
                w = 1.0 + rlls_theta(Cm, mu - Cm.sum(1), rho)
            prior = _target_from_weights(w, out.source_prior, method)
    for wrn in caught:  # re-emit for the caller; keep the label-shift ones
        if issubclass(wrn.category, LabelShiftWarning):
            out.notes.append(str(wrn.message))
        warnings.warn(wrn.message, stacklevel=2)
    prior = np.clip(prior.astype(np.float64), 0, None)
    out.prior = prior / prior.sum()
    return out

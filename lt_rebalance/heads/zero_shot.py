"""Zero-shot classification from a text head, its debiasing and GLA (docs/METHODS.md, "Text heads").

* :class:`ZeroShot`: s · cos(x, t_c), s the text tower's logit scale, t_c the class's text embedding.
* :class:`ZeroShotDebiased`: Generalized Logit Adjustment's debiasing (Zhu et al., NeurIPS 2023):
  z / T − τ · log q̂, with q̂ the label prior the pre-training data left in the zero-shot scores,
  estimated from downstream rows (:func:`estimate_log_prior`) after the temperature T that makes
  the mean top-1 confidence equal the accuracy (:func:`confidence_temperature`); τ = 1 is GLA's,
  other τ are the logit-adjusted family, selected on val.
* :class:`GLA`: the debiased zero-shot scores plus a classifier trained on the features, that
  classifier's own prior removed too: z / T − log q̂ + f(x) − log p_f.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..blocks import SCORE_ROWS, float32_rows, row_blocks
from ..devices import resolve_device
from ..priors import NoImpliedPrior, normalise, uniform_prior
from .base import ARRAY, BaseHead, Interval, Is, StrOptions, as_tensor, check_features, check_weight
from .tau_norm import DEFAULT_TAUS

TARGETS = ("labels", "uniform")


def cosine_logits(X: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · cos(x_i, t_c), float32 (N, C); X any float dtype (upcast a block of rows at a time),
    ``text`` float32 (C, D) with unit rows."""
    out = torch.empty(X.shape[0], text.shape[0], device=text.device)
    for s in row_blocks(X.shape[0], SCORE_ROWS):
        out[s] = torch.nn.functional.normalize(float32_rows(X, s).to(text.device), dim=1) @ text.T * scale
    return out


def _unit(weight: Any, device: Any) -> torch.Tensor:
    return torch.nn.functional.normalize(check_weight(weight, device), dim=1)


def confidence_temperature(logits: Any, labels: Any, lo: float = 1e-3, hi: float = 1e3) -> float:
    """The temperature T at which the mean top-1 softmax confidence of ``logits`` / T equals their
    top-1 accuracy on ``labels`` (the GLA authors' calibration before estimating the prior; they
    search the same fixed point by interpolation, this finds it by Brent's method on log T).

    The confidence falls monotonically from 1 (T → 0) to 1/C (T → ∞); an accuracy outside that range
    gives the nearer end of [lo, hi].
    """
    from scipy.optimize import brentq

    z = as_tensor(logits, torch.float32)
    y = as_tensor(labels, torch.int64, z.device)
    blocks = list(row_blocks(len(z), SCORE_ROWS))  # float64 a block of rows at a time
    acc = sum(int((z[s].argmax(1) == y[s]).sum()) for s in blocks) / len(z)

    def gap(log_t: float) -> float:
        t = math.exp(log_t)
        return sum(torch.softmax(z[s].double() / t, dim=1).amax(1).sum().item() for s in blocks) / len(z) - acc

    a, b = math.log(lo), math.log(hi)
    if gap(a) <= 0:
        return lo
    if gap(b) >= 0:
        return hi
    return float(math.exp(brentq(gap, a, b, xtol=1e-10)))


def estimate_log_prior(logits: Any, target: Any) -> torch.Tensor:
    """log q̂ float64 (C,) (log q̂ summing to 1 in probability): the label prior to subtract from
    ``logits`` (N, C) so that the adjusted scores explain the class frequencies ``target`` (C,).

    GLA's estimator minimises the cross-entropy of softmax(z_i − log q) on labelled downstream rows
    over the simplex. That loss is invariant to adding a constant to log q, and it depends on the
    labels only through their frequencies π: it equals Σ_i logsumexp(z_i − v) + N Σ_j π_j v_j up to
    terms free of v = log q. So only ``target`` is needed (the rows' class frequencies, or uniform for
    a split known to be balanced: no labels at all); the convex problem is solved unconstrained by
    L-BFGS. At the optimum the mean adjusted softmax equals ``target``.
    """
    from scipy.optimize import minimize

    z = as_tensor(logits, torch.float32)
    pi = normalise(as_tensor(target, torch.float64)).to(z.device)
    if (pi <= 0).any():
        raise ValueError(f"{int((pi <= 0).sum())} class(es) have no rows to estimate the prior on; use "
                         "target='uniform' (a balanced split) or a split with rows of every class")
    blocks = list(row_blocks(len(z), SCORE_ROWS))
    n = len(z)

    def objective(v_np: np.ndarray) -> tuple[float, np.ndarray]:
        v = torch.from_numpy(v_np).to(z.device)
        f, grad = 0.0, n * pi.clone()
        for s in blocks:
            a = z[s].double() - v
            f += torch.logsumexp(a, dim=1).sum().item()
            grad -= torch.softmax(a, dim=1).sum(0)
        f += n * float(pi @ v)
        return f / n, (grad / n).cpu().numpy()

    v0 = np.zeros(z.shape[1])
    res = minimize(objective, v0, jac=True, method="L-BFGS-B", options={"maxiter": 2000, "gtol": 1e-10, "ftol": 1e-15})
    v = torch.from_numpy(res.x)
    return v - torch.logsumexp(v, dim=0)


class ZeroShot(BaseHead):
    """Zero-shot classifier: scores s · cos(x, t_c) (float32 (N, C)) from a text head.

    Parameters
    ----------
    weight : float (C, D)
        One text embedding per class (rows are normalised).
    logit_scale : float, default=100.0
        s, the text tower's learnt scale (CLIP: 100).
    device : str, default="cpu"

    Notes
    -----
    The scores carry the label prior of the pre-training data, which is unknown: no implied prior.
    """

    _parameter_constraints = {"weight": [ARRAY], "logit_scale": [Interval(float, 0, None, closed="neither")]}
    _state = "text_"
    _requires_y = False

    def __init__(self, weight: Any, logit_scale: float = 100.0, *, device: str = "cpu"):
        self.weight = weight
        self.logit_scale = logit_scale
        self.device = device

    def fit(self, X: Any = None, y: Any = None) -> ZeroShot:
        """Nothing to learn: takes the text embeddings. X and y are ignored."""
        self._validate_params()
        self.text_ = _unit(self.weight, resolve_device(self.device))
        self.classes_ = np.arange(self.text_.shape[0])
        self.n_features_in_ = self.text_.shape[1]
        return self

    def implied_prior(self, counts: Any) -> torch.Tensor:
        raise NoImpliedPrior("zero-shot scores carry the label prior of the pre-training data, which is unknown "
                             "(zero_shot_debiased estimates and removes it)")

    def _scores(self, X: torch.Tensor) -> torch.Tensor:
        return cosine_logits(X, self.text_, self.logit_scale)


class ZeroShotDebiased(ZeroShot):
    """GLA-debiased zero-shot classifier: z / T − τ · log q̂ (module docstring).

    Parameters
    ----------
    weight, logit_scale, device
        As :class:`ZeroShot`.
    tau : float or None, default=1.0
        The weight of log q̂ (1: GLA's debiasing); None selects it in :meth:`fit` from ``taus`` by top-1.
    taus : sequence of float, default=linspace(0, 2, 21)
    temperature : "auto" or float, default="auto"
        "auto": :func:`confidence_temperature` on the fit rows (needs their labels); a number: that T.
    target : {"labels", "uniform"}, default="labels"
        Class frequencies q̂ must explain: the fit rows' (the authors' estimator) or uniform (the fit
        rows are taken as balanced and their labels are not used for q̂).

    Attributes
    ----------
    temperature_ : float
    log_prior_ : float64 (C,)
        log q̂, the estimated pre-training label prior.
    tau_ : float
    val_top1_ : dict of float to float
        Top-1 on the fit rows of every τ tried (selection only).
    """

    _parameter_constraints = {
        **ZeroShot._parameter_constraints,
        "tau": [Is(lambda v: v is None, "None"), Interval(float, None, None)],
        "temperature": [StrOptions({"auto"}), Interval(float, 0, None, closed="neither")],
        "target": [StrOptions(set(TARGETS))],
    }
    _state = "log_prior_"
    _requires_y = True

    def __init__(self, weight: Any, logit_scale: float = 100.0, *, tau: Optional[float] = 1.0,
                 taus: Sequence[float] = DEFAULT_TAUS, temperature: Any = "auto", target: str = "labels",
                 device: str = "cpu"):
        super().__init__(weight, logit_scale, device=device)
        self.tau = tau
        self.taus = taus
        self.temperature = temperature
        self.target = target

    def fit(self, X: Any, y: Any) -> ZeroShotDebiased:
        """Estimate T and log q̂ on (X, y) (val rows), then select τ there when ``tau`` is None."""
        super().fit()
        device = self.text_.device
        X, y = check_features(X, y, n_features=self.n_features_in_, classes=self.classes_, device=device,
                              min_samples=1)
        z = cosine_logits(X, self.text_, self.logit_scale)
        self.temperature_ = (confidence_temperature(z, y) if self.temperature == "auto" else float(self.temperature))
        z = z / self.temperature_
        C = len(self.classes_)
        target = torch.bincount(y, minlength=C).double() if self.target == "labels" else torch.ones(C)
        self.log_prior_ = estimate_log_prior(z, target).to(device)
        taus = [float(self.tau)] if self.tau is not None else [float(t) for t in self.taus]
        lq = self.log_prior_.float()
        hits = {t: sum(int((z[s] - t * lq).argmax(1).eq(y[s]).sum()) for s in row_blocks(len(z), SCORE_ROWS))
                for t in taus}
        self.val_top1_ = {t: h / len(z) for t, h in hits.items()}
        best = max(self.val_top1_.values())
        self.tau_ = min(t for t, v in self.val_top1_.items() if v == best)  # ties: the smaller τ
        return self

    def implied_prior(self, counts: Any) -> torch.Tensor:
        """q̂^(1 − τ), normalised: what is left of the estimated pre-training prior (uniform at τ = 1)."""
        return normalise(torch.exp((1 - self.tau_) * self.log_prior_.double().cpu()))

    def _scores(self, X: torch.Tensor) -> torch.Tensor:
        return super()._scores(X) / self.temperature_ - self.tau_ * self.log_prior_.float()


class GLA(BaseHead):
    """Generalized Logit Adjustment (Zhu et al., NeurIPS 2023): debiased zero-shot scores plus a
    classifier trained on the features, each with its prior removed: z / T − log q̂ + f(x) − log p_f.

    Parameters
    ----------
    zero_shot : ZeroShotDebiased (fitted)
        Gives z / T − log q̂ (its τ is ignored: GLA removes the whole prior, τ = 1).
    classifier : a fitted head
        f; its :meth:`implied_prior` is p_f (the train prior π for the stored classifier, uniform for
        class-balanced cRT and the balanced linear probe).
    counts : int (C,)
        Train counts, for the classifier's implied prior.
    """

    _parameter_constraints = {"counts": [ARRAY]}
    _state = "offset_"
    _requires_y = False

    def __init__(self, zero_shot: ZeroShotDebiased, classifier: Any, counts: Any):
        self.zero_shot = zero_shot
        self.classifier = classifier
        self.counts = counts

    def fit(self, X: Any = None, y: Any = None) -> GLA:
        """Nothing to learn: both parts are fitted. X and y are ignored."""
        self._validate_params()
        zs = self.zero_shot
        try:
            p_f = self.classifier.implied_prior(self.counts)
        except NoImpliedPrior as e:
            raise ValueError(f"GLA removes the classifier's prior, and {type(self.classifier).__name__} has none: "
                             f"{e}") from None
        device = zs.text_.device
        self.log_classifier_prior_ = p_f.log().to(device)
        self.offset_ = (-zs.log_prior_ - self.log_classifier_prior_).float()  # (C,)
        self.classes_ = zs.classes_
        self.n_features_in_ = zs.n_features_in_
        return self

    def implied_prior(self, counts: Any) -> torch.Tensor:
        """Uniform: both parts' priors are removed."""
        return uniform_prior(counts)

    def _scores(self, X: torch.Tensor) -> torch.Tensor:
        zs = self.zero_shot
        z = cosine_logits(X, zs.text_, zs.logit_scale) / zs.temperature_
        f = torch.as_tensor(self.classifier.scores(X), device=z.device, dtype=torch.float32)
        return z + f + self.offset_

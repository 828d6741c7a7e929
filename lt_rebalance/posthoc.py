"""Post-hoc corrections of a trained head (docs/METHODS.md, "Post-hoc methods and loss options").

* Logit adjustment (Menon et al., ICLR 2021): z_j − τ·log π_j with π the train class prior;
  :func:`logit_adjust_sweep` scores every τ from one GEMM, :class:`LogitAdjustment` selects τ on val.
* PC softmax (Hong et al., LADE, CVPR 2021): the τ = 1 case, :func:`pc_softmax`.
* Temperature scaling (Guo et al., ICML 2017): logits / T with T minimising the NLL on val,
  :func:`fit_temperature`, :class:`TemperatureScaled`; :func:`calibration_metrics` reports NLL and
  ECE overall and per shot group.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .blocks import SCORE_ROWS, all_finite, chunked_matmul, linear_logits, row_blocks
from .heads.base import (
    ARRAY,
    NONE,
    BaseHead,
    Interval,
    Is,
    StrOptions,
    as_tensor,
    check_bias,
    check_counts,
    check_features,
    check_is_fitted,
    clone_keeping,
)
from .heads.tau_norm import DEFAULT_TAUS, SELECT_METRICS, select_tau, sweep_inputs
from .metrics import GROUPS, accuracy_summary, calibration_error, score_row_statistics, shot_groups
from .priors import normalise, train_prior

EMPTY_CLASSES = ("one-row", "reference")
REFERENCE_EPSILON = 1e-12  # google-research logit_adjustment: log(π^τ + 1e-12)


def log_prior(counts: Any) -> torch.Tensor:
    """log π_j = log(n_j / N), float32 (C,); classes without train rows count as one row (:func:`train_prior`)."""
    return train_prior(as_tensor(counts, torch.float64)).log().float()


def adjustment_offsets(counts: Any, taus: Any, empty_classes: str = "one-row") -> torch.Tensor:
    """What logit adjustment subtracts from the logits, float32 (T, C) for τ float (T,).

    "one-row" (default): τ·log π_j with a class without train rows counted as one row
    (:func:`log_prior`). "reference": log(π_j^τ + 1e-12) with π_j = n_j / N, the reference code's
    form (google-research ``logit_adjustment``): an empty class gets +27.6 (−log 1e-12) and wins
    nearly every row; for the other classes it differs from τ·log π_j only where π_j^τ is within a
    few orders of magnitude of 1e-12. docs/METHODS.md, "Logit adjustment".
    """
    taus = as_tensor(taus, torch.float64).reshape(-1, 1)
    if empty_classes == "one-row":
        return (taus * log_prior(counts).double()).float()
    if empty_classes == "reference":
        n = as_tensor(counts, torch.float64)
        return torch.log((n / n.sum()) ** taus + REFERENCE_EPSILON).float()
    raise ValueError(f"unknown empty_classes {empty_classes!r}; choose one of {', '.join(EMPTY_CLASSES)}")


def _offset_argmax(X: torch.Tensor, W: torch.Tensor, offsets: torch.Tensor, chunk: int,
                   logits: Optional[torch.Tensor] = None, precision: str = "float32") -> torch.Tensor:
    """Predictions int64 (T, N): ``argmax_j (X Wᵀ)[:, j] + offsets[t, j]`` for each of the T offset rows.

    X Wᵀ is computed ONCE per row chunk (:func:`chunked_matmul`), bounding memory at chunk × C;
    each τ only adds its (C,) offset before the argmax.
    """
    pred = torch.empty(len(offsets), X.shape[0], dtype=torch.int64, device=X.device)

    def fill(base: torch.Tensor, s: slice) -> None:
        for t in range(len(offsets)):
            torch.argmax(base + offsets[t], dim=1, out=pred[t, s])

    chunked_matmul(X, W, fill, chunk, logits, precision)
    return pred


def _linear(head: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (C, D), bias (C,)) of a fitted linear head (its ``linear_form``); ValueError for any other head."""
    try:
        return head.linear_form()
    except (AttributeError, ValueError):
        raise ValueError(
            f"logit adjustment needs a fitted linear head (weight_, bias_); got {type(head).__name__}"
        ) from None


def logit_adjust_sweep(
    X: Any,
    y: Any,
    weight: Any,
    bias: Any,
    counts: Any,
    taus: Sequence[float] = DEFAULT_TAUS,
    *,
    chunk: int = 8192,
    logits: Optional[torch.Tensor] = None,
    empty_classes: str = "one-row",
    precision: str = "float32",
    **thresholds: int,
) -> dict[str, torch.Tensor]:
    """Accuracy of logit-adjusted linear heads for every τ, from ONE matmul of X with W (none when
    ``logits``, X Wᵀ float32 (N, C) without the bias, are given).

    logits(τ) = X Wᵀ + b − τ·log π; X Wᵀ is computed once (in row chunks) and each τ only adds
    its (C,) offset before the argmax. ``weight`` float (C, D), ``bias`` (C,) or None,
    ``counts`` the train counts (C,) that define π and the shot groups; ``empty_classes`` as
    :func:`adjustment_offsets`. ``precision``: of the GEMM (:func:`lt_rebalance.blocks.mm`).

    Returns
    -------
    dict of float64 (T,) tensors: ``all``, ``mean_class``, ``many``, ``medium``, ``few``.
    """
    W, X, y, taus_t = sweep_inputs(X, y, weight, counts, taus)
    b = check_bias(bias, W.shape[0], W.device)
    offsets = b[None, :] - adjustment_offsets(counts, taus_t, empty_classes).to(W.device)  # (T, C)
    if not torch.isfinite(offsets).all():
        limit = torch.finfo(torch.float32).max / 2 / float(log_prior(counts).abs().max().clamp_min(1))
        raise ValueError(f"tau * log prior overflows float32 for some tau; use --taus within |tau| <= {limit:.3g}")
    return accuracy_summary(_offset_argmax(X, W, offsets, chunk, logits, precision), y, counts, **thresholds)


class LogitAdjustment(BaseHead):
    """Post-hoc logit adjustment of a fitted linear head: z − τ·log π (Menon et al., ICLR 2021).

    Parameters
    ----------
    head : fitted head with ``weight_`` (C, D) and ``bias_`` (C,)
        The base classifier, e.g. ``JointHead(W, b).fit()`` (the stored stage-1 head) or a CRT.
    counts : int (C,)
        Train images per class: π_j = n_j / N.
    tau : float or None, default=None
        A fixed τ; None selects it in :meth:`fit` from ``taus`` on the data given there.
    taus : sequence of float, default=linspace(0, 2, 21)
    metric : {"top1", "mean_class", "few"}, default="top1"
        What the selection maximises (ties go to the smaller τ).
    empty_classes : {"one-row", "reference"}, default="one-row"
        How a class without train rows is adjusted: counted as one row, or the reference's
        log(π^τ + 1e-12), which makes it win nearly every row (:func:`adjustment_offsets`).

    Attributes
    ----------
    tau_ : float
    curve_ : dict of (T,) tensors or None
        Accuracies per τ on the selection split (None for a fixed τ).
    weight_ : float32 (C, D)
        The base head's weight.
    bias_ : float32 (C,)
        b − τ·log π: the adjusted head is again a plain linear layer.
    classes_ : ndarray (C,)
        The base head's (arange(C) if it has none).

    Notes
    -----
    ``head`` is used as fitted: scikit-learn's ``clone`` (``GridSearchCV``, ``Pipeline``) shares
    it instead of re-creating it unfitted, so a search runs over this head's own parameters.
    ``predict_proba`` is softmax of the adjusted logits: the base head's probabilities re-weighted
    by π^-τ (at τ = 1, for a balanced test prior); calibrated only as far as the base head is.

    Examples
    --------
    >>> la = LogitAdjustment(JointHead(W, b).fit(), counts).fit(X_val, y_val)   # doctest: +SKIP
    """

    _parameter_constraints = {
        "head": [Is(lambda h: hasattr(h, "decision_function"), "a fitted head")],
        "counts": [ARRAY],
        "tau": [NONE, Interval(float, None, None)],
        "metric": [StrOptions(set(SELECT_METRICS))],
        "empty_classes": [StrOptions(set(EMPTY_CLASSES))],
    }
    _state = "bias_"

    def __init__(
        self,
        head: Any,
        counts: Any,
        tau: Optional[float] = None,
        *,
        taus: Sequence[float] = DEFAULT_TAUS,
        metric: str = "top1",
        empty_classes: str = "one-row",
    ):
        self.head = head
        self.counts = counts
        self.tau = tau
        self.taus = taus
        self.metric = metric
        self.empty_classes = empty_classes

    def fit(self, X: Any = None, y: Any = None, *, logits: Optional[torch.Tensor] = None) -> LogitAdjustment:
        """Select τ on (X, y) (the val split) unless ``tau`` is fixed. ``logits``: X Wᵀ of the base
        head's weight, without its bias, already computed (float32 (N, C)), used by the sweep."""
        self._validate_params()
        W, b = _linear(self.head)
        check_counts(self.counts, W.shape[0])
        classes = _classes(self.head, W.shape[0])
        self.precision_ = self.head.precision_  # the products run as the base head's do
        if self.tau is None:
            if X is None or y is None:
                raise ValueError("LogitAdjustment with tau=None selects tau on data: pass X and y to fit")
            X, y = check_features(X, y, n_features=W.shape[1], classes=classes, device=W.device,
                                  expecting=type(self.head).__name__)
            self.curve_ = logit_adjust_sweep(X, y, W, b, self.counts, self.taus, logits=logits,
                                             empty_classes=self.empty_classes, precision=self.precision_)
            self.tau_ = select_tau(self.curve_, self.taus, self.metric)
        else:
            self.curve_, self.tau_ = None, float(self.tau)
        self.weight_ = W
        self.bias_ = b - adjustment_offsets(self.counts, [self.tau_], self.empty_classes)[0].to(b.device)
        self.n_features_in_ = W.shape[1]
        self.classes_ = classes
        return self

    def __sklearn_clone__(self) -> LogitAdjustment:
        return clone_keeping(self, "head")

    def implied_prior(self, counts: Any) -> torch.Tensor:
        """The base head's prior times π^(−τ) (PC softmax, τ = 1 on the joint head: uniform)."""
        return normalise(self.head.implied_prior(counts) * train_prior(counts) ** (-self.tau_))

    def logit_affine(self) -> Optional[tuple[Optional[torch.Tensor], torch.Tensor]]:
        """(a, bias_) when the base head's scores are (X Wᵀ) ⊙ a + its bias (its ``logit_affine``)."""
        base = self.head.logit_affine()
        return None if base is None else (base[0], self.bias_)

    def linear_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight_, self.bias_

    def _scores(self, X: torch.Tensor) -> torch.Tensor:
        """Adjusted logits float32 (N, C) = X Wᵀ + b − τ·log π."""
        return linear_logits(X, self.weight_, self.bias_, precision=self.precision_)


def _classes(head: Any, num_classes: int) -> np.ndarray:
    """The base head's ``classes_``, or arange(C) for a head without them."""
    return getattr(head, "classes_", np.arange(num_classes))


def pc_softmax(head: Any, counts: Any) -> LogitAdjustment:
    """PC softmax (LADE, Hong et al., CVPR 2021): logit adjustment at τ = 1, fitted."""
    return LogitAdjustment(head, counts, tau=1.0).fit()


def fit_temperature(logits: Any, labels: Any, *, span: float = 25.0) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T), float.

    ``logits`` float (N, C), ``labels`` int (N,). The NLL is unimodal in log T (convex in 1/T), so a
    bounded Brent search over log T ∈ log s ± ``span`` finds it, with s the logits' spread (their
    row-centred standard deviation): the search scales with the logits, however huge or tiny.
    Computed in float64, a block of rows at a time (memory: the logits plus one float64 block).
    Logits that are constant per row carry no confidence: T = 1.
    """
    from scipy.optimize import minimize_scalar

    z = torch.as_tensor(logits)  # any float dtype is kept (blocks are upcast to float64)
    z = z if z.is_floating_point() else z.double()
    y = as_tensor(labels, torch.int64, z.device)
    if z.ndim != 2 or y.shape != (z.shape[0],) or z.shape[0] == 0:
        raise ValueError(f"need logits (N, C) and labels (N,) with N > 0; got {tuple(z.shape)} and {tuple(y.shape)}")
    if not all_finite(z):
        raise ValueError("logits contain NaN or Inf values")
    blocks = list(row_blocks(len(z), SCORE_ROWS))

    def centred(s: slice) -> torch.Tensor:
        zb = z[s].to(torch.float64)
        return zb - zb.mean(dim=1, keepdim=True)

    spread = math.sqrt(sum(centred(s).square().sum().item() for s in blocks) / z.numel())
    if spread == 0 or not math.isfinite(spread):
        return 1.0

    def nll(log_t: float) -> float:  # the search runs on O(1) logits (z / spread); T is rescaled at the end
        scale = math.exp(-log_t) / spread
        total = sum(torch.nn.functional.cross_entropy(centred(s) * scale, y[s], reduction="sum").item()
                    for s in blocks)
        return total / len(z)

    res = minimize_scalar(nll, bounds=(-span, span), method="bounded", options={"xatol": 1e-7})
    return float(math.exp(res.x) * spread)


class TemperatureScaled(BaseHead):
    """A fitted head with its scores divided by a temperature fitted on held-out data.

    Parameters
    ----------
    head : fitted head
    temperature : float or None, default=None
        A fixed T; None fits it in :meth:`fit` (:func:`fit_temperature`).

    Attributes
    ----------
    temperature_ : float
    weight_, bias_ : float32 (C, D), (C,)
        W / T and b / T when the base head is linear (absent otherwise).
    classes_ : ndarray (C,)
        The base head's.

    Notes
    -----
    ``head`` is used as fitted (``clone`` shares it, as for :class:`LogitAdjustment`).
    ``predict_proba`` is softmax(scores / T): with T fitted on held-out data, the one head whose
    probabilities are calibrated (in NLL, on data distributed as that split).
    """

    _parameter_constraints = {
        "head": [Is(lambda h: hasattr(h, "scores") and hasattr(h, "classes_"), "a fitted head")],
        "temperature": [NONE, Interval(float, 0, None, closed="neither")],
    }
    _state = "temperature_"

    def __init__(self, head: Any, temperature: Optional[float] = None):
        self.head = head
        self.temperature = temperature

    def fit(self, X: Any = None, y: Any = None) -> TemperatureScaled:
        """Fit T on (X, y) (the val split) unless ``temperature`` is fixed."""
        self._validate_params()
        head = self.head
        check_is_fitted(head, "classes_")
        if self.temperature is None:
            if X is None or y is None:
                raise ValueError("TemperatureScaled with temperature=None fits T on data: pass X and y to fit")
            X, y = check_features(X, y, n_features=head.n_features_in_, classes=head.classes_, device=head._device,
                                  expecting=type(head).__name__)
            self.temperature_ = fit_temperature(head.scores(X), y)
        else:
            self.temperature_ = float(self.temperature)
        try:
            W, b = head.linear_form()
        except (AttributeError, ValueError):  # not a linear layer (NCM, kNN): scores are divided on the fly
            pass
        else:
            self.weight_, self.bias_ = W / self.temperature_, b / self.temperature_
        self.n_features_in_ = head.n_features_in_
        self.classes_ = head.classes_
        return self

    def __sklearn_clone__(self) -> TemperatureScaled:
        return clone_keeping(self, "head")

    @property
    def _device(self) -> torch.device:
        return self.head._device

    def implied_prior(self, counts: Any) -> torch.Tensor:
        """The base head's: a temperature changes no argmax and no prior."""
        return self.head.implied_prior(counts)

    def linear_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W / T, b / T) of a linear base head; ValueError for any other."""
        if not hasattr(self, "weight_"):
            raise ValueError(f"a temperature-scaled {type(self.head).__name__} is not a linear layer")
        return self.weight_, self.bias_

    def _scores(self, X: torch.Tensor) -> torch.Tensor:
        """Scores float32 (N, C) of the base head divided by T."""
        return self.head._scores(X) / self.temperature_


def calibration_metrics(
    scores: Any, labels: Any, counts: Any, *, n_bins: int = 15, **thresholds: int
) -> dict[str, dict[str, float]]:
    """NLL and ECE (``n_bins`` bins) of softmax(scores) over all rows and per shot group.

    ``scores`` float (N, C), ``labels`` int (N,); a group holds the rows whose class is in it
    (by train ``counts``). Returns ``{"all" | "many" | "medium" | "few": {"nll", "ece", "n"}}``
    (NaN for an empty group).
    """
    return calibration_from_rows(score_row_statistics(scores, labels, len(counts)), labels, counts, n_bins=n_bins,
                                 **thresholds)


def calibration_from_rows(
    rows: dict[str, torch.Tensor], labels: Any, counts: Any, *, n_bins: int = 15, **thresholds: int
) -> dict[str, dict[str, float]]:
    """:func:`calibration_metrics` from per-row statistics (:func:`lt_rebalance.metrics.row_statistics`)."""
    y = as_tensor(labels, torch.int64)
    groups = shot_groups(counts, **thresholds)
    masks = {"all": torch.ones_like(y, dtype=torch.bool), **{g: groups[g][y] for g in GROUPS}}
    correct = rows["pred"] == y
    out = {}
    for name, m in masks.items():
        n = int(m.sum())
        out[name] = {
            "nll": rows["nll"][m].mean().item() if n else math.nan,
            "ece": calibration_error(rows["conf"][m], correct[m], n_bins) if n else math.nan,
            "n": n,
        }
    return out

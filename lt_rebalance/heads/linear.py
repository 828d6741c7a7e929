"""The stored stage-1 (joint) classifier as a head: logits = X Wᵀ + b."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from ..blocks import linear_logits
from ..precision import PRECISIONS, fit_precision
from ..priors import train_prior
from .base import ARRAY, NONE, BaseHead, StrOptions, check_bias, check_weight


class LinearDecision:
    """Scores of a head whose fitted state is a linear layer ``weight_`` (C, D), ``bias_`` (C,)."""

    _state = "weight_"

    def _scores(self, X: torch.Tensor) -> torch.Tensor:
        """Logits float32 (N, C) = X weight_ᵀ + bias_, products in ``precision_``."""
        return linear_logits(X, self.weight_, self.bias_, precision=self.precision_)

    def linear_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight_ float32 (C, D), bias_ float32 (C,)): the plain linear layer this head is (for export)."""
        return self.weight_, self.bias_


class JointHead(LinearDecision, BaseHead):
    """A fixed linear classifier (the joint baseline, or any exported head).

    Parameters
    ----------
    weight : float (C, D)
    bias : float (C,) or None
    precision : {"float32", "bfloat16", "tf32", "auto"}, default="float32"
        Arithmetic of the scoring products (:mod:`lt_rebalance.precision`).

    Attributes
    ----------
    weight_ : float32 (C, D)
    bias_ : float32 (C,) (zeros when no bias)
    classes_ : ndarray (C,)
        arange(C): row j of ``weight`` is class j.

    Notes
    -----
    ``predict_proba`` is softmax(logits) of the stage-1 model, trained on the instance-balanced
    (long-tailed) train distribution: it carries that prior and the usual overconfidence.
    """

    _parameter_constraints = {"weight": [ARRAY], "bias": [ARRAY, NONE], "precision": [StrOptions(set(PRECISIONS))]}
    _requires_y = False

    def __init__(self, weight: Any, bias: Optional[Any] = None, *, device: str = "cpu", precision: str = "float32"):
        self.weight = weight
        self.bias = bias
        self.device = device
        self.precision = precision

    def fit(self, X: Any = None, y: Any = None) -> JointHead:
        """Nothing to learn: takes the stored weights. X and y are ignored."""
        self._validate_params()
        self.weight_ = check_weight(self.weight, self.device)
        self.bias_ = check_bias(self.bias, self.weight_.shape[0], self.device)
        self.precision_ = fit_precision(self.precision, self.weight_.device, "joint")
        self.n_features_in_ = self.weight_.shape[1]
        self.classes_ = np.arange(self.weight_.shape[0])
        return self

    def implied_prior(self, counts: Any) -> torch.Tensor:
        """The train prior π: the stage-1 model saw the instance-balanced (long-tailed) train split."""
        return train_prior(counts)

    def logit_affine(self) -> tuple[None, torch.Tensor]:
        """(None, bias_): scores = X Wᵀ + bias_."""
        return None, self.bias_

"""MARC, margin calibration (Wang et al., 2021): z'_j = ω_j z_j + β_j ‖w_j‖ on the frozen joint logits."""
from __future__ import annotations

import torch

from .lws import JointLogitCalibration


class MARC(JointLogitCalibration):
    """Per-class scale ω and margin β on the frozen joint classifier.

    z = X Wᵀ + b are the joint logits; the calibrated logit of class j is
    z'_j = ω_j z_j + β_j ‖w_j‖₂, with ω initialised to 1 and β to 0 (the joint classifier), so
    ω rescales a class's logit and β shifts its decision boundary by a margin proportional to its
    weight norm. Only ω and β are trained, from the cached joint logits, with LWS's training path
    and defaults (class-balanced sampling, cross-entropy, SGD momentum 0.9, lr 0.2, weight decay
    5e-4, auto batch and epochs as LWS, cosine schedule, best val epoch kept).

    Parameters
    ----------
    Those of :class:`~lt_rebalance.heads.LWS`.

    Attributes
    ----------
    omega_, beta_ : float32 (C,)
    weight_norms_ : float32 (C,)
        ‖w_j‖₂ of the joint classifier.
    weight_, bias_ : float32 (C, D), (C,)
        The folded head ω·W, ω·b + β·‖w‖ (a plain linear layer).
    classes_ : ndarray (C,)
    history_ : TrainHistory

    Notes
    -----
    ``predict_proba`` is softmax(z'): trained by cross-entropy under class-balanced sampling, so it
    estimates the posterior for a balanced prior.

    References
    ----------
    Wang, Zhang, Zhang, Tao, *Margin calibration for long-tailed visual recognition*, ACML 2022
    (arXiv:2112.07225).
    """

    def _init_params(self, W: torch.Tensor) -> list[torch.Tensor]:
        self._norms = torch.linalg.vector_norm(W, dim=1)
        C = W.shape[0]
        return [torch.ones(C, device=W.device), torch.zeros(C, device=W.device)]

    def _affine(self, params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        omega, beta = params
        return omega, beta * self._norms

    def _fold(self, W: torch.Tensor, b: torch.Tensor, params: list[torch.Tensor]) -> None:
        self.omega_, self.beta_ = params
        self.weight_norms_ = self._norms
        del self._norms
        self.weight_ = W * self.omega_[:, None]
        self.bias_ = torch.addcmul(b * self.omega_, self.beta_, self.weight_norms_)

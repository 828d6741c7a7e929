"""DisAlign, distribution alignment (Zhang et al., CVPR 2021): a confidence-gated per-class scale and
bias on the frozen joint classifier, trained with the generalized re-weighted loss (docs/METHODS.md)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..blocks import linear_logits
from .base import ARRAY, NONE, Interval, StrOptions
from .losses import LAS_SHAPES, LOSSES, weighted_cross_entropy
from .lws import CACHE_DTYPES, JointLogitCalibration
from .training import AUTO, ProgressFn, sgd_constraints

REFERENCE_EPOCHS, REFERENCE_BATCH = 10, 256  # the authors' ImageNet-LT configuration


def align(z: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """s = z + σ·((α − 1) ⊙ z + β), the paper's σ (α ⊙ z + β) + (1 − σ) z.

    z float32 (n, C) joint logits, ``gate`` σ float32 (n,) in (0, 1), ``scale`` = α − 1 and
    ``shift`` = β float32 (C,). Returns (n, C).
    """
    return torch.addcmul(z, gate[:, None], torch.addcmul(shift, z, scale))


def confidence(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor) -> torch.Tensor:
    """σ(x) = sigmoid(v·x + c) of features x float32 (n, D), v (D,), c (1,): float32 (n,)."""
    return torch.sigmoid(torch.addmv(gate_bias, x, gate_weight))


class DisAlign(JointLogitCalibration):
    """Distribution alignment on the frozen joint classifier.

    With z = X Wᵀ + b the joint logits, the aligned logits are
    s = σ(x) (α ⊙ z + β) + (1 − σ(x)) z, where σ(x) = sigmoid(v·x + c) is a learnt confidence
    gate on the features and α (init 1), β (init 0) are per-class. Only α, β, v and c are trained,
    by SGD on the cached joint logits (the training path of LWS and MARC), with the generalized
    re-weighted cross-entropy: class weights w_j ∝ (n_j / N)^−ρ, the weighted mean over the batch
    (the authors' ``GRWCrossEntropyLoss``, ρ = 1.2). Defaults follow the authors' ImageNet-LT
    configuration (instance-balanced sampling, lr 0.1, weight decay 5e-4, momentum 0.9, batch 256,
    10 epochs, cosine schedule stepped per epoch); "auto" batch and epochs adapt to small files as
    for LWS. The best val epoch is kept.

    Differences from the authors' code (docs/METHODS.md, "DisAlign"): their layer computes
    (1 + σ·a) z + σ·β with a initialised to 1 (α = 1 + a = 2 at the start) and v to 0.1 in every
    entry; here α starts at 1 and v, c at 0 (σ = ½), so training starts from the joint
    classifier whatever the scale of the features. As in their code, weight decay acts on α − 1
    (pulling the head towards the joint classifier), β, v and c.

    Parameters
    ----------
    weight, bias : float (C, D), (C,) or None
        The joint classifier (frozen).
    epochs, batch_size : int or "auto", default="auto"
        "auto": 10 epochs and batch 256 (the authors'), lengthened and shrunk on small files as LWS.
    lr, momentum, weight_decay, sampler, schedule, keep_best, seed, device, cache_dtype, max_cache_gb
        As :class:`~lt_rebalance.heads.LWS`; defaults lr 0.1, sampler "ib".
    loss : {"grw", "ce", "las"}, default="grw"
    rho : float, default=1.2
        The GRW exponent ρ: w_j ∝ n_j^−ρ (0: plain cross-entropy).
    smooth_head, smooth_tail, smooth_shape
        Label-aware smoothing, for loss="las" (see LWS).

    Attributes
    ----------
    alpha_, beta_ : float32 (C,)
        The per-class scale α and bias β.
    gate_weight_ : float32 (D,)
    gate_bias_ : float32 (1,)
        The confidence gate σ(x) = sigmoid(gate_weight_·x + gate_bias_).
    weight_, bias_ : float32 (C, D), (C,)
        The joint classifier (the aligned head is not a linear layer: the gate depends on x).
    classes_ : ndarray (C,)
    history_, schedule_, protocol_params_, cache_dtype_
        As :class:`~lt_rebalance.heads.LWS`.

    Notes
    -----
    ``predict_proba`` is softmax(s). Trained by the GRW loss on instance-balanced batches, its
    scores are balanced for the prior p_j ∝ n_j^(1−ρ) (:meth:`implied_prior`); ρ = 1 is the
    class-balanced case.

    References
    ----------
    Zhang, Li, Yan, He, Sun, *Distribution Alignment: A Unified Framework for Long-tail Visual
    Recognition*, CVPR 2021; code: github.com/Megvii-BaseDetection/DisAlign (layer and loss in
    cvpods: ``DisAlignLinear``, ``GRWCrossEntropyLoss``).
    """

    _parameter_constraints = {
        **sgd_constraints(),
        "weight": [ARRAY],
        "bias": [ARRAY, NONE],
        "max_cache_gb": [Interval(float, 0, None), NONE],
        "cache_dtype": [StrOptions(set(CACHE_DTYPES))],
        "loss": [StrOptions(set(LOSSES))],
        "rho": [Interval(float, 0, None)],
        "smooth_head": [Interval(float, 0, 1, closed="left")],
        "smooth_tail": [Interval(float, 0, 1, closed="left")],
        "smooth_shape": [StrOptions(set(LAS_SHAPES))],
    }
    _reference_epochs = REFERENCE_EPOCHS
    _reference_batch = REFERENCE_BATCH
    _needs_features = True

    def __init__(
        self,
        weight: Any,
        bias: Optional[Any] = None,
        *,
        epochs: int | str = AUTO,
        lr: float = 0.1,
        batch_size: int | str = AUTO,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        sampler: Any = "ib",
        schedule: str = "cosine",
        keep_best: bool = True,
        seed: int = 0,
        device: str = "auto",
        cache_dtype: str = "float16",
        max_cache_gb: Optional[float] = None,
        loss: str = "grw",
        rho: float = 1.2,
        smooth_head: float = 0.3,
        smooth_tail: float = 0.0,
        smooth_shape: str = "concave",
        progress: Optional[ProgressFn] = None,
        precision: str = "float32",
    ):
        super().__init__(
            weight, bias, epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum,
            weight_decay=weight_decay, sampler=sampler, schedule=schedule, keep_best=keep_best, seed=seed,
            device=device, cache_dtype=cache_dtype, max_cache_gb=max_cache_gb, loss=loss, rho=rho,
            smooth_head=smooth_head, smooth_tail=smooth_tail, smooth_shape=smooth_shape, progress=progress,
            precision=precision,
        )

    def _init_params(self, W: torch.Tensor) -> list[torch.Tensor]:
        C, D = W.shape
        z = torch.zeros  # α − 1, β, v, c: the joint classifier at the start
        return [z(C, device=W.device), z(C, device=W.device), z(D, device=W.device), z(1, device=W.device)]

    def _calibrate(self, z: torch.Tensor, params: list[torch.Tensor], x: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
        scale, shift, v, c = params
        return align(z, confidence(x, v, c), scale, shift)

    def _batch_loss(self, z: torch.Tensor, y: torch.Tensor, x: Optional[torch.Tensor], params: list[torch.Tensor],
                    terms: dict) -> torch.Tensor:
        return weighted_cross_entropy(self._calibrate(z.float(), params, x), y, **terms)

    def logit_affine(self) -> None:
        """None: the aligned scores are no per-class affine map of X Wᵀ (the gate depends on x)."""
        return None

    def linear_form(self) -> tuple[torch.Tensor, torch.Tensor]:
        """DisAlign is no linear layer: the gate σ(v·x + c) mixes the aligned and the joint logits."""
        raise ValueError("a DisAlign head is not a linear layer (its gate depends on the features)")

    def _finish(self, W: torch.Tensor, b: torch.Tensor, fitted: list[torch.Tensor]) -> None:
        scale, self.beta_, self.gate_weight_, self.gate_bias_ = fitted
        self.alpha_ = scale + 1
        self.weight_, self.bias_ = W, b

    def _scores(self, X: torch.Tensor) -> torch.Tensor:
        """Aligned logits float32 (N, C): one GEMM gives the joint logits and the gate's input."""
        Wg = torch.cat([self.weight_, self.gate_weight_[None, :]])
        bg = torch.cat([self.bias_, self.gate_bias_])
        zg = linear_logits(X, Wg, bg)
        return align(zg[:, :-1], torch.sigmoid(zg[:, -1]), self.alpha_ - 1, self.beta_)

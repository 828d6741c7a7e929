"""MARC, margin calibration (Wang et al., 2021): z'_j = ω_j z_j + β_j ‖w_j‖ on the frozen joint logits."""
from __future__ import annotations

from typing import Any, Optional

import torch

from .base import NONE, StrOptions
from .losses import LOSSES
from .lws import JointLogitCalibration
from .training import AUTO, DEFAULT_BATCH_SIZE, ProgressFn, sgd_constraints

PROTOCOLS = ("paper", "authors")
# what each protocol's None / "auto" settings stand for (docs/METHODS.md, "MARC")
PROTOCOL_SETTINGS = {
    "paper": {"lr": 0.2, "sampler": "cb", "loss": "ce", "epoch_batches": "full",
              "reference_epochs": 5, "reference_batch": DEFAULT_BATCH_SIZE},
    # microsoft/robustlearn marc/config/*/MARC.yaml and run_networks.py
    "authors": {"lr": 0.05, "sampler": "ib", "loss": "grw", "epoch_batches": "drop-last",
                "reference_epochs": 10, "reference_batch": 256},
}


class MARC(JointLogitCalibration):
    """Per-class scale ω and margin β on the frozen joint classifier.

    z = X Wᵀ + b are the joint logits; the calibrated logit of class j is
    z'_j = ω_j z_j + β_j ‖w_j‖₂, with ω initialised to 1 and β to 0 (the joint classifier), so
    ω rescales a class's logit and β shifts its decision boundary by a margin proportional to its
    weight norm. Only ω and β are trained, from the cached joint logits, with LWS's training path
    (SGD momentum 0.9, weight decay 5e-4, cosine schedule stepped after each epoch, best val epoch
    kept) under one of two protocols (docs/METHODS.md, "MARC"):

    * ``"paper"`` (default): LWS's recipe: class-balanced sampling, plain cross-entropy, lr 0.2,
      batch 512, 5 epochs, ⌊N/B⌋ steps an epoch;
    * ``"authors"``: the official code's configurations: the GRW-reweighted cross-entropy
      (w_j ∝ n_j^−1.2, ``rho``), instance-balanced sampling, lr 0.05, batch 256 (Places-LT: pass
      128), 10 epochs (iNaturalist: pass 30; weight decay 1e-4), and ⌊N/B⌋ − 1 steps an epoch
      (their loop stops when its step counter reaches ⌊N/B⌋).

    ``lr``, ``sampler`` and ``loss`` left at None take the protocol's value; "auto" epochs and batch
    are the protocol's, lengthened and shrunk on small files as for LWS. An explicit value wins.

    Parameters
    ----------
    protocol : {"paper", "authors"}, default="paper"
    lr : float or None, default=None
    sampler : sampler name, power or None, default=None
    loss : {"ce", "grw", "las"} or None, default=None
    Others: those of :class:`~lt_rebalance.heads.LWS`.

    Attributes
    ----------
    omega_, beta_ : float32 (C,)
    weight_norms_ : float32 (C,)
        ‖w_j‖₂ of the joint classifier.
    weight_, bias_ : float32 (C, D), (C,)
        The folded head ω·W, ω·b + β·‖w‖ (a plain linear layer).
    classes_ : ndarray (C,)
    history_ : TrainHistory
    protocol_params_ : dict
        ``protocol`` and what it ran: lr, weight_decay, sampler, schedule, loss (rho), epochs,
        batch_size, steps_per_epoch, steps, epoch_batches.

    Notes
    -----
    ``predict_proba`` is softmax(z'). Under "paper" (class-balanced sampling) it estimates the
    posterior for a balanced prior; under "authors" (GRW weights on instance-balanced batches) for
    p_j ∝ n_j^(1 − ρ) (:meth:`implied_prior`).

    References
    ----------
    Wang, Zhang, Zhang, Tao, *Margin calibration for long-tailed visual recognition*, ACML 2022
    (arXiv:2112.07225); code: github.com/microsoft/robustlearn (``marc/``).
    """

    _method = "marc"
    _parameter_constraints = {
        **JointLogitCalibration._parameter_constraints,
        "protocol": [StrOptions(set(PROTOCOLS))],
        "lr": [*sgd_constraints()["lr"], NONE],
        "sampler": [*sgd_constraints()["sampler"], NONE],
        "loss": [StrOptions(set(LOSSES)), NONE],
    }

    def __init__(
        self,
        weight: Any,
        bias: Optional[Any] = None,
        *,
        protocol: str = "paper",
        epochs: int | str = AUTO,
        lr: Optional[float] = None,
        batch_size: int | str = AUTO,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        sampler: Any = None,
        schedule: str = "cosine",
        keep_best: bool = True,
        seed: int = 0,
        device: str = "auto",
        cache_dtype: str = "float16",
        max_cache_gb: Optional[float] = None,
        loss: Optional[str] = None,
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
        self.protocol = protocol

    def _settings(self) -> dict[str, Any]:
        given = {k: v for k, v in super()._settings().items() if v is not None and not k.startswith("reference_")}
        given.pop("epoch_batches")
        return {**PROTOCOL_SETTINGS[self.protocol], **given}

    def _record(self, settings: dict[str, Any]) -> dict[str, Any]:
        return {"protocol": self.protocol, **super()._record(settings)}

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

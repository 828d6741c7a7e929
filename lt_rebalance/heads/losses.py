"""Cross-entropy of per-class affine logits with a closed-form gradient (the LWS/MARC training step).

LWS and MARC train C-vectors on frozen logits z (B, C): the calibrated logits are u = z ⊙ a + c
(broadcast over rows). Autograd would keep u, its softmax and their gradients as (B, C) tensors
and walk them in a dozen element-wise passes; here the gradient is written out:

    L = mean_i [ logsumexp_j u_ij - u_{i,y_i} ],   G = (softmax(u) - onehot(y)) / B,
    dL/da_j = Σ_i G_ij z_ij,                        dL/dc_j = Σ_i G_ij,

With class weights w (the generalized re-weighting, :func:`grw_weights`) and per-class label
smoothing ε (label-aware smoothing, :func:`las_smoothing`), row i's target is
q_i = (1 − ε_{y_i}) onehot(y_i) + ε_{y_i} / C and its weight w_{y_i}:

    L = Σ_i w_{y_i} [ logsumexp_j u_ij − Σ_j q_ij u_ij ] / Σ_i w_{y_i},
    G_ij = w_{y_i} (softmax(u)_ij − q_ij) / Σ_i w_{y_i}

(the weighted mean of PyTorch's ``cross_entropy(weight=w)``; both reduce to the above at w = 1,
ε = 0). :func:`weighted_cross_entropy` is the same loss by autograd, for heads whose logits are
not a per-class affine map (cRT, DisAlign).

computed block by block of rows (each block small enough to stay in cache: :data:`BLOCK_LOGITS`)
in one float32 buffer plus two matrix-vector products. At iNaturalist-2018 size (B 512, C 8142) a
step takes a third to a half of the autograd version's time (benchmarks/ measures it).

``EXP_FLOOR``: u - max u is clamped at -60 before the exponential, so softmax entries below
e^-60 ≈ 9e-27 of the largest are raised to that value. Their true values are beyond float32's
resolution of the row sum (which is at least 1), so the loss is unchanged and each softmax entry
moves by less than 1e-26 (a gradient entry by that times |z|); in exchange the exponentials and
their products with logits of ordinary size are never denormal floats (which a CPU computes many
times slower). The one-hot term is subtracted inside each block, so every reduction runs in a
fixed order (the same gradient on every run, on a GPU too).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..blocks import column_affine, row_blocks

EXP_FLOOR = -60.0
# logits per block of rows: a float32 block of 2 MiB and its upcast copy stay in a core's cache, which
# makes a step at 512 x 8142 markedly faster than passes over the whole batch
BLOCK_LOGITS = 2**19
# multiply-adds one logit costs in a step (upcast, exponential, two products, reductions), the unit
# of the training loop's one-thread rule (training.SMALL_STEP): two threads are faster from
# 512 x 1000 logits up
STEP_WORK_PER_LOGIT = 40


LOSSES = ("ce", "grw", "las")  # plain, generalized re-weighting (DisAlign / MARC authors), label-aware smoothing
LAS_SHAPES = ("concave", "linear", "convex")


def grw_weights(counts: Any, rho: float) -> torch.Tensor:
    """Generalized re-weighting (Zhang et al., DisAlign, CVPR 2021): w_j = (n_j / N)^−ρ, normalised to
    sum to C, float32 (C,), as the authors' ``GRWCrossEntropyLoss``. A class without train rows
    counts as one row (its weight never enters a loss: it has no rows; the authors' code would give
    it an infinite weight). The normalisation cancels in the weighted mean of the loss."""
    n = torch.as_tensor(counts, dtype=torch.float64).clamp_min(1)
    return (torch.softmax(-rho * n.log(), 0) * len(n)).to(torch.float32)  # in log space: any ρ >= 0


def las_smoothing(counts: Any, head: float, tail: float, shape: str = "concave") -> torch.Tensor:
    """Label-aware smoothing ε_j (Zhong et al., MiSLAS, CVPR 2021), float32 (C,), as the authors'
    ``LabelAwareSmoothing``: with r_j = (n_j − n_min) / (n_max − n_min) over all classes,

    * concave (their default): ε_j = tail + (head − tail) · sin(π r_j / 2)
    * linear: ε_j = tail + (head − tail) · r_j
    * convex: ε_j = head + (head − tail) · sin(3π/2 + π r_j / 2)

    so the largest class gets ``head`` and the smallest ``tail``. Equal counts (n_max = n_min, where
    the authors divide 0 by 0) give every class ``head``.
    """
    n = torch.as_tensor(counts, dtype=torch.float64)
    span = n.max() - n.min()
    r = (n - n.min()) / span if span > 0 else torch.ones_like(n)
    if shape == "concave":
        eps = tail + (head - tail) * torch.sin(r * math.pi / 2)
    elif shape == "linear":
        eps = tail + (head - tail) * r
    elif shape == "convex":
        eps = head + (head - tail) * torch.sin(1.5 * math.pi + r * math.pi / 2)
    else:
        raise ValueError(f"unknown smoothing shape {shape!r}; choose one of {', '.join(LAS_SHAPES)}")
    return eps.to(torch.float32)


def smoothed_nll(logits: torch.Tensor, y: torch.Tensor, smoothing: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row loss (n,) of logits (n, C): −log p_y, or with per-class ``smoothing`` ε (C,)
    (1 − ε_y)(−log p_y) + ε_y · mean_j(−log p_j) (MiSLAS' ``LabelAwareSmoothing`` before its mean)."""
    logp = F.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
    loss = -logp.gather(1, y[:, None])[:, 0]
    if smoothing is None:
        return loss
    eps = smoothing[y]
    return (1 - eps) * loss - eps * logp.mean(1)


def weighted_cross_entropy(logits: torch.Tensor, y: torch.Tensor, class_weights: Optional[torch.Tensor] = None,
                           smoothing: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The loss of the module docstring by autograd: logits float (B, C), y int64 (B,), per-class
    ``class_weights`` and ``smoothing`` float32 (C,) or None. Returns a scalar."""
    loss = smoothed_nll(logits, y, smoothing)
    if class_weights is None:
        return loss.mean()
    w = class_weights[y]
    return (w * loss).sum() / w.sum()


class _AffineCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, y: torch.Tensor, a: torch.Tensor, c: Optional[torch.Tensor],
                w: Optional[torch.Tensor], eps: Optional[torch.Tensor]) -> torch.Tensor:
        B, C = z.shape
        with_c = c is not None and ctx.needs_input_grad[3]
        grad_a = a.new_zeros(C)
        grad_c = a.new_zeros(C) if with_c else a.new_empty(0)
        loss = a.new_zeros(())
        total = w[y].sum() if w is not None else B  # the weighted mean's denominator
        rows_per_block = B if z.is_cuda else max(1, BLOCK_LOGITS // max(C, 1))
        for rows in row_blocks(B, rows_per_block):  # blocks that stay in cache
            zf, yb = z[rows].float(), y[rows]  # float16/bfloat16 cache rows are upcast per block
            at_label = (torch.arange(len(yb), device=z.device), yb)
            z_y = zf[at_label]
            u_y = z_y * a[yb] if c is None else torch.addcmul(c[yb], z_y, a[yb])
            e = column_affine(zf, a, c)  # the block's one buffer: u, then exp(u - max)
            u_mean = e.mean(1) if eps is not None else None
            m = e.amax(1, keepdim=True)
            e.sub_(m).clamp_min_(EXP_FLOOR).exp_()
            S = e.sum(1)
            row_loss = S.log() + m.squeeze(1) - u_y
            r = (S * total).reciprocal_()
            if eps is None:
                e[at_label] -= S  # e - S onehot: (softmax - onehot) B = (e - S onehot) r_i B
            else:  # lse - (1 - ε) u_y - ε mean u;  e - S q_i
                eb = eps[yb]
                row_loss += eb * (u_y - u_mean)
                e[at_label] -= S * (1 - eb)
                e.sub_((S * eb / C)[:, None])
            if w is not None:
                wb = w[yb]
                row_loss *= wb
                r *= wb
            loss += row_loss.sum()
            if with_c:
                grad_c.addmv_(e.T, r)
            grad_a.addmv_(e.mul_(zf).T, r)
        ctx.save_for_backward(grad_a, grad_c)
        ctx.has_c = c is not None
        return loss / total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_a, grad_c = ctx.saved_tensors
        return (None, None, grad_out * grad_a, (grad_out * grad_c if ctx.has_c and grad_c.numel() else None),
                None, None)


def affine_cross_entropy(z: torch.Tensor, y: torch.Tensor, a: torch.Tensor, c: Optional[torch.Tensor] = None,
                         *, class_weights: Optional[torch.Tensor] = None,
                         smoothing: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross-entropy of the logits u = z ⊙ a + c, differentiable in ``a`` and ``c``.

    z: float (B, C), any float dtype (upcast to float32; not differentiated); y: int64 (B,) labels
    in [0, C); a: float32 (C,); c: float32 (C,) or None (u = z ⊙ a). ``class_weights`` and
    ``smoothing``: float32 (C,) or None, the weighted, smoothed loss of the module docstring.
    Returns a float32 scalar whose gradients with respect to a and c are computed in closed form in
    the forward pass (module docstring), so ``backward`` costs O(C).
    """
    return _AffineCrossEntropy.apply(z, y, a, c, class_weights, smoothing)

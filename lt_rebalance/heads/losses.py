"""Cross-entropy of per-class affine logits with a closed-form gradient (the LWS/MARC training step).

LWS and MARC train C-vectors on frozen logits z (B, C): the calibrated logits are u = z ⊙ a + c
(broadcast over rows). Autograd would keep u, its softmax and their gradients as (B, C) tensors
and walk them in a dozen element-wise passes; here the gradient is written out:

    L = mean_i [ logsumexp_j u_ij - u_{i,y_i} ],   G = (softmax(u) - onehot(y)) / B,
    dL/da_j = Σ_i G_ij z_ij,                        dL/dc_j = Σ_i G_ij,

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

from typing import Optional

import torch

from ..blocks import column_affine, row_blocks

EXP_FLOOR = -60.0
# logits per block of rows: a float32 block of 2 MiB and its upcast copy stay in a core's cache, which
# makes a step at 512 x 8142 markedly faster than passes over the whole batch
BLOCK_LOGITS = 2**19
# multiply-adds one logit costs in a step (upcast, exponential, two products, reductions), the unit
# of the training loop's one-thread rule (training.SMALL_STEP): two threads are faster from
# 512 x 1000 logits up
STEP_WORK_PER_LOGIT = 40


class _AffineCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, y: torch.Tensor, a: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:
        B, C = z.shape
        with_c = c is not None and ctx.needs_input_grad[3]
        grad_a = a.new_zeros(C)
        grad_c = a.new_zeros(C) if with_c else a.new_empty(0)
        loss = a.new_zeros(())
        rows_per_block = B if z.is_cuda else max(1, BLOCK_LOGITS // max(C, 1))
        for rows in row_blocks(B, rows_per_block):  # blocks that stay in cache
            zf, yb = z[rows].float(), y[rows]  # float16/bfloat16 cache rows are upcast per block
            at_label = (torch.arange(len(yb), device=z.device), yb)
            z_y = zf[at_label]
            u_y = z_y * a[yb] if c is None else torch.addcmul(c[yb], z_y, a[yb])
            e = column_affine(zf, a, c)  # the block's one buffer: u, then exp(u - max)
            m = e.amax(1, keepdim=True)
            e.sub_(m).clamp_min_(EXP_FLOOR).exp_()
            S = e.sum(1)
            loss += (S.log() + m.squeeze(1) - u_y).sum()
            e[at_label] -= S  # e - S onehot: (softmax - onehot) B = (e - S onehot) r_i B
            r = (S * B).reciprocal_()
            if with_c:
                grad_c.addmv_(e.T, r)
            grad_a.addmv_(e.mul_(zf).T, r)
        ctx.save_for_backward(grad_a, grad_c)
        ctx.has_c = c is not None
        return loss / B

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_a, grad_c = ctx.saved_tensors
        return None, None, grad_out * grad_a, (grad_out * grad_c if ctx.has_c and grad_c.numel() else None)


def affine_cross_entropy(z: torch.Tensor, y: torch.Tensor, a: torch.Tensor, c: Optional[torch.Tensor] = None
                         ) -> torch.Tensor:
    """Mean cross-entropy of the logits u = z ⊙ a + c, differentiable in ``a`` and ``c``.

    z: float (B, C), any float dtype (upcast to float32; not differentiated); y: int64 (B,) labels
    in [0, C); a: float32 (C,); c: float32 (C,) or None (u = z ⊙ a). Returns a float32 scalar whose
    gradients with respect to a and c are computed in closed form in the forward pass (module
    docstring), so ``backward`` costs O(C).
    """
    return _AffineCrossEntropy.apply(z, y, a, c)

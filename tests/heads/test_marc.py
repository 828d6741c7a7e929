"""MARC (lt_rebalance.heads.marc): one SGD step and the folded head against numpy."""
from __future__ import annotations

import numpy as np
import pytest
from head_refs import gaussians, np_softmax

from lt_rebalance.heads import MARC

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_marc_step_and_folded_head_match_numpy():
    X, y, rng = gaussians([30, 12, 5], dim=4)
    W, b = rng.normal(size=(3, 4)), rng.normal(size=3)
    lr, wd = 0.3, 5e-4
    head = MARC(W, b, epochs=1, lr=lr, batch_size=len(y), sampler="ib", weight_decay=wd, schedule="constant",
                cache_dtype="float32",  # the exact step (the default float16 cache rounds z to 2^-11)
                keep_best=False, device="cpu").fit(X, y)
    Z, norms = X @ W.T + b, np.linalg.norm(W, axis=1)
    G = (np_softmax(Z) - np.eye(3)[y]) / len(y)  # d mean CE / dz' at omega = 1, beta = 0
    omega = 1 - lr * ((G * Z).sum(0) + wd)
    beta = -lr * (G.sum(0) * norms)
    np.testing.assert_allclose(head.omega_.numpy(), omega, rtol=1e-5)
    np.testing.assert_allclose(head.beta_.numpy(), beta, rtol=1e-4, atol=1e-7)
    Xq = rng.normal(size=(10, 4))
    np.testing.assert_allclose(head.scores(Xq), omega * (Xq @ W.T + b) + beta * norms,
                               rtol=1e-5, atol=1e-5)

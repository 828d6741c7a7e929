"""The joint head (lt_rebalance.heads.linear) against the direct float64 product."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from head_refs import joint_like_weight

from lt_rebalance.heads import JointHead

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_joint_head_logits(tau_data):
    d = tau_data
    W = joint_like_weight(d)
    b = np.linspace(-1, 1, 12).astype(np.float32)
    got = JointHead(W, b).fit().decision_function(d["X_test"])
    np.testing.assert_allclose(got, d["X_test"].astype(np.float64) @ W.T.astype(np.float64) + b, rtol=1e-5, atol=1e-5)
    no_bias = JointHead(torch.from_numpy(W)).fit().decision_function(torch.from_numpy(d["X_test"])).numpy()
    np.testing.assert_allclose(no_bias, d["X_test"].astype(np.float64) @ W.T, rtol=1e-5, atol=1e-5)

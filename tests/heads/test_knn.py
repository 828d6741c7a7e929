"""Weighted kNN (lt_rebalance.heads.knn) against a numpy transcription of DINO's knn_classifier."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from head_refs import gaussians, np_knn_shares

from lt_rebalance.heads import KNN
from lt_rebalance.heads.knn import topk_similar

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.mark.parametrize("k,T,p", [(1, 0.07, 0.0), (5, 0.07, 0.0), (20, 0.1, 1.0), (7, 0.02, 0.5)])
def test_knn_matches_numpy_across_blocks(k, T, p):
    X, y, rng = gaussians([40, 20, 9, 4], dim=6)
    Xq = rng.normal(size=(23, 6)) * 2
    # blocks smaller than k and not dividing the row counts exercise the running top-k merge
    head = KNN(k, T, balance=p, query_block=7, train_block=5).fit(X, y)
    want = np_knn_shares(X, y, Xq, k, T, p, 4)
    np.testing.assert_allclose(head.predict_proba(Xq), want, rtol=1e-4, atol=1e-6)  # softmax of the log shares
    assert (head.predict(Xq) == want.argmax(1)).all()


def test_topk_merge_equals_full_topk():
    rng = np.random.default_rng(3)
    Q, T = torch.randn(9, 4, generator=torch.Generator().manual_seed(0)), torch.from_numpy(rng.normal(size=(50, 4))).float()
    s, i = topk_similar(Q, T, 6, train_block=8)
    s_full, i_full = (Q @ T.T).topk(6, dim=1)
    torch.testing.assert_close(s, s_full)
    assert torch.equal(i, i_full)


def test_knn_balance_helps_the_tail_and_k_larger_than_train():
    X, y, rng = gaussians([200, 6], dim=2, spread=2.0)
    Xq = X[y == 1] + 0.1 * rng.normal(size=(6, 2))
    plain = KNN(50).fit(X, y).predict(Xq)
    balanced = KNN(50, balance=1.0).fit(X, y).predict(Xq)
    assert (balanced == 1).sum() >= (plain == 1).sum()
    KNN(10_000).fit(X[:30], y[:30]).predict(Xq)  # k above the train rows: every row votes

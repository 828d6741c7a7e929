"""Nearest class mean (lt_rebalance.heads.ncm) against a numpy transcription of each variant."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from head_refs import min_top2_margin

from lt_rebalance.heads import NCM, NCM_VARIANTS

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def np_ncm_scores(Xtr, ytr, X, variant):
    """docs/METHODS.md, NCM: cl2n / l2n / un score = -squared distance; cos = cl2n feature · centroid / D."""
    Xtr, X = np.asarray(Xtr, np.float64), np.asarray(X, np.float64)
    mu = Xtr.mean(axis=0)

    def transform(Z):
        if variant == "un":
            return Z
        if variant in ("cl2n", "cos"):
            Z = Z - mu
        return Z / np.linalg.norm(Z, axis=1, keepdims=True)

    Ztr, Z = transform(Xtr), transform(X)
    C = int(ytr.max()) + 1
    cent = np.stack([Ztr[ytr == j].mean(axis=0) for j in range(C)])  # not renormalised
    if variant == "cos":
        return Z @ cent.T / Z.shape[1], cent
    return -((Z[:, None, :] - cent[None, :, :]) ** 2).sum(-1), cent


@pytest.mark.parametrize("variant", NCM_VARIANTS)
def test_ncm_variant_equals_numpy_formula(lt_data, variant):
    d = lt_data(num_classes=6, n_max=80, imbalance=20, dim=8, seed=2)
    # an offset makes centring matter
    Xtr, Xte = d["X_train"] + 2.0, d["X_test"] + 2.0
    head = NCM(variant).fit(Xtr, d["y_train"])
    expected, cent = np_ncm_scores(Xtr, d["y_train"], Xte, variant)
    got = head.decision_function(Xte)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(head.centroids_.numpy(), cent, rtol=1e-5, atol=1e-6)
    assert min_top2_margin(expected) > 1e-5
    np.testing.assert_array_equal(head.predict(torch.from_numpy(Xte)).numpy(), expected.argmax(1))
    if variant in ("cl2n", "cos"):
        np.testing.assert_allclose(head.mean_.numpy(), Xtr.astype(np.float64).mean(0), rtol=1e-5)


def test_ncm_variants_differ(lt_data):
    d = lt_data(num_classes=6, n_max=80, imbalance=20, dim=8, seed=2)
    Xtr = d["X_train"] + 2.0
    scores = {v: NCM(v).fit(Xtr, d["y_train"]).decision_function(d["X_test"] + 2.0) for v in NCM_VARIANTS}
    for a in NCM_VARIANTS:
        for b in NCM_VARIANTS:
            if a < b:
                assert not np.allclose(scores[a], scores[b]), (a, b)


def test_ncm_needs_every_class():
    X = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"none for classes \[1\]"):
        NCM().fit(X, [0, 2, 2], num_classes=3)
    with pytest.raises(ValueError, match=r"none for classes \[3\]"):
        NCM().fit(X, [0, 1, 2], num_classes=4)
    # without num_classes the classes are the labels seen: a gap is no missing class
    np.testing.assert_array_equal(NCM().fit(X, [0, 2, 2]).classes_, [0, 2])

"""lt_rebalance.session: a file's splits and stored classifier read once, shared by copies."""
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch

from lt_rebalance.session import Session
from lt_rebalance.store import FeatureStore, write_features


@pytest.fixture
def small(tmp_path):
    rng = np.random.default_rng(0)
    splits = {s: (rng.normal(size=(n, 4)).astype(np.float32), np.arange(n) % 3)
              for s, n in (("train", 30), ("val", 9), ("test", 12))}
    W = rng.normal(size=(3, 4)).astype(np.float32)
    return write_features(tmp_path / "f.h5", splits, weight=W), splits, W


def test_splits_and_head_are_read_once_and_shared_by_copies(small):
    path, splits, W = small
    s = Session(FeatureStore(path))
    X, y = s.load("train")
    np.testing.assert_array_equal(X.numpy(), splits["train"][0])
    assert s.load("train")[0] is X
    copy = replace(s, seed=5)
    assert copy.load("train")[0] is X and copy.head()[0] is s.head()[0]
    np.testing.assert_array_equal(s.head()[0].numpy(), W)
    assert s.eval_splits == ["val", "test"] and s.group_thresholds == {"many": 100, "few": 20}
    assert s.num_classes == 3 and torch.equal(s.counts, torch.tensor([10, 10, 10]))


def test_non_finite_features_are_named_before_any_method_runs(small, tmp_path):
    path, splits, W = small
    with h5py.File(path, "r+") as f:  # written outside the library (which refuses NaN features)
        f["splits/val/features"][2, 1] = np.nan
    bad = path
    with pytest.raises(ValueError, match=r"split 'val' has 1 feature row\(s\) with NaN values; `ltr check"):
        Session(FeatureStore(bad)).load("val")


def test_missing_train_and_val(small, tmp_path):
    path, splits, W = small
    only = write_features(tmp_path / "t.h5", {"test": splits["test"]}, counts=[10, 10, 10], weight=W)
    s = Session(FeatureStore(only))
    assert s.val() == (None, None) and not s.has_rows("val") and s.eval_splits == ["test"]
    with pytest.raises(ValueError, match="has no 'train' split"):
        s.train()

"""Feature store: schema v1 round trips, fp16 upcast, every validation error, atomic and incremental writing."""
from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest
import torch

from lt_rebalance.store import (
    FORMAT,
    FORMAT_VERSION,
    FeatureFileError,
    FeatureFileWriter,
    FeatureStore,
    write_features,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def expect_error(path, pattern, **kwargs):
    """Opening ``path`` raises FeatureFileError naming the file and matching ``pattern``."""
    with pytest.raises(FeatureFileError) as info:
        FeatureStore(path, **kwargs)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert re.search(pattern, msg), msg
    return info.value


# -- reading -------------------------------------------------------------------------------------
def test_round_trip_float32(feature_file):
    path, a = feature_file(model="resnet", dataset="toy", class_names=["a", "b", "c", "d"])
    store = FeatureStore(path)
    X, y = store.load("train")
    assert X.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_array_equal(X.numpy(), a["X_train"])
    np.testing.assert_array_equal(y.numpy(), a["y_train"])
    np.testing.assert_array_equal(store.features("test").numpy(), a["X_test"])
    np.testing.assert_array_equal(store.counts, np.bincount(a["y_train"], minlength=4))
    W, b = store.head()
    np.testing.assert_array_equal(W.numpy(), a["W"])
    np.testing.assert_array_equal(b.numpy(), a["b"])
    assert (store.num_classes, store.dim) == (4, 5)
    assert set(store.splits) == {"train", "test"}
    assert store.splits["train"].complete and store.splits["train"].rows == len(a["y_train"])
    assert store.class_names == ["a", "b", "c", "d"]
    assert store.attrs["format"] == FORMAT and store.attrs["format_version"] == FORMAT_VERSION
    assert store.attrs["model"] == "resnet" and store.attrs["dataset"] == "toy"
    assert "lt_rebalance" in json.loads(store.attrs["created_with"])


def test_fp16_file_reads_back_as_float32_of_the_fp16_values(feature_file):
    path, a = feature_file(dtype="float16")
    with h5py.File(path, "r") as f:
        assert f["splits/train/features"].dtype == np.float16
    store = FeatureStore(path)
    assert store.splits["train"].dtype == "float16"
    X = store.features("train")
    assert X.dtype == torch.float32
    np.testing.assert_array_equal(X.numpy(), a["X_train"].astype(np.float16).astype(np.float32))
    assert not np.array_equal(X.numpy(), a["X_train"])  # really rounded to half precision


def test_fp16_blocked_read_covers_every_row(tmp_path):
    # more rows than one read block (8192) so that the block loop and the tail are exercised
    rng = np.random.default_rng(0)
    X = rng.normal(size=(8192 + 37, 3)).astype(np.float16)
    y = rng.integers(0, 3, size=len(X))
    write_features(tmp_path / "f.h5", {"train": (X, y)}, dtype="float16")
    np.testing.assert_array_equal(FeatureStore(tmp_path / "f.h5").features("train").numpy(), X.astype(np.float32))


def test_torch_inputs_and_no_bias(tmp_path):
    X = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    W = torch.ones(3, 2)
    write_features(tmp_path / "t.h5", {"train": (X, y)}, weight=W)
    store = FeatureStore(tmp_path / "t.h5")
    assert torch.equal(store.features("train"), X)
    W2, b2 = store.head()
    assert torch.equal(W2, W) and b2 is None


def test_paths_round_trip(tmp_path):
    X = np.zeros((3, 2), np.float32)
    write_features(tmp_path / "p.h5", {"train": (X, [0, 1, 0], ["a/1.jpg", "b/2.jpg", "ü/3.jpg"])})
    store = FeatureStore(tmp_path / "p.h5")
    assert store.paths("train") == ["a/1.jpg", "b/2.jpg", "ü/3.jpg"]


def test_counts_default_and_explicit(tmp_path):
    X = np.zeros((4, 2), np.float32)
    write_features(tmp_path / "a.h5", {"train": (X, [0, 2, 2, 2])})
    assert FeatureStore(tmp_path / "a.h5").counts.tolist() == [1, 0, 3]
    write_features(tmp_path / "b.h5", {"test": (X, [0, 1, 1, 0])}, counts=[500, 7])
    assert FeatureStore(tmp_path / "b.h5").counts.tolist() == [500, 7]
    with pytest.raises(ValueError, match="counts"):
        write_features(tmp_path / "c.h5", {"test": (X, [0, 1, 1, 0])})


def test_no_head(feature_file):
    path, _ = feature_file(head=False)
    store = FeatureStore(path)
    assert not store.has_head
    with pytest.raises(FeatureFileError, match="no stored classifier") as info:
        store.head()
    assert str(path) in str(info.value)


def test_views_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(5, 3)).astype(np.float32)
    V = rng.normal(size=(2, 5, 3)).astype(np.float32)
    p = tmp_path / "v.h5"
    with FeatureFileWriter.create(p, counts=[3, 2]) as w:
        w.create_split("train", 5, 3, views=2)
        w.append("train", X, [0, 0, 0, 1, 1])
        assert not w.is_complete("train")
        w.append_view("train", 0, V[0])
        w.append_view("train", 1, V[1, :2])
        with pytest.raises(ValueError, match="not all rows"):
            w.mark_complete("train")
        w.append_view("train", 1, V[1, 2:])
        assert w.view_rows("train") == [5, 5]
        w.mark_complete("train")
    store = FeatureStore(p)
    assert store.splits["train"].views == 2
    np.testing.assert_array_equal(store.views("train").numpy(), V)
    np.testing.assert_array_equal(store.views("train", k=1).numpy(), V[:1])
    with pytest.raises(FeatureFileError, match="only 2 are stored"):
        store.views("train", k=3)


# -- validation errors ---------------------------------------------------------------------------
def test_missing_file_and_folder(tmp_path):
    expect_error(tmp_path / "nope.h5", "no such file")
    expect_error(tmp_path, "folder")


def test_not_hdf5(tmp_path):
    p = tmp_path / "feats.h5"
    p.write_text("this is not HDF5\n")
    expect_error(p, "not an HDF5 file")


def test_other_format(feature_file):
    path, _ = feature_file()
    with h5py.File(path, "r+") as f:
        f.attrs["format"] = "someone-else/features"
    expect_error(path, r"format is 'someone-else/features'.*not an lt-rebalance feature file")


def test_format_attribute_missing(feature_file):
    path, _ = feature_file()
    with h5py.File(path, "r+") as f:
        del f.attrs["format"]
    expect_error(path, "not an lt-rebalance feature file")


def test_newer_format_version(feature_file):
    path, _ = feature_file()
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    expect_error(path, rf"format_version {FORMAT_VERSION + 1} is newer .*upgrade")


def test_missing_counts(feature_file):
    path, _ = feature_file()
    with h5py.File(path, "r+") as f:
        del f["classes/counts"]
    expect_error(path, "missing /classes/counts")


@pytest.mark.parametrize("bad", [-1, 4, 99])
def test_labels_outside_range(tmp_path, bad):
    p = tmp_path / "bad_labels.h5"
    with FeatureFileWriter.create(p, counts=[5, 5, 5, 5]) as w:  # C = 4
        w.create_split("test", 3, 2)
        w.append("test", np.zeros((3, 2), np.float32), [0, 1, 3])
        w.mark_complete("test")
    with h5py.File(p, "r+") as f:  # damaged after writing (the writer refuses negative labels)
        f["splits/test/labels"][1] = bad
    expect_error(p, rf"/splits/test/labels has 1 value\(s\) outside \[0, 4\) \(e\.g\. {bad}\)")


def test_features_labels_length_mismatch(feature_file):
    path, _ = feature_file()
    with h5py.File(path, "r+") as f:
        del f["splits/test/labels"]
        f["splits/test/labels"] = np.zeros(3, np.int64)
    expect_error(path, r"/splits/test: features have 11 rows but labels have shape \(3,\).*length mismatch")


def test_incomplete_split(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(10, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=10)
    p = tmp_path / "partial.h5"
    with FeatureFileWriter.create(p, counts=[4, 3, 3]) as w:
        w.create_split("train", 10, 4, dtype="float16")
        assert w.append("train", X[:4], y[:4]) == 4
        assert w.append("train", X[4:6], y[4:6]) == 6
        assert w.rows("train") == 6
    err = expect_error(p, r"split 'train' is incomplete \(6/10 rows written\).*allow-incomplete")
    assert isinstance(err, ValueError)
    store = FeatureStore(p, allow_incomplete=True)
    assert store.splits["train"].rows == 6 and not store.splits["train"].complete
    Xr, yr = store.load("train")
    assert Xr.shape == (6, 4) and yr.shape == (6,)
    np.testing.assert_array_equal(Xr.numpy(), X[:6].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(yr.numpy(), y[:6])


def test_all_rows_written_but_not_marked_complete_is_incomplete(tmp_path):
    p = tmp_path / "unmarked.h5"
    with FeatureFileWriter.create(p, counts=[1, 1]) as w:
        w.create_split("val", 2, 3)
        w.append("val", np.ones((2, 3)), [0, 1])
    expect_error(p, r"incomplete \(2/2 rows")


def test_head_shape_mismatch(tmp_path, feature_file):
    # D mismatch: set_head only knows C, the store checks C x D
    p = tmp_path / "head_d.h5"
    with FeatureFileWriter.create(p, counts=[2, 2]) as w:
        w.set_head(np.zeros((2, 7), np.float32))
        w.create_split("train", 4, 3)
        w.append("train", np.zeros((4, 3)), [0, 0, 1, 1])
        w.mark_complete("train")
    expect_error(p, r"/head/weight has shape \(2, 7\), expected \(C, D\) = \(2, 3\)")
    # C mismatch, written behind the writer's back
    path, _ = feature_file()
    with h5py.File(path, "r+") as f:
        del f["head/weight"]
        f["head/weight"] = np.zeros((5, 5), np.float32)
    expect_error(path, r"/head/weight has shape \(5, 5\), expected \(C, D\) = \(4, 5\)")


def test_bias_shape_mismatch(feature_file):
    path, _ = feature_file()
    with h5py.File(path, "r+") as f:
        del f["head/bias"]
        f["head/bias"] = np.zeros(3, np.float32)
    expect_error(path, r"/head/bias has shape \(3,\)")


def test_unknown_split(feature_file):
    path, _ = feature_file()
    store = FeatureStore(path)
    for call in (store.load, store.features, store.labels, store.paths):
        with pytest.raises(FeatureFileError, match=r"no split 'val'; available: test, train") as info:
            call("val")
        assert str(path) in str(info.value)


def test_feature_file_error_is_value_error_with_fields(tmp_path):
    p = tmp_path / "x.h5"
    p.write_bytes(b"\x00" * 64)
    err = expect_error(p, "not an HDF5")
    assert isinstance(err, ValueError)
    assert err.path == str(p) and "HDF5" in err.problem


# -- writing -------------------------------------------------------------------------------------
def test_write_features_is_atomic_and_refuses_overwrite(tmp_path):
    X = np.ones((3, 2), np.float32)
    p = tmp_path / "out.h5"
    write_features(p, {"train": (X, [0, 1, 1])})
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.h5"]  # no temporary file left
    with pytest.raises(FileExistsError, match="overwrite"):
        write_features(p, {"train": (2 * X, [0, 1, 1])})
    np.testing.assert_array_equal(FeatureStore(p).features("train").numpy(), X)  # untouched
    write_features(p, {"train": (2 * X, [1, 1, 0])}, overwrite=True)
    np.testing.assert_array_equal(FeatureStore(p).features("train").numpy(), 2 * X)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.h5"]


def test_failed_write_leaves_nothing_behind(tmp_path):
    X = np.ones((3, 2), np.float32)
    p = tmp_path / "out.h5"
    # a label outside [0, C) is caught by the validation before the file is published
    with pytest.raises(FeatureFileError, match="outside") as info:
        write_features(p, {"test": (X, [0, 1, 5])}, counts=[3, 3])
    assert str(info.value).startswith(f"{p}: ")  # names the requested file, not the temporary one
    assert list(tmp_path.iterdir()) == []
    # a bad shape fails while writing
    with pytest.raises(ValueError, match="2-D"):
        write_features(p, {"train": (np.ones(3), [0, 1, 1])})
    assert list(tmp_path.iterdir()) == []
    # a failed overwrite keeps the old file
    write_features(p, {"train": (X, [0, 1, 1])})
    with pytest.raises(FeatureFileError):
        write_features(p, {"test": (X, [0, 1, 5])}, counts=[3, 3], overwrite=True)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.h5"]
    np.testing.assert_array_equal(FeatureStore(p).labels("train").numpy(), [0, 1, 1])


def test_write_features_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_features(tmp_path / "no" / "f.h5", {"train": (np.ones((2, 2)), [0, 1])})


def test_incremental_writer(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(7, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2, 0])
    p = tmp_path / "inc.h5"
    w = FeatureFileWriter.create(p, counts=[3, 2, 2], model="m", transform={"resize": 256})
    w.set_head(np.ones((3, 3)), np.zeros(3))
    w.create_split("train", 7, 3, with_paths=True)
    assert w.rows("train") == 0 and not w.is_complete("train")
    assert w.append("train", X[:3], y[:3], paths=["a", "b", "c"]) == 3
    w.close()
    with pytest.raises(FileExistsError):
        FeatureFileWriter.create(p, counts=[1])  # never clobbers an existing file
    # resume
    with FeatureFileWriter.open_existing(p) as w:
        assert w.rows("train") == 3
        with pytest.raises(ValueError, match="not all rows"):
            w.mark_complete("train")
        with pytest.raises(ValueError, match="room for 7 rows"):
            w.append("train", np.zeros((5, 3)), np.zeros(5))
        with pytest.raises(ValueError, match="labels"):
            w.append("train", X[3:], y[3:5])
        assert w.rows("train") == 3  # failed appends write nothing
        assert w.append("train", X[3:], torch.from_numpy(y[3:]), paths=list("defg")) == 7
        w.mark_complete("train")
        assert w.is_complete("train")
    store = FeatureStore(p)
    np.testing.assert_array_equal(store.features("train").numpy(), X)
    np.testing.assert_array_equal(store.labels("train").numpy(), y)
    assert store.paths("train") == list("abcdefg")
    assert json.loads(store.attrs["transform"]) == {"resize": 256}


def test_writer_argument_errors(tmp_path):
    with FeatureFileWriter.create(tmp_path / "w.h5", counts=[2, 2]) as w:
        with pytest.raises(ValueError, match="dtype"):
            w.create_split("train", 2, 2, dtype="float64")
        with pytest.raises(ValueError, match=r"shape \(C=2, D\)"):
            w.set_head(np.zeros((3, 2)))
        with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
            w.set_head(np.zeros((2, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="non-empty"):
        FeatureFileWriter.create(tmp_path / "z.h5", counts=[])

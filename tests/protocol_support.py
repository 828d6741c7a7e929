"""The protocol tests' helpers (not a test module): LADE's notebook reference for shifted test sets and the
small feature files of the ``--test-priors`` / ``ltr report`` tests."""
import numpy as np
import pytest

from lt_rebalance.store import write_features


def notebook_shift_counts(train_counts, M, name):
    """LADE's notebook ``class_distribution``: argsort of the train prior reversed, then the power law."""
    C = len(train_counts)
    cls_idx = np.argsort(train_counts, kind="stable")[::-1]
    if name == "uniform":
        return np.full(C, M)
    direction, R = name.split("-")
    out = np.zeros(C, dtype=np.int64)
    for idx, cls in enumerate(cls_idx):
        e = (C - 1 - idx) / (C - 1.0) if direction == "backward" else idx / (C - 1.0)
        out[cls] = M * ((1 / float(R)) ** e)
    return out


def notebook_mask(labels, keep):
    keep, mask = np.array(keep), np.zeros(len(labels), dtype=bool)
    for i, label in enumerate(labels):
        if keep[label] > 0:
            keep[label] -= 1
            mask[i] = True
    return mask


C, D = 6, 8
COUNTS = np.array([120, 80, 40, 25, 12, 6])


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(C, D)) * 1.5

    def draw(per_class):
        y = np.repeat(np.arange(C), per_class)
        p = rng.permutation(len(y))
        return (means[y] + rng.normal(size=(len(y), D)))[p].astype(np.float32), y[p]

    a = {}
    for split, n in (("train", COUNTS), ("val", np.full(C, 6)), ("test", np.array([12, 11, 10, 10, 9, 9]))):
        a[f"x_{split}"], a[f"y_{split}"] = draw(n)
    a["weight"] = (means * (0.5 + COUNTS[:, None] / 100)).astype(np.float32)
    a["bias"] = (0.1 * np.log(COUNTS)).astype(np.float32)
    return a


@pytest.fixture(scope="module")
def protocol_files(tmp_path_factory):
    """Files a, b (two seeds) and other (one more train row): ({name: path}, the arrays of a).

    Test modules import it as ``files``.
    """
    root = tmp_path_factory.mktemp("protocol_files")
    a, b = _arrays(0), _arrays(1)
    paths = {"a": root / "a.h5", "b": root / "b.h5", "other": root / "other.h5"}
    for name, arr in (("a", a), ("b", b)):
        write_features(paths[name], {s: (arr[f"x_{s}"], arr[f"y_{s}"]) for s in ("train", "val", "test")},
                       weight=arr["weight"], bias=arr["bias"])
    y_other = np.concatenate([a["y_train"], [0]])  # one more train row of class 0
    x_other = np.concatenate([a["x_train"], a["x_train"][:1]])
    write_features(paths["other"], {"train": (x_other, y_other), "val": (a["x_val"], a["y_val"]),
                                    "test": (a["x_test"], a["y_test"])}, weight=a["weight"], bias=a["bias"])
    return {k: str(v) for k, v in paths.items()}, a

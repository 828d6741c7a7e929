"""Shared fixtures of every test folder. Tests run offline: no hub downloads.

Plain helpers (data makers, CLI runners, numpy references) live in the helper modules next to this file
(data_support.py, cli_support.py, head_refs.py, protocol_support.py), which every test folder can import.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from cli_support import COUNTS, D, _splits, make_arrays  # noqa: E402
from data_support import make_cifar, make_image_folder, make_long_tailed  # noqa: E402

from lt_rebalance.store import FeatureFileWriter, write_features  # noqa: E402


# -- extraction fixtures (tests/extract/) ------------------------------------------------------------
@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A read-only ImageFolder tree: 3 classes, 21 train / 6 val / 9 test PNGs."""
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory):
    """Fabricated cifar-10-batches-py/: 50 train images per class, 4 test per class."""
    return make_cifar(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory):
    """Fabricated cifar-100-python/: 30 train images per class, 2 test per class."""
    return make_cifar(tmp_path_factory.mktemp("cifar100"), num_classes=100, per_class=30, test_per_class=2)


# -- core-library fixtures (tests/test_{store,metrics,samplers}.py, tests/heads/) --------------------
@pytest.fixture(scope="session")
def lt_data():
    """Factory: ``lt_data(**kwargs)`` -> dict of synthetic long-tailed splits (see make_long_tailed)."""
    return make_long_tailed


@pytest.fixture
def feature_file(tmp_path):
    """Factory writing a small valid feature file into tmp_path; returns (path, arrays).

    ``feature_file(name="feats.h5", dtype="float32", head=True, bias=True, C=4, D=5, seed=0)``
    """
    from lt_rebalance.store import write_features

    def make(name="feats.h5", *, dtype="float32", head=True, bias=True, C=4, D=5, seed=0, **kwargs):
        rng = np.random.default_rng(seed)
        y_tr = np.concatenate([np.arange(C), rng.integers(0, C, size=20)])
        y_te = rng.integers(0, C, size=11)
        arrays = dict(
            X_train=rng.normal(size=(len(y_tr), D)).astype(np.float32), y_train=y_tr,
            X_test=rng.normal(size=(len(y_te), D)).astype(np.float32), y_test=y_te,
            W=rng.normal(size=(C, D)).astype(np.float32), b=rng.normal(size=C).astype(np.float32),
        )
        path = tmp_path / name
        write_features(
            path,
            {"train": (arrays["X_train"], y_tr), "test": (arrays["X_test"], y_te)},
            weight=arrays["W"] if head else None,
            bias=arrays["b"] if (head and bias) else None,
            dtype=dtype,
            **kwargs,
        )
        return path, arrays

    return make


@pytest.fixture(scope="module")
def torch_one_thread():
    """Run a module's tiny tensor ops on one intra-op thread (far faster on a busy 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the feature files of the command-line tests (tests/suites/test_cli.py and others) ------------
@pytest.fixture(scope="session")
def arrays():
    return make_arrays()


@pytest.fixture(scope="session")
def files(tmp_path_factory, arrays):
    """Absolute paths of read-only feature files shared by the tests."""
    root = tmp_path_factory.mktemp("cli_features")
    a = arrays
    paths = {name: root / f"{name}.h5" for name in ("full", "nohead", "noval", "notrain", "views", "incomplete")}
    write_features(paths["full"], _splits(a), weight=a["weight"], bias=a["bias"], model="toy", dataset="synthetic")
    write_features(paths["nohead"], _splits(a))
    write_features(paths["noval"], _splits(a, ("train", "test")), weight=a["weight"], bias=a["bias"])
    write_features(paths["notrain"], _splits(a, ("val", "test")), counts=COUNTS, weight=a["weight"])
    # two stored augmented train views (small noise around the train features)
    rng = np.random.default_rng(1)
    with FeatureFileWriter.create(paths["views"], counts=COUNTS) as w:
        w.set_head(a["weight"], a["bias"])
        for split in ("train", "val", "test"):
            x, y = a[f"x_{split}"], a[f"y_{split}"]
            k = 2 if split == "train" else 0
            w.create_split(split, len(x), D, views=k)
            w.append(split, x, y)
            for v in range(k):
                w.append_view(split, v, x + 0.1 * rng.normal(size=x.shape).astype(np.float32))
            w.mark_complete(split)
    # a test split whose extraction stopped half way
    with FeatureFileWriter.create(paths["incomplete"], counts=COUNTS) as w:
        w.set_head(a["weight"], a["bias"])
        for split in ("train", "val", "test"):
            x, y = a[f"x_{split}"], a[f"y_{split}"]
            w.create_split(split, len(x), D)
            if split == "test":
                w.append(split, x[:40], y[:40])
            else:
                w.append(split, x, y)
                w.mark_complete(split)
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory, files):
    """Files that are not usable feature files, each for its own reason."""
    root = tmp_path_factory.mktemp("cli_bad")
    out = {"missing": str(root / "missing.h5")}
    (root / "text.h5").write_text("not an hdf5 file\n")
    out["not_hdf5"] = str(root / "text.h5")
    with h5py.File(root / "other.h5", "w") as f:
        f.attrs["format"] = "someone-else/format"
        f.create_dataset("x", data=np.zeros(3))
    out["wrong_format"] = str(root / "other.h5")
    with h5py.File(root / "nocounts.h5", "w") as f:
        f.attrs["format"] = "lt-rebalance/features"
        f.attrs["format_version"] = 1
        f.create_group("splits")
    out["no_counts"] = str(root / "nocounts.h5")
    with h5py.File(root / "future.h5", "w") as f:
        f.attrs["format"] = "lt-rebalance/features"
        f.attrs["format_version"] = 99
    out["future_version"] = str(root / "future.h5")
    data = open(files["full"], "rb").read()
    (root / "truncated.h5").write_bytes(data[: len(data) // 3])
    out["truncated"] = str(root / "truncated.h5")
    return out

"""List files, CIFAR-LT selection, ImageFolder, transforms."""
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from lt_rebalance.extract.datasets import DatasetOptions, load_dataset, read_list_file, reference_config
from lt_rebalance.extract.datasets.cifar import lt_indices

from lt_rebalance.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SPLITS = Path(__file__).resolve().parents[3] / "shared" / "data" / "splits"
needs_splits = pytest.mark.skipif(not SPLITS.is_dir(), reason="shared/data/splits not present")


def _ldam_reference(labels, imbalance):
    """LDAM-DRW's IMBALANCECIFAR gen_imbalanced_data, written out independently (global np.random)."""
    cls_num = len(np.unique(labels))
    img_max = len(labels) / cls_num
    per_cls = [int(img_max * (1 / imbalance) ** (i / (cls_num - 1.0))) for i in range(cls_num)]
    np.random.seed(0)
    keep = []
    for c, n in zip(np.unique(labels), per_cls):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        keep.extend(idx[:n].tolist())
    return np.array(keep)


@pytest.mark.parametrize("num_classes,expected", [(10, 12406), (100, 10847)])
def test_cifar_lt_if100_sizes_from_real_label_arrays(num_classes, expected):
    labels = np.random.default_rng(5).permutation(np.repeat(np.arange(num_classes), 50000 // num_classes))
    keep = lt_indices(labels, 100)
    assert len(keep) == expected
    np.testing.assert_array_equal(keep, _ldam_reference(labels, 100))


def _load_pickles(base, files, key):
    data, labels = [], []
    for f in files:
        with open(base / f, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        data.append(d[b"data"])
        labels += d[key]
    return np.concatenate(data), np.array(labels)


def test_cifar10_lt_from_pickles(cifar10_root):
    ds = load_dataset("cifar10_lt", DatasetOptions(str(cifar10_root), imbalance=10, val_per_class=5, seed=3))
    data, labels = _load_pickles(cifar10_root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                                 b"labels")
    keep = _ldam_reference(labels, 10)
    train = ds.sources["train"]
    np.testing.assert_array_equal(train.labels, labels[keep])
    np.testing.assert_array_equal(ds.counts, np.bincount(labels[keep], minlength=10))
    # images: official row-major CHW -> HWC
    np.testing.assert_array_equal(np.asarray(train.load(7)), data[keep[7]].reshape(3, 32, 32).transpose(1, 2, 0))
    assert ds.class_names[:2] == ["class0", "class1"]
    # val: drawn from unused train images only, at most 5 per class; class 0 keeps all its images
    ids = lambda src: {int(a[0, 0, 0]) + 256 * int(a[0, 0, 1]) for a in src.images}  # noqa: E731
    assert not ids(ds.sources["val"]) & ids(train)
    val_counts = np.bincount(ds.sources["val"].labels, minlength=10)
    assert val_counts[0] == 0 and (val_counts[1:] == 5).all()
    assert ds.notes and "class(es) [0]" in ds.notes[0]
    assert len(ds.sources["test"]) == 40
    again = load_dataset("cifar10_lt", DatasetOptions(str(cifar10_root), imbalance=10, val_per_class=5, seed=3))
    np.testing.assert_array_equal(again.sources["val"].images, ds.sources["val"].images)


def test_cifar100_lt_from_pickles(cifar100_root):
    ds = load_dataset("cifar100_lt", DatasetOptions(str(cifar100_root), splits=("train", "test"), imbalance=10))
    _, labels = _load_pickles(cifar100_root / "cifar-100-python", ["train"], b"fine_labels")
    np.testing.assert_array_equal(ds.sources["train"].labels, labels[_ldam_reference(labels, 10)])
    assert list(ds.sources) == ["train", "test"] and len(ds.sources["test"]) == 200


def test_cifar_transform_keeps_32():
    cfg = reference_config("cifar")
    assert (cfg.size, cfg.resize) == (32, None)
    assert reference_config("imagenet") .resize == 256 and reference_config("inat").mean[0] == 0.466


def test_list_file_errors_name_file_and_line(tmp_path):
    p = tmp_path / "l.txt"
    p.write_text("a/b.jpg 0\n\na/c.jpg 1\nbroken-line\n")
    with pytest.raises(ValueError, match=r"l\.txt:4: expected"):
        read_list_file(p)
    p.write_text("a/b.jpg 0\na/c.jpg 7\n")
    with pytest.raises(ValueError, match=r"l\.txt:2: label 7 outside \[0, 5\)"):
        read_list_file(p, num_classes=5)


@needs_splits
@pytest.mark.parametrize("name,rows,classes,per_class", [
    ("ImageNet_LT_val.txt", 20000, 1000, 20), ("ImageNet_LT_test.txt", 50000, 1000, 50),
    ("Places_LT_val.txt", 7300, 365, 20), ("Places_LT_test.txt", 36500, 365, 100),
    ("iNaturalist18_val.txt", 24426, 8142, 3),
])
def test_real_list_files(name, rows, classes, per_class):
    paths, labels = read_list_file(SPLITS / name, num_classes=classes)
    assert len(paths) == rows and (np.bincount(labels, minlength=classes) == per_class).all()


@needs_splits
def test_places_lt_train_counts():
    _, labels = read_list_file(SPLITS / "Places_LT_train.txt", num_classes=365)
    counts = np.bincount(labels, minlength=365)
    assert len(labels) == 62500 and counts.max() == 4980 and counts.min() == 5


@needs_splits
def test_list_dataset_reports_missing_images_up_front(tmp_path):
    root = tmp_path / "places"
    root.mkdir()
    res = CliRunner().invoke(main, ["extract", "--model", "resnet10", "--random-init", "--data", "places_lt",
                                    "--root", str(root), "--list-dir", str(SPLITS), "--splits", "val",
                                    "--out", str(tmp_path / "p.h5")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "7300 image file(s) missing" in res.output and "train/airfield/00002049.jpg" in res.output


def test_list_dataset_errors(tmp_path):
    (tmp_path / "ImageNet_LT_val.txt").write_text("train/x.jpg 0\n")
    base = ["extract", "--model", "resnet10", "--random-init", "--data", "imagenet_lt", "--root", str(tmp_path),
            "--out", str(tmp_path / "o.h5")]
    res = CliRunner().invoke(main, base)
    assert res.exit_code == 1 and "needs --list-dir" in res.output
    res = CliRunner().invoke(main, [*base, "--list-dir", str(tmp_path), "--splits", "val"])
    assert res.exit_code == 1 and "ImageNet_LT_train.txt" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, [*base[:5], "inat2018", *base[6:], "--list-dir", str(tmp_path), "--splits", "test"])
    assert res.exit_code == 1 and "no split(s) ['test']" in res.output


def test_imagefolder_classes_sorted_and_unknown_class(image_folder, tmp_path):
    ds = load_dataset("imagefolder", DatasetOptions(str(image_folder)))
    assert ds.class_names == ["c0", "c1", "c2"] and ds.counts.tolist() == [12, 6, 3]
    assert ds.sources["val"].paths[0] == "val/c0/000.png" and ds.sources["test"].labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    root = tmp_path / "f"
    shutil.copytree(image_folder, root)
    shutil.copytree(root / "test" / "c2", root / "test" / "zebra")
    with pytest.raises(ValueError, match="zebra"):
        load_dataset("imagefolder", DatasetOptions(str(root)))

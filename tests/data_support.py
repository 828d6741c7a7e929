"""Synthetic data shared by the tests of every folder (not a test module): image trees, CIFAR pickles,
long-tailed Gaussian splits and the arguments of a tiny ``ltr extract``."""
import pickle

import numpy as np


def make_image_folder(root, counts=None, seed=0):
    """``root/{train,val,test}/c<k>/<i>.png`` with random RGB images of a few small sizes."""
    from PIL import Image

    counts = counts or {"train": (12, 6, 3), "val": (2, 2, 2), "test": (3, 3, 3)}
    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        for c, n in enumerate(per_class):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = rng.integers(36, 56, size=2)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return root


def make_cifar(root, num_classes=10, per_class=50, test_per_class=4, seed=0):
    """Official python-pickle layout with fabricated data; image k's first pixel bytes encode k."""
    rng = np.random.default_rng(seed)

    def batch(n, label_key):
        labels = rng.permutation(np.repeat(np.arange(num_classes), n // num_classes))
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, 0], data[:, 1] = np.arange(n) % 256, np.arange(n) // 256  # unique per image
        return {b"data": data, label_key: labels.tolist()}

    def dump(obj, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    names = [f"class{i}".encode() for i in range(num_classes)]
    n_train = num_classes * per_class
    if num_classes == 10:
        base = root / "cifar-10-batches-py"
        train = batch(n_train, b"labels")
        for i in range(5):  # five batches in order
            sl = slice(i * n_train // 5, (i + 1) * n_train // 5)
            dump({b"data": train[b"data"][sl], b"labels": train[b"labels"][sl]}, base / f"data_batch_{i + 1}")
        dump(batch(num_classes * test_per_class, b"labels"), base / "test_batch")
        dump({b"label_names": names}, base / "batches.meta")
    else:
        base = root / "cifar-100-python"
        dump(batch(n_train, b"fine_labels"), base / "train")
        dump(batch(num_classes * test_per_class, b"fine_labels"), base / "test")
        dump({b"fine_label_names": names}, base / "meta")
    return root


def long_tailed_counts(num_classes: int, n_max: int, imbalance: float) -> np.ndarray:
    """n_i = int(n_max * (1/IF) ** (i / (C - 1))), the CIFAR-LT convention (docs/EXTRACT.md)."""
    i = np.arange(num_classes)
    return (n_max * (1.0 / imbalance) ** (i / (num_classes - 1))).astype(np.int64)


def make_long_tailed(
    num_classes: int = 10,
    n_max: int = 300,
    imbalance: float = 60.0,
    dim: int = 16,
    sep: float = 3.0,
    noise: float = 1.0,
    n_eval_per_class: int = 30,
    seed: int = 0,
) -> dict:
    """Gaussian classes with long-tailed train counts and balanced val/test splits (float32)."""
    rng = np.random.default_rng(seed)
    counts = long_tailed_counts(num_classes, n_max, imbalance)
    means = rng.normal(size=(num_classes, dim))
    means *= sep / np.linalg.norm(means, axis=1, keepdims=True)

    def draw(per_class):
        y = np.repeat(np.arange(num_classes), per_class)
        X = means[y] + noise * rng.normal(size=(len(y), dim))
        perm = rng.permutation(len(y))
        return X[perm].astype(np.float32), y[perm].astype(np.int64)

    X_train, y_train = draw(counts)
    X_val, y_val = draw(np.full(num_classes, n_eval_per_class))
    X_test, y_test = draw(np.full(num_classes, n_eval_per_class))
    return dict(
        counts=counts, means=means, X_train=X_train, y_train=y_train,
        X_val=X_val, y_val=y_val, X_test=X_test, y_test=y_test,
    )


def imagefolder_extract_args(root, out, *extra):
    """``ltr extract`` arguments: a random-init tiny_cnn on the ImageFolder ``root`` (train, val), 8 px."""
    return ["--model", "tiny_cnn", "--random-init", "--data", "imagefolder", "--root", str(root), "--out", str(out),
            "--splits", "train,val", "--image-size", "8", "--batch-size", "2", "--workers", "0", "--quiet", *extra]

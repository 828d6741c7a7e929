"""The bad-input battery (issue 9): one table of user mistakes across every ``ltr`` command.

Each case builds its own folder, runs one command through ``CliRunner`` and asserts:

* exit status 1 (2 for usage errors);
* exactly one line starting with ``Error:`` that names the problem and the fix (``ltr check`` reports
  instead: exactly one ``[FAIL]`` line naming the problem, exit 1);
* no traceback, no exception other than ``SystemExit``;
* no file created or changed in the case's folder (names, sizes, mtimes and content hashes), except
  the one documented ``OUT.partial`` an extraction keeps for ``--resume`` when it meets a corrupt image.

docs/BAD_INPUTS.md lists the battery as a table; keep the two in step.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from lt_rebalance.cli import main
from lt_rebalance.integrity import record_checksums
from lt_rebalance.store import FeatureFileWriter, write_features

pytestmark = pytest.mark.usefixtures("torch_one_thread")

C, D = 4, 6
COUNTS = np.array([40, 20, 8, 3])


# -- inputs ----------------------------------------------------------------------------------------
def _arrays(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    means = 3 * rng.normal(size=(C, D))
    out = {}
    for split, per_class in (("train", COUNTS), ("val", 4), ("test", 5)):
        y = np.repeat(np.arange(C), per_class)
        out[split] = ((means[y] + rng.normal(size=(len(y), D))).astype(np.float32), y)
    out["weight"] = means.astype(np.float32)
    out["bias"] = np.zeros(C, np.float32)
    return out


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A valid feature file (train/val/test, stored head); cases copy it into their folder."""
    a = _arrays()
    path = tmp_path_factory.mktemp("battery_src") / "good.h5"
    write_features(path, {s: a[s] for s in ("train", "val", "test")}, weight=a["weight"], bias=a["bias"])
    return path


def _copy(good: Path, d: Path, name: str = "f.h5") -> Path:
    dst = d / name
    shutil.copyfile(good, dst)
    return dst


def _edit(good: Path, d: Path, fn: Callable[[h5py.File], None], reseal: bool = True) -> str:
    """A copy of ``good`` changed by ``fn``; ``reseal`` records the checksums again, as if a writer had
    written it so (the case then tests its own problem alone; without: a damaged file)."""
    path = _copy(good, d)
    with h5py.File(path, "r+") as f:
        fn(f)
        if reseal:
            record_checksums(f)
    return str(path)


def _set(path: str, value) -> Callable[[h5py.File], None]:
    return lambda f: f[path].__setitem__((1, 2), value)


def _replace(key: str, shape: tuple, dtype="float32") -> Callable[[h5py.File], None]:
    def fn(f):
        del f[key]
        f.create_dataset(key, data=np.zeros(shape, dtype=dtype))
    return fn


def _bump_count(f: h5py.File) -> None:
    """One more train image of class 0 in the counts (a file of other train counts)."""
    counts = f["classes/counts"][...]
    counts[0] += 1
    f["classes/counts"][...] = counts


def _incomplete(d: Path) -> str:
    a = _arrays()
    path = d / "f.h5"
    with FeatureFileWriter.create(path, counts=COUNTS) as w:
        w.set_head(a["weight"], a["bias"])
        for s in ("train", "val", "test"):
            x, y = a[s]
            w.create_split(s, len(x), D)
            w.append(s, x[: len(x) // 2], y[: len(x) // 2])  # stopped half way
            if s != "test":
                w.append(s, x[len(x) // 2:], y[len(x) // 2:])
                w.mark_complete(s)
    return str(path)


def _tiny_images(root: Path, counts=(3, 2), splits=("train", "val")) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for c, n in enumerate(counts):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _tiny_cifar(root: Path, drop: str) -> Path:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        if name != drop:
            batch = {b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), b"labels": list(range(10)) * 2}
            (base / name).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root


def _list_dataset(d: Path, bad_line: bool) -> list[str]:
    """imagenet_lt layout with two images; ``bad_line`` breaks line 2 of the train list, else an image is absent."""
    lists = d / "lists"
    lists.mkdir()
    root = _tiny_images(d / "data", counts=(1, 1), splits=("train",))
    train = ["train/c0/0.png 0", "train/c1/0.png" if bad_line else "train/c1/0.png 1"]
    if not bad_line:
        train.append("train/c1/absent.png 1")
    (lists / "ImageNet_LT_train.txt").write_text("\n".join(train) + "\n")
    (lists / "ImageNet_LT_val.txt").write_text("train/c0/0.png 0\n")
    return ["--data", "imagenet_lt", "--root", str(root), "--list-dir", str(lists), "--splits", "train,val"]


def _extract_args(d: Path, *extra: str, model: str = "tiny_cnn", data: list[str] | None = None,
                  out: str = "f.h5") -> list[str]:
    data = data if data is not None else ["--data", "imagefolder", "--root", str(_tiny_images(d / "data"))]
    weights = [] if any(a in ("--checkpoint", "--pretrained") for a in extra) else ["--random-init"]
    return ["extract", "--model", model, *weights, *data, "--out", str(d / out), "--splits", "train,val",
            "--image-size", "8", "--batch-size", "2", "--workers", "0", "--quiet", *extra]


def _checkpoint(d: Path, fix: Callable[[dict], None]) -> str:
    import torch
    from lt_rebalance.extract.backbones import create_backbone

    sd = create_backbone("tiny_cnn", num_classes=2).state_dict()
    fix(sd)
    path = d / "model.pth"
    torch.save(sd, path)
    return str(path)


def _npz(d: Path, value: float | None = None, y: np.ndarray | None = None) -> str:
    """x_train/y_train of the battery's arrays; ``value`` replaces x_train[2, 1]; ``y`` the labels (x cut to fit)."""
    a = _arrays()
    x, labels = a["train"] if y is None else (a["train"][0][: len(y)], y)
    x = x.copy()
    if value is not None:
        x[2, 1] = value
    path = d / "arrays.npz"
    np.savez(path, x_train=x, y_train=labels)
    return str(path)


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def _symlink(target: Path, link: Path) -> str:
    link.symlink_to(target.name)
    return str(link)


def _hardlink(target: Path, link: Path) -> str:
    os.link(target, link)
    return str(link)


_LOCKS: list[int] = []  # descriptors holding HDF5-style locks, closed after each case


def _locked(path: str) -> str:
    """Hold the lock that h5py takes when it opens ``path`` for writing (flock, exclusive)."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _LOCKS.append(fd)
    return path


def _with_views(good: Path, d: Path) -> str:
    """The good file with one augmented train view, one value of it NaN."""
    def fn(f):
        x = f["splits/train/features"][...]
        v = f["splits/train"].create_dataset("views", data=x[None])
        v[0, 5, 1] = np.nan
    return _edit(good, d, fn)


def _demo_with_user_image(d: Path) -> str:
    """A folder of an earlier demo run (its manifest lists images/train/0/0001.png) plus a user's image."""
    import json

    from lt_rebalance.commands.demo_pipeline import MANIFEST, MANIFEST_FORMAT

    pytest.importorskip("sklearn")
    out = d / "out"
    (out / "images" / "train" / "0").mkdir(parents=True)
    (out / "images" / "train" / "0" / "0001.png").write_text("demo")
    (out / "images" / "train" / "0" / "mine.png").write_text("mine")
    (out / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": ["images/train/0/0001.png"]}))
    return str(out)


def _no_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")


def _cuda(d, good):
    _no_gpu()
    return ["crt", "-f", _copy(good, d), "--device", "cuda", "--epochs", "1"]


def _unreadable(d, good):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading the file")
    path = _copy(good, d)
    os.chmod(path, 0)
    return ["joint", "-f", str(path)]


# -- the table -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Path, Path], list[str]]  # (case folder, good feature file) -> argv
    code: int  # expected exit status
    needles: tuple[str, ...]  # substrings of the Error line: the problem, then the fix
    report: bool = False  # ltr check: one [FAIL] line instead of an Error line
    may_create: tuple[str, ...] = field(default=())  # names a failed run may leave on purpose


CASES = [
    # -- feature files -----------------------------------------------------------------------------
    Case("missing-file", lambda d, g: ["info", str(d / "nope.h5")], 1, ("no such file", "ltr extract")),
    Case("unreadable-file", _unreadable, 1, ("cannot be read", "check the file's permissions")),
    Case("empty-file", lambda d, g: ["ncm", "-f", str(_touch(d / "f.h5"))], 1, ("not an HDF5 file", "ltr import")),
    Case("not-hdf5", lambda d, g: ["joint", "-f", _text(d / "f.h5")], 1, ("not an HDF5 file", "ltr extract")),
    Case("truncated-file", lambda d, g: ["tau-sweep", "-f", _truncated(g, d)], 1,
         ("damaged or truncated", "ltr extract")),
    Case("wrong-format", lambda d, g: ["lws", "-f", _edit(g, d, lambda f: f.attrs.__setitem__("format", "x/y"))],
         1, ("format is 'x/y'", "not an lt-rebalance feature file")),
    Case("newer-format-version",
         lambda d, g: ["compare", "-f", _edit(g, d, lambda f: f.attrs.__setitem__("format_version", 7))],
         1, ("format_version 7 is newer", "upgrade lt-rebalance")),
    Case("labels-out-of-range", lambda d, g: ["ncm", "-f", _edit(g, d, lambda f: f["splits/test/labels"]
                                                                 .__setitem__(0, C + 3))],
         1, ("outside [0, 4)", "re-create it with `ltr extract`")),
    Case("nan-features", lambda d, g: ["ncm", "-f", _edit(g, d, _set("splits/test/features", np.nan))], 1,
         ("1 feature row(s) with NaN values", "ltr check")),
    Case("inf-features", lambda d, g: ["joint", "-f", _edit(g, d, _set("splits/val/features", np.inf))], 1,
         ("1 feature row(s) with Inf values", "ltr check")),
    Case("nan-train-features", lambda d, g: ["crt", "-f", _edit(g, d, _set("splits/train/features", np.nan)),
                                             "--epochs", "1", "--batch-size", "8"], 1,
         ("split 'train' has 1 feature row(s) with NaN values", "ltr check")),
    Case("check-nan-features", lambda d, g: ["check", _edit(g, d, _set("splits/test/features", np.nan))], 1,
         ("test: features finite", "1 rows with NaN/Inf"), report=True),
    Case("length-mismatch", lambda d, g: ["joint", "-f", _edit(g, d, _replace("splits/test/labels", (3,), "int64"))],
         1, ("length mismatch", "ltr extract")),
    Case("incomplete-split", lambda d, g: ["joint", "-f", _incomplete(d)], 1, ("incomplete", "--allow-incomplete")),
    Case("unknown-split", lambda d, g: ["joint", "-f", _copy(g, d), "--splits", "holdout"], 1,
         ("no split 'holdout'", "available: test, train, val")),
    Case("head-wrong-shape", lambda d, g: ["tau-sweep", "-f", _edit(g, d, _replace("head/weight", (C, D + 1)))],
         1, ("/head/weight has shape (4, 7)", "ltr extract")),
    # -- damage and attributes that disagree (issue 13) -----------------------------------------------
    Case("check-flipped-feature-byte", lambda d, g: ["check", _flip(g, d, "splits/train/features")], 1,
         ("checksums", "/splits/train/features", "the file is damaged"), report=True),
    Case("check-flipped-head-byte", lambda d, g: ["check", _flip(g, d, "head/weight")], 1,
         ("checksums", "/head/weight", "the file is damaged"), report=True),
    Case("metadata-flip", lambda d, g: ["joint", "-f", _flip_signature(g, d)], 1,
         ("damaged or truncated HDF5 file", "bad local heap signature", "ltr extract")),
    Case("check-metadata-flip", lambda d, g: ["check", _flip_signature(g, d)], 1,
         ("schema", "damaged or truncated HDF5 file"), report=True),
    Case("complete-is-a-string", lambda d, g: ["joint", "-f", _edit(g, d, _attr("splits/test", "complete", "False"))],
         1, ("complete='False' is a str, expected a boolean", "ltr extract")),
    Case("rows-short-but-complete", lambda d, g: ["joint", "-f", _edit(g, d, _attr("splits/test", "rows", 10))], 1,
         ("marked complete but attribute rows=10 of 20 rows", "ltr extract")),
    Case("check-zero-width", lambda d, g: ["check", _edit(g, d, _replace("splits/test/features", (20, 0)))], 1,
         ("schema", "no feature columns (D = 0)"), report=True),
    Case("views-unwritten-rows", lambda d, g: ["crt", "-f", _edit(g, d, _half_view), "--allow-incomplete", "--views", "1",
                                               "--epochs", "1", "--batch-size", "8"], 1,
         ("view(s) [0] have fewer rows written", "ltr extract --resume")),
    Case("empty-val-tau-sweep", lambda d, g: ["tau-sweep", "-f", _edit(g, d, _empty_val)], 1,
         ("split 'val'", "has no rows", "--select-on test")),
    Case("empty-val-logit-adjust", lambda d, g: ["logit-adjust", "-f", _edit(g, d, _empty_val)], 1,
         ("split 'val'", "has no rows", "--select-on none")),
    Case("taus-beyond-float32", lambda d, g: ["tau-sweep", "-f", _copy(g, d), "--taus", "0,1000"], 1,
         ("tau = 1000 cannot be applied", "use --taus within |tau| <=")),
    Case("many-20-digits", lambda d, g: ["compare", "-f", _copy(g, d), "--many", "9" * 20], 2,
         ("--many", "not in the range")),
    Case("seed-20-digits", lambda d, g: ["crt", "-f", _copy(g, d), "--seed", "9" * 20], 2, ("--seed", "not in the range")),
    # -- options of the head commands ---------------------------------------------------------------
    Case("taus-malformed", lambda d, g: ["tau-sweep", "-f", _copy(g, d), "--taus", "0:x:3"], 2, ("--taus",)),
    Case("taus-empty", lambda d, g: ["logit-adjust", "-f", _copy(g, d), "--taus", ""], 2, ("--taus",)),
    Case("epochs-zero", lambda d, g: ["crt", "-f", _copy(g, d), "--epochs", "0"], 2, ("--epochs", "x>=1")),
    Case("epochs-negative", lambda d, g: ["lws", "-f", _copy(g, d), "--epochs", "-3"], 2, ("--epochs", "x>=1")),
    Case("calibrate-epochs-zero", lambda d, g: ["calibrate", "-f", _copy(g, d), "--method", "crt", "--epochs", "0"],
         2, ("--epochs", "0")),
    Case("batch-larger-than-train", lambda d, g: ["crt", "-f", _copy(g, d), "--epochs", "1", "--batch-size", "9999"],
         2, ("--batch-size", "larger than the 71 train rows")),
    Case("compare-batch-larger-than-train", lambda d, g: ["compare", "-f", _copy(g, d), "--methods", "joint,crt",
                                                           "--batch-size", "9999"],
         2, ("--batch-size", "larger than the 71 train rows")),
    Case("unknown-method", lambda d, g: ["compare", "-f", _copy(g, d), "--methods", "joint,taunorm"], 2,
         ("--methods", "unknown method 'taunorm'", "tau_norm")),
    Case("unknown-sampler", lambda d, g: ["crt", "-f", _copy(g, d), "--sampler", "balanced"], 2,
         ("unknown sampler 'balanced'", "use ib, cb, sqrt, pb")),
    Case("views-beyond-stored", lambda d, g: ["crt", "-f", _copy(g, d), "--epochs", "1", "--batch-size", "8", "--views", "2"], 2,
         ("--views", "stores 0 train views")),
    Case("knn-k-zero", lambda d, g: ["knn", "-f", _copy(g, d), "--k", "0"], 2, ("--k", "x>=1")),
    Case("probe-C-and-grid", lambda d, g: ["linear-probe", "-f", _copy(g, d), "--C", "1", "--C-grid", "1,2"], 2,
         ("--C or --C-grid", "not both")),
    Case("wb-batch-larger-than-train", lambda d, g: ["wb", "-f", _copy(g, d), "--batch-size", "9999"], 2,
         ("--batch-size", "larger than the 71 train rows")),
    Case("marc-without-head", lambda d, g: ["marc", "-f", _edit(g, d, lambda f: f.__delitem__("head"))], 1,
         ("no stored classifier", "ltr ncm")),
    Case("cuda-without-gpu", _cuda, 1, ("no CUDA GPU", "--device cpu")),
    Case("output-folder-missing", lambda d, g: ["compare", "-f", _copy(g, d), "--out", str(d / "no" / "r.json")], 1,
         ("does not exist", "create it first")),
    Case("save-exists", lambda d, g: ["ncm", "-f", _copy(g, d), "--save", _text(d / "ncm.pt")], 1,
         ("already exists", "--overwrite")),
    Case("calibrate-unknown-eval-split", lambda d, g: ["calibrate", "-f", _copy(g, d), "--method", "joint",
                                                       "--eval-split", "holdout"], 1, ("holdout", "available")),
    Case("plot-head-not-a-head", lambda d, g: ["plot", "norms", "-f", _copy(g, d), "--head", _text(d / "h.pt"),
                                               "--out", str(d / "n.png")], 1,
         ("not a head file", "ltr crt --save")),
    Case("plot-results-not-json", lambda d, g: ["plot", "compare", "--results", _text(d / "r.json"),
                                                "--out", str(d / "c.png")], 1, ("not a JSON results file", "ltr compare --out")),
    Case("plot-results-wrong-shape", lambda d, g: ["plot", "compare", "--results", _json(d / "r.json", {"rows": 5}),
                                                   "--out", str(d / "c.png")], 1,
         ("rows is not a list of objects", "ltr compare --out")),
    Case("plot-head-missing-keys", lambda d, g: ["plot", "norms", "-f", _copy(g, d), "--head",
                                                 _head_file(d, weight=None), "--out", str(d / "n.png")], 1,
         ("neither a weight matrix", "--save")),
    Case("plot-head-wrong-classes", lambda d, g: ["plot", "norms", "-f", _copy(g, d), "--head",
                                                  _head_file(d, C + 1), "--out", str(d / "n.png")], 1,
         ("has 5 classes x 6 dims, but", "fitted on this feature file")),
    Case("export-head-list-weights", lambda d, g: _export(d, g, weight=[[0.0] * D] * C), 1,
         ("weight is list, expected a float tensor", "--save")),
    Case("export-head-nan", lambda d, g: _export(d, g, bias=torch_full(C, float("nan"))), 1,
         ("bias has 4 NaN/Inf value(s)", "--save")),
    Case("export-head-disagrees-with-itself", lambda d, g: _export(d, g, dim=D + 1), 1,
         ("weight has shape (4, 6), but the head says C x D = (4, 7)", "--save")),
    # -- evaluation protocols (issue 14) --------------------------------------------------------------
    Case("test-priors-unknown", lambda d, g: ["joint", "-f", _copy(g, d), "--test-priors", "sideways-3"], 2,
         ("--test-priors", "forward-R")),
    Case("seeds-malformed", lambda d, g: ["lws", "-f", _copy(g, d), "--seeds", "0,x"], 2, ("--seeds", "0,1,2")),
    # -- stage-2 options of issue 23: losses, protocols, presets, outputs -----------------------------------
    Case("rho-negative", lambda d, g: ["marc", "-f", _copy(g, d), "--rho", "-0.5"], 2, ("--rho", "x>=0")),
    Case("smooth-head-one", lambda d, g: ["lws", "-f", _copy(g, d), "--loss", "las", "--smooth-head", "1"], 2,
         ("--smooth-head", "0<=x<1")),
    Case("smooth-tail-negative", lambda d, g: ["disalign", "-f", _copy(g, d), "--smooth-tail", "-0.1"], 2,
         ("--smooth-tail", "0<=x<1")),
    Case("crt-loss-grw", lambda d, g: ["crt", "-f", _copy(g, d), "--loss", "grw"], 2,
         ("--loss", "'ce', 'balanced-softmax', 'las'")),
    Case("protocol-unknown", lambda d, g: ["wb", "-f", _copy(g, d), "--protocol", "official"], 2,
         ("--protocol", "'paper', 'authors'")),
    Case("preset-unknown", lambda d, g: ["crt", "-f", _copy(g, d), "--preset", "imagenet"], 2,
         ("--preset", "choose one of imagenet_lt, places_lt, inat2018")),
    Case("preset-not-published", lambda d, g: ["disalign", "-f", _copy(g, d), "--preset", "inat2018"], 2,
         ("no published configuration of disalign for 'inat2018'", "choose one of imagenet_lt")),
    Case("preset-batch-larger-than-train", lambda d, g: ["lws", "-f", _copy(g, d), "--preset", "imagenet_lt"], 2,
         ("--preset imagenet_lt sets batch size 512, larger than the 71 train rows", "give --batch-size")),
    Case("empty-classes-unknown", lambda d, g: ["logit-adjust", "-f", _copy(g, d), "--empty-classes", "zero"], 2,
         ("--empty-classes", "'one-row', 'reference'")),
    Case("per-class-out-exists", lambda d, g: ["joint", "-f", _copy(g, d), "--per-class-out",
                                               _touch_str(d / "pc.csv")], 1, ("pc.csv already exists", "--overwrite")),
    Case("per-class-out-is-input", lambda d, g: ["ncm", "-f", str(_copy(g, d)), "--overwrite", "--per-class-out",
                                                 str(d / "f.h5")], 1, ("same file as the input", "another output")),
    Case("disalign-save", lambda d, g: ["disalign", "-f", _copy(g, d), "--save", str(d / "h.pt")], 2,
         ("No such option '--save'",)),
    Case("test-priors-without-test", lambda d, g: ["compare", "-f", _copy(g, d), "--splits", "val",
                                                   "--test-priors", "uniform", "--batch-size", "8"], 1,
         ("test split", "--splits")),
    Case("compare-other-classes", lambda d, g: ["compare", "-f", str(_copy(g, d, "a.h5")), "-f",
                                                _edit(g, d, _bump_count), "--batch-size", "8"], 1,
         ("cannot compare", "train rows", "share classes")),
    Case("compare-file-twice", lambda d, g: ["compare", "-f", str(_copy(g, d)), "-f", str(d / "f.h5")], 2,
         ("given more than once",)),
    Case("report-out-exists", lambda d, g: ["report", "-f", _copy(g, d), "--out", _text(d / "r.html")], 1,
         ("already exists", "--overwrite")),
    # -- import and demo ------------------------------------------------------------------------------
    Case("import-npz-missing", lambda d, g: ["import", "--npz", str(d / "a.npz"), "--out", str(d / "f.h5")], 1,
         ("a.npz: no such file", "numpy.savez")),
    Case("import-out-exists", lambda d, g: ["import", "--npz", _npz(d), "--out", _copy(g, d)], 1,
         ("already exists", "--overwrite")),
    Case("import-nan", lambda d, g: ["import", "--npz", _npz(d, np.nan), "--out", str(d / "f.h5")], 1,
         ("split 'train': 1 feature row(s) (rows 2) hold NaN/Inf", "fix them at their source")),
    Case("import-float16-overflow", lambda d, g: ["import", "--npz", _npz(d, 1e5), "--out", str(d / "f.h5"),
                                                  "--dtype", "float16"], 1,
         ("split 'train': 1 feature row(s) (rows 2) have values beyond float16's range", "--dtype float32")),
    Case("demo-out-exists", lambda d, g: ["demo", "--out", str(_text(d / "mine.txt", d / "out")), "--quick"], 1,
         ("exists", "--overwrite")),
    # -- extraction ----------------------------------------------------------------------------------
    Case("extract-unknown-model", lambda d, g: _extract_args(d, model="resnet_nope"), 1,
         ("unknown model 'resnet_nope'", "timm.list_models()")),
    Case("extract-ckpt-missing-keys",
         lambda d, g: _extract_args(d, "--checkpoint", _checkpoint(d, lambda sd: sd.pop("fc.bias"))), 1,
         ("missing keys (1): ['fc.bias']", "pass the --model")),
    Case("extract-ckpt-unexpected-keys",
         lambda d, g: _extract_args(d, "--checkpoint", _checkpoint(d, lambda sd: sd.__setitem__("extra.w", sd["fc.bias"]))),
         1, ("unexpected keys (1): ['extra.w']", "pass the --model")),
    Case("extract-list-bad-line", lambda d, g: _extract_args(d, data=_list_dataset(d, bad_line=True)), 1,
         ("ImageNet_LT_train.txt:2:", "'<relative/path> <integer label>'")),
    Case("extract-image-missing", lambda d, g: _extract_args(d, data=_list_dataset(d, bad_line=False)), 1,
         ("1 image file(s) missing", "--skip-bad")),
    Case("extract-corrupt-image", lambda d, g: _extract_args(d, data=_corrupt(d)), 1,
         ("unreadable image(s)", "--skip-bad"), may_create=("f.h5.partial",)),
    Case("extract-cifar-batch-missing",
         lambda d, g: _extract_args(d, data=["--data", "cifar10_lt", "--root", str(_tiny_cifar(d / "c", "data_batch_3"))]),
         1, ("data_batch_3 not found", "--root must hold")),
    Case("extract-out-folder-missing", lambda d, g: _extract_args(d, out="no/f.h5"), 1,
         ("does not exist", "create it first")),
    Case("extract-out-exists", lambda d, g: _extract_args(d, out=Path(_copy(g, d)).name), 1,
         ("already exists", "--overwrite")),
    Case("extract-partial-left", lambda d, g: _extract_args(d, out=Path(_text(d / "f.h5.partial")).name[:-8]), 1,
         ("left from an interrupted extraction", "--resume")),
    Case("extract-cuda-without-gpu", lambda d, g: _no_gpu() or _extract_args(d, "--device", "cuda"), 1,
         ("no CUDA GPU", "--device cpu")),
    Case("extract-no-weights", lambda d, g: [a for a in _extract_args(d) if a != "--random-init"], 2,
         ("--checkpoint PATH, --pretrained or --random-init",)),
    Case("extract-ckpt-empty", lambda d, g: _extract_args(d, "--checkpoint", _touch_str(d / "model.pth")), 1,
         ("model.pth: the file is empty", "give the .pth file saved by training")),
    Case("extract-ckpt-truncated",
         lambda d, g: _extract_args(d, "--checkpoint", _truncate(_checkpoint(d, lambda sd: None))), 1,
         ("cannot read checkpoint", "truncated or damaged")),
    Case("extract-negative-seed", lambda d, g: _extract_args(d, "--seed", "-1", "--train-views", "1"), 2,
         ("--seed", "-1 is not in the range")),
    # -- outputs that are inputs (issue 13): refused however spelled, with or without --overwrite ----
    Case("save-is-features", lambda d, g: ["ncm", "-f", _copy(g, d), "--save", str(d / "f.h5"), "--overwrite"], 1,
         ("f.h5 is the same file as the input", "choose another output path")),
    Case("compare-out-is-features-symlink",
         lambda d, g: ["compare", "-f", _copy(g, d), "--out", _symlink(d / "f.h5", d / "r.json"), "--overwrite"], 1,
         ("r.json is the same file as the input", "choose another output path")),
    Case("crt-save-is-features-relative",
         lambda d, g: ["crt", "-f", _copy(g, d), "--save", str(_mkdir(d / "x") / ".." / "f.h5"), "--epochs", "1"], 1,
         ("is the same file as the input", "even with --overwrite")),
    Case("export-out-is-checkpoint", lambda d, g: ["export", "--head", _text(d / "h.pt"), "-f", _copy(g, d),
                                                   "--checkpoint", _text(d / "model.pth"),
                                                   "--out", str(d / "model.pth"), "--overwrite"], 1,
         ("model.pth is the same file as the input", "choose another output path")),
    Case("export-out-is-features-hardlink",
         lambda d, g: ["export", "--head", _text(d / "h.pt"), "-f", _copy(g, d), "--checkpoint", _text(d / "m.pth"),
                       "--out", _hardlink(d / "f.h5", d / "out.pth"), "--overwrite"], 1,
         ("out.pth is the same file as the input", "choose another output path")),
    Case("import-out-is-npz", lambda d, g: ["import", "--npz", _npz(d), "--out", str(d / "arrays.npz"), "--overwrite"],
         1, ("arrays.npz is the same file as the input", "choose another output path")),
    Case("plot-out-is-results", lambda d, g: ["plot", "compare", "--results", _text(d / "r.json"),
                                              "--out", str(d / "r.json"), "--overwrite"], 1,
         ("r.json is the same file as the input", "choose another output path")),
    Case("plot-norms-out-is-head", lambda d, g: ["plot", "norms", "-f", _copy(g, d), "--head", _text(d / "h.pt"),
                                                 "--out", str(d / "h.pt"), "--overwrite"], 1,
         ("h.pt is the same file as the input", "choose another output path")),
    Case("extract-out-is-checkpoint",
         lambda d, g: _extract_args(d, "--checkpoint", _text(d / "model.pth"), "--overwrite", out="model.pth"), 1,
         ("model.pth is the same file as the input", "choose another output path")),
    Case("demo-overwrite-user-images", lambda d, g: ["demo", "--out", _demo_with_user_image(d), "--quick",
                                                     "--overwrite"], 1,
         ("holds files the demo did not write (images/train/0/mine.png)", "move them out")),
    # -- messages that name the right cause (issue 13) -------------------------------------------------
    Case("being-written", lambda d, g: ["info", _locked(str(_copy(g, d)))], 1,
         ("being written by another process", "wait until that process has finished")),
    Case("nan-head", lambda d, g: ["joint", "-f", _edit(g, d, _set("head/weight", np.nan))], 1,
         ("stored classifier has 1 class row(s) of /head/weight with NaN values", "ltr check")),
    Case("nan-head-lws", lambda d, g: ["lws", "-f", _edit(g, d, _set("head/weight", np.nan)), "--epochs", "1",
                                       "--batch-size", "8"], 1, ("/head/weight with NaN values", "ltr check")),
    Case("nan-views", lambda d, g: ["crt", "-f", _with_views(g, d), "--views", "1", "--epochs", "1",
                                    "--batch-size", "8"], 1,
         ("split 'train' has 1 row(s) of its first 1 augmented views with NaN values", "ltr check")),
    Case("import-labels-overflow", lambda d, g: ["import", "--npz", _npz(d, y=np.array([0, 1, 2**63], np.uint64)),
                                                 "--out", str(d / "f.h5")], 1,
         ("y_train must be a 1-D array of class indices >= 0", "uint64")),
]


def _touch(p: Path) -> Path:
    p.touch()
    return p


def _touch_str(p: Path) -> str:
    return str(_touch(p))


def _truncate(path: str) -> str:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return path


def _json(p: Path, doc) -> str:
    import json

    p.write_text(json.dumps(doc))
    return str(p)


def _flip(good: Path, d: Path, key: str) -> str:
    """A copy of ``good`` with the lowest mantissa bit of the first value of ``key`` flipped (still finite)."""
    path = _copy(good, d)
    with h5py.File(path, "r") as f:
        offset = f[key].id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([b ^ 1]))
    return str(path)


def _flip_signature(good: Path, d: Path) -> str:
    """A copy of ``good`` with one bit of a group's local-heap signature flipped (damaged HDF5 metadata)."""
    data = bytearray(good.read_bytes())
    data[data.rindex(b"HEAP")] ^= 1
    (d / "f.h5").write_bytes(bytes(data))
    return str(d / "f.h5")


def _attr(group: str, key: str, value) -> Callable[[h5py.File], None]:
    return lambda f: f[group].attrs.__setitem__(key, value)


def _half_view(f: h5py.File) -> None:
    """One augmented view of train with only 10 of its 71 rows written (extraction stopped there)."""
    g = f["splits/train"]
    g.create_dataset("views", data=np.zeros((1, *g["features"].shape), np.float32))
    g.attrs["view_rows"] = np.array([10])
    g.attrs["complete"] = False


def _empty_val(f: h5py.File) -> None:
    for key, shape in (("features", (0, D)), ("labels", (0,))):
        del f[f"splits/val/{key}"]
        f.create_dataset(f"splits/val/{key}", shape=shape, dtype="float32" if key == "features" else "int64")
    f["splits/val"].attrs["rows"] = 0


def torch_full(n: int, value: float):
    import torch

    return torch.full((n,), value)


def _head_file(d: Path, classes: int = C, dim: int = D, **change) -> str:
    """A head file saved as `ltr crt --save` does, with ``change`` applied to its state (None: key removed)."""
    import torch

    from lt_rebalance.head_io import head_state, save_head
    from lt_rebalance.heads import JointHead

    state = head_state(JointHead(torch.zeros(classes, D), torch.zeros(classes)).fit(), "crt")
    state.update(change, dim=dim)
    for k in [k for k, v in change.items() if v is None]:
        del state[k]
    save_head(d / "h.pt", state)
    return str(d / "h.pt")


def _export(d: Path, good: Path, **change) -> list[str]:
    return ["export", "--head", _head_file(d, **change), "-f", _copy(good, d), "--checkpoint", _text(d / "m.pth"),
            "--out", str(d / "o.pth")]


def _text(p: Path, folder: Path | None = None) -> str:
    """A small text file at ``p`` (inside ``folder`` when given, whose path is returned then)."""
    if folder is not None:
        folder.mkdir()
        p = folder / p.name
    p.write_text("not what you think\n")
    return str(folder if folder is not None else p)


def _truncated(good: Path, d: Path) -> str:
    data = good.read_bytes()
    (d / "f.h5").write_bytes(data[: len(data) // 2])
    return str(d / "f.h5")


def _corrupt(d: Path) -> list[str]:
    root = _tiny_images(d / "data")
    (root / "train" / "c1" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return ["--data", "imagefolder", "--root", str(root)]


def snapshot(folder: Path) -> dict[str, tuple]:
    """relative path -> (size, mtime_ns, sha256) of every file and folder under ``folder``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and os.access(p, os.R_OK) else ""
        out[str(p.relative_to(folder))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns, digest)
    return out


def test_the_table_is_big_enough():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, good: Path, tmp_path: Path):
    d = tmp_path / "case"
    d.mkdir()
    args = case.setup(d, good)
    before = snapshot(d)
    try:
        result = CliRunner().invoke(main, args)
    finally:
        while _LOCKS:
            os.close(_LOCKS.pop())
    out = result.output
    assert "Traceback" not in out, out
    assert result.exception is None or isinstance(result.exception, SystemExit), (repr(result.exception), out)
    assert result.exit_code == case.code, f"exit {result.exit_code}, expected {case.code}:\n{out}"
    if case.report:
        lines = [line for line in out.splitlines() if "[FAIL]" in line]
    else:
        lines = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, out
    for needle in case.needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    after = snapshot(d)
    created = sorted(set(after) - set(before))
    assert created == sorted(case.may_create), f"created {created}"
    assert {k: v for k, v in after.items() if k in before} == before, "a file was changed or deleted"


def test_write_features_names_negative_labels(tmp_path):
    """Not numpy's "'list' argument must have no negative elements" (from np.bincount)."""
    with pytest.raises(ValueError, match="labels of split 'train' must be class indices >= 0; got -1"):
        write_features(tmp_path / "f.h5", {"train": (np.zeros((3, 2), np.float32), np.array([0, -1, 1]))})
    assert list(tmp_path.iterdir()) == []

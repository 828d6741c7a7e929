"""Silent damage and silent wrong results (issue 13, items 6-11 and 13).

Checksums against an independent hashlib computation, one file per run, attribute cross-checks,
numerics at extreme exponents against exact or float64 re-computations, non-finite features refused
before anything is published, heads and images checked.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
from fractions import Fraction

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lt_rebalance.cli import main
from lt_rebalance.integrity import ATTR, record_checksums
from lt_rebalance.store import (
    FeatureFileError,
    FeatureFileWriter,
    FeatureStore,
    NonFiniteFeaturesError,
    write_features,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

C, D = 3, 4


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), [12, 6, 3])
    return rng.normal(size=(len(y), D)).astype(np.float32), y, rng.normal(size=(C, D)).astype(np.float32)


def _sha(a, dtype):
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).hexdigest()


def _sha_strings(items):
    h = hashlib.sha256()
    for s in items:
        b = s.encode()
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def _flip(path, key, byte=0, mask=0x01):
    """XOR one stored byte of contiguous dataset ``key`` (0x01 on byte 0: a float's lowest mantissa bit)."""
    with h5py.File(path, "r") as f:
        offset = f[key].id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(offset + byte)
        b = fh.read(1)[0]
        fh.seek(offset + byte)
        fh.write(bytes([b ^ mask]))


def _check(path):
    r = CliRunner().invoke(main, ["check", str(path), "--json"])
    return r.exit_code, {c["name"]: c for c in json.loads(r.output)["checks"]}


# -- 6. checksums ----------------------------------------------------------------------------------
def test_checksums_are_sha256_of_the_values(tmp_path):
    X, y, W = _arrays()
    paths = [f"img/{i}é.png" for i in range(len(y))]
    write_features(tmp_path / "f.h5", {"train": (X, y, paths)}, weight=W, class_names=["a", "b", "c"], dtype="float16")
    with h5py.File(tmp_path / "f.h5") as f:
        got = {k: f[k].attrs[ATTR] for k in ("splits/train/features", "splits/train/labels", "splits/train/paths",
                                             "head/weight", "classes/counts", "classes/names")}
    assert got == {
        "splits/train/features": _sha(X.astype(np.float16), "float16"),  # hashed as written, in memory
        "splits/train/labels": _sha(y, "int64"),
        "splits/train/paths": _sha_strings(paths),
        "head/weight": _sha(W, "float32"),
        "classes/counts": _sha(np.bincount(y), "int64"),
        "classes/names": _sha_strings(["a", "b", "c"]),
    }


def test_batched_views_and_resumed_writes_hash_the_same(tmp_path):
    X, y, _ = _arrays()
    V = np.stack([X + 1, X + 2])
    for resume in (False, True):
        path = tmp_path / f"r{resume}.h5"
        with FeatureFileWriter.create(path, counts=np.bincount(y)) as w:
            w.create_split("train", len(y), D, views=2)
            w.append("train", X[:5], y[:5])
            if resume:  # another process finishes it: hashed from disk at mark_complete
                w.close()
                w = FeatureFileWriter.open_existing(path)
            w.append("train", X[5:], y[5:])
            for k in range(2):
                w.append_view("train", k, V[k, :7])
                w.append_view("train", k, V[k, 7:])
            w.mark_complete("train")
            w.close()
        with h5py.File(path) as f:
            assert f["splits/train/features"].attrs[ATTR] == _sha(X, "float32")
            assert f["splits/train/views"].attrs[ATTR] == _sha(V, "float32")
        code, checks = _check(path)
        assert code == 0 and checks["checksums"]["detail"].startswith("4 datasets match"), checks


@pytest.mark.parametrize("key", ["splits/train/features", "head/weight"])
def test_a_flipped_byte_fails_check(tmp_path, key):
    X, y, W = _arrays()
    path = tmp_path / "f.h5"
    write_features(path, {"train": (X, y), "test": (X, y)}, weight=W)
    _flip(path, key)
    code, checks = _check(path)
    assert code == 1 and not checks["checksums"]["ok"] and f"/{key}" in checks["checksums"]["detail"]
    assert [n for n, c in checks.items() if not c["ok"]] == ["checksums"]  # still finite: only the checksum sees it


def test_schema_v1_file_without_checksums_stays_readable(tmp_path):
    X, y, W = _arrays()
    path = tmp_path / "f.h5"
    write_features(path, {"train": (X, y)}, weight=W)
    with h5py.File(path, "r+") as f:
        f.visititems(lambda _, o: o.attrs.__delitem__(ATTR) if isinstance(o, h5py.Dataset) else None)
    torch.testing.assert_close(FeatureStore(path).features("train"), torch.from_numpy(X))
    code, checks = _check(path)
    assert code == 0 and "no checksums recorded" in checks["checksums"]["detail"]


def test_a_dataset_added_after_writing_has_no_checksum(tmp_path):
    X, y, _ = _arrays()
    path = tmp_path / "f.h5"
    write_features(path, {"train": (X, y)})
    with h5py.File(path, "r+") as f:
        del f["splits/train/labels"]
        f["splits/train/labels"] = y
    code, checks = _check(path)
    assert code == 1 and "have no checksum: /splits/train/labels" in checks["checksums"]["detail"]


# -- 7. one run reads one file ---------------------------------------------------------------------
def test_replacing_the_file_between_two_reads_does_not_mix_files(tmp_path):
    X, y, _ = _arrays(0)
    X2, _, _ = _arrays(1)
    path, other = tmp_path / "f.h5", tmp_path / "g.h5"
    write_features(path, {"train": (X, y), "test": (X[:5], y[:5])})
    write_features(other, {"train": (X2, y), "test": (X2[:5], y[:5])})
    with FeatureStore(path) as store:
        first = store.features("train")
        os.replace(other, path)  # e.g. an extraction with --overwrite publishing a new file
        torch.testing.assert_close(store.features("test"), torch.from_numpy(X[:5]), rtol=0, atol=0)
        torch.testing.assert_close(first, torch.from_numpy(X), rtol=0, atol=0)
    torch.testing.assert_close(FeatureStore(path).features("test"), torch.from_numpy(X2[:5]), rtol=0, atol=0)


def test_an_hdf5_error_while_reading_is_a_damaged_file(tmp_path, monkeypatch):
    X, y, _ = _arrays()
    write_features(tmp_path / "f.h5", {"train": (X, y)})
    store = FeatureStore(tmp_path / "f.h5")

    def broken(*a, **k):
        raise RuntimeError("Can't synchronously read data (wrong B-tree signature)")

    monkeypatch.setattr(h5py.Dataset, "__getitem__", broken)
    with pytest.raises(FeatureFileError, match="damaged HDF5 file, reading failed .*wrong B-tree signature.*ltr extract"):
        store.labels("train")


def test_check_survives_the_hdf5_library_crashing(tmp_path, monkeypatch):
    import lt_rebalance.checks as checks

    monkeypatch.setattr(checks, "verify", lambda path: os.kill(os.getpid(), signal.SIGSEGV))
    (result,) = checks.verify_isolated(tmp_path / "f.h5")
    assert not result.ok and result.name == "readable" and "SIGSEGV" in result.detail


# -- 8. attributes cross-checked ------------------------------------------------------------------
@pytest.mark.parametrize("attrs, needle", [
    ({"complete": "False"}, "complete='False' is a str, expected a boolean"),
    ({"rows": 10}, "marked complete but attribute rows=10 of 21 rows"),
    ({"rows": 2.5}, "rows=2.5 is a float"),
    ({"rows": True}, "rows=True is a bool"),
])
def test_split_attributes_must_agree_with_the_datasets(tmp_path, attrs, needle):
    X, y, _ = _arrays()
    path = tmp_path / "f.h5"
    write_features(path, {"train": (X, y)})
    with h5py.File(path, "r+") as f:
        f["splits/train"].attrs.update(attrs)
    for allow in (False, True):
        with pytest.raises(FeatureFileError, match=needle.replace("(", r"\(").replace(")", r"\)")) as e:
            FeatureStore(path, allow_incomplete=allow)
        assert "ltr import" in str(e.value)


def test_zero_width_features_fail_check(tmp_path):
    with pytest.raises(FeatureFileError, match="D = 0"):  # never written by write_features / ltr import
        write_features(tmp_path / "w.h5", {"train": (np.zeros((3, 0), np.float32), np.arange(3))})
    path = tmp_path / "f.h5"
    with FeatureFileWriter.create(path, counts=[1, 1, 1]) as w:
        w.create_split("train", 3, 0)
        w.append("train", np.zeros((3, 0), np.float32), np.arange(3))
        w.mark_complete("train")
    code, checks = _check(path)
    assert code == 1 and "no feature columns (D = 0)" in checks["schema"]["detail"]


def _views_half_written(path):
    X, y, _ = _arrays()
    with FeatureFileWriter.create(path, counts=np.bincount(y)) as w:
        w.create_split("train", len(y), D, views=2)
        w.append("train", X, y)
        w.append_view("train", 0, X)
        w.append_view("train", 1, X[:4])  # the extraction stopped in view 1
        w.create_split("val", len(y), D)
        w.append("val", X, y)
        w.mark_complete("val")


def test_views_with_unwritten_rows_are_never_trained_on(tmp_path):
    path = tmp_path / "f.h5"
    _views_half_written(path)
    store = FeatureStore(path, allow_incomplete=True)
    assert store.views("train", 1).shape == (1, 21, D)
    with pytest.raises(FeatureFileError, match=r"view\(s\) \[1\] have fewer rows.*--views 1"):
        store.views("train", 2)
    r = CliRunner().invoke(main, ["crt", "-f", str(path), "--allow-incomplete", "--views", "2", "--epochs", "1",
                                  "--batch-size", "4"])
    assert r.exit_code == 1 and r.output.count("Error:") == 1 and "ltr extract --resume" in r.output, r.output


# -- 9. numerics at extreme exponents -------------------------------------------------------------
def test_sampler_power_100_is_exact():
    from lt_rebalance.samplers import PowerSampler, class_probabilities

    counts = [1280, 640, 5]
    exact = [Fraction(n**100, sum(m**100 for m in counts)) for n in counts]  # integers: no rounding at all
    p = class_probabilities(counts, 100)
    assert torch.isfinite(p).all()
    np.testing.assert_allclose(p.numpy(), [float(e) for e in exact], rtol=1e-12, atol=1e-300)
    labels = np.repeat([0, 1, 2], [20, 10, 5])
    s = PowerSampler(labels, q=100)
    drawn = np.bincount(labels[s.epoch(0, 1, 5, torch.Generator().manual_seed(0)).flatten().numpy()], minlength=3)
    assert drawn.tolist() == [35, 0, 0]  # 2^-100 for the next class: never drawn


def _brute_tau_predictions(X, W, tau):
    """argmax_j x·w_j / ||w_j||^tau in float64 (exact enough where float64 holds the scales)."""
    Xd, Wd = X.astype(np.float64), W.astype(np.float64)
    return np.argmax(Xd @ Wd.T / np.linalg.norm(Wd, axis=1) ** tau, axis=1)


def test_tau_sweep_at_large_tau_matches_float64_and_refuses_beyond_the_range():
    from lt_rebalance.heads.tau_norm import tau_normalize, tau_sweep

    rng = np.random.default_rng(0)
    W = (rng.normal(size=(5, 8)) * np.array([1.0, 1.5, 2.0, 3.0, 4.0])[:, None]).astype(np.float32)
    X = rng.normal(size=(400, 8)).astype(np.float32)
    counts = np.full(5, 50)
    ratio = np.ptp(np.log(np.linalg.norm(W, axis=1)))
    taus = [0.0, 1.0, 20.0, 60.0 / ratio]  # the last: scales e^-60 apart, far beyond float32 without rescaling
    for tau, acc in zip(taus, tau_sweep(X, np.zeros(400, dtype=np.int64), W, counts, taus)["all"].tolist()):
        assert acc == pytest.approx(np.mean(_brute_tau_predictions(X, W, tau) == 0))
    with pytest.raises(ValueError, match=r"use --taus within \|tau\| <= "):
        tau_sweep(X, np.zeros(400, dtype=np.int64), W, counts, [0.0, 1000.0])
    with pytest.raises(ValueError, match=r"use tau in \["):
        tau_normalize(W * 100, 1000.0)
    np.testing.assert_allclose(tau_normalize(W, 3.0).numpy(), W / np.linalg.norm(W, axis=1, keepdims=True) ** 3,
                               rtol=1e-6)


def test_logit_adjustment_overflow_is_refused():
    from lt_rebalance.posthoc import logit_adjust_sweep

    X, y, W = _arrays()
    with pytest.raises(ValueError, match="overflows float32"):
        logit_adjust_sweep(X, y, W, None, np.bincount(y), [0.0, 3e38])


@pytest.mark.parametrize("beta", [0.9999, 1 - 1e-12, 1e-30])
def test_class_balanced_weights_in_log_space(beta):
    from lt_rebalance.heads.crt import class_balanced_weights

    n = [1280, 20, 1]
    # exact: (1 - beta) / (1 - beta^n) with beta = a/b as a fraction
    b = Fraction(beta)
    w = [(1 - b) / (1 - b**k) for k in n]
    expected = np.array([float(x / sum(w) * len(n)) for x in w])
    np.testing.assert_allclose(class_balanced_weights(torch.tensor(n), beta).numpy(), expected, rtol=1e-5)


# -- 10. non-finite features are never published --------------------------------------------------
@pytest.mark.parametrize("dtype, value, needle", [
    ("float32", np.nan, "hold NaN/Inf values"),
    ("float16", 7e4, "beyond float16's range (largest |value| 70000 > 65504); store them as float32 (--dtype float32)"),
])
def test_non_finite_rows_are_refused_before_writing(tmp_path, dtype, value, needle):
    X, y, _ = _arrays()
    X[[3, 8], 1] = value
    with pytest.raises(NonFiniteFeaturesError, match=needle.replace("(", r"\(").replace(")", r"\)")) as e:
        write_features(tmp_path / "f.h5", {"train": (X, y)}, dtype=dtype)
    assert "split 'train': 2 feature row(s) (rows 3, 8)" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_extract_float16_overflow_publishes_nothing(tmp_path):
    from lt_rebalance.extract.datasets import ArraySource, reference_config
    from lt_rebalance.extract.run import ExtractConfig, extract_features
    from lt_rebalance.extract.tiny_cnn import TinyCNN

    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 0, 0, 1, 1, 1])
    model = TinyCNN(num_classes=2)
    huge = lambda x: model.forward_head(model.forward_features(x), pre_logits=True).abs() + 1e5  # noqa: E731
    with pytest.raises(NonFiniteFeaturesError, match=r"split 'train'.*rows 0, 1.*--dtype float32.*f.h5.partial removed"):
        extract_features(model, {"train": ArraySource(images, labels)}, tmp_path / "f.h5", counts=[3, 3],
                         transform=reference_config("cifar", 8), config=ExtractConfig(batch_size=2, dtype="float16"),
                         features_fn=huge)
    assert os.listdir(tmp_path) == []


# -- 11. heads and images -------------------------------------------------------------------------
def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from lt_rebalance.extract.datasets.sources import FileSource
    from PIL import Image

    a = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0, 257, ..., 65535
    Image.fromarray(a).save(tmp_path / "g16.png")
    rgb = np.asarray(FileSource(tmp_path, ["g16.png"], [0]).load(0))
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3)
    np.testing.assert_array_equal(rgb[..., 0], np.arange(256).reshape(16, 16))  # 257 k -> k exactly


def test_decompression_bomb_counts_as_a_bad_image(tmp_path, monkeypatch):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / split / f"c{c}" / f"{i}.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "train" / "c1" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: DecompressionBombError
    r = CliRunner().invoke(main, ["extract", "--model", "tiny_cnn", "--random-init", "--data", "imagefolder",
                                  "--root", str(tmp_path), "--out", str(tmp_path / "f.h5"), "--splits", "train,val",
                                  "--image-size", "8", "--workers", "0", "--quiet", "--skip-bad", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["bad"] == {"train": ["train/c1/bomb.png"]}


def _head(tmp_path, **change):
    from lt_rebalance.head_io import head_state, save_head
    from lt_rebalance.heads import JointHead

    X, y, W = _arrays()
    write_features(tmp_path / "f.h5", {"train": (X, y), "val": (X, y), "test": (X, y)}, weight=W, model="tiny_cnn")
    state = head_state(JointHead(torch.from_numpy(W), torch.zeros(C)).fit(), "crt")
    state.update(change)
    save_head(tmp_path / "h.pt", state)
    return ["--head", str(tmp_path / "h.pt"), "-f", str(tmp_path / "f.h5")]


@pytest.mark.parametrize("change, needle", [
    ({"weight": torch.full((C, D), float("nan"))}, "weight has 12 NaN/Inf value(s)"),
    ({"weight": torch.zeros(C + 1, D)}, "weight has shape (4, 4), but the head says C x D = (3, 4)"),
    ({"num_classes": C + 1, "weight": torch.zeros(C + 1, D), "bias": torch.zeros(C + 1)},
     "has 4 classes x 4 dims, but"),
    ({"weight": [[0.0] * D] * C}, "weight is list, expected a float tensor"),
    ({"num_classes": None}, "num_classes is None, expected a positive integer"),
])
@pytest.mark.parametrize("command", ["export", "plot-norms"])
def test_heads_that_disagree_are_refused(tmp_path, change, needle, command):
    args = _head(tmp_path, **change)
    if command == "export":
        argv = ["export", *args, "--checkpoint", str(tmp_path / "none.pth"), "--out", str(tmp_path / "o.pth")]
    else:
        argv = ["plot", "norms", *args, "--out", str(tmp_path / "n.png")]
    r = CliRunner().invoke(main, argv)
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 1 and len(errors) == 1 and needle in errors[0], r.output
    assert sorted(os.listdir(tmp_path)) == ["f.h5", "h.pt"]


def test_record_checksums_of_an_edited_file_makes_it_consistent_again(tmp_path):
    X, y, _ = _arrays()
    path = tmp_path / "f.h5"
    write_features(path, {"train": (X, y)})
    with h5py.File(path, "r+") as f:
        f["splits/train/features"][0, 0] = 5.0
    assert _check(path)[0] == 1
    with h5py.File(path, "r+") as f:
        record_checksums(f)
    assert _check(path)[0] == 0


def test_extract_overflow_after_rows_were_written_keeps_them(tmp_path):
    """A later batch overflowing float16 (autocast on a GPU, or --dtype float16) must not delete the rows
    already extracted: the partial file stays, and the message says how to go on."""
    from lt_rebalance.extract.datasets import ArraySource, reference_config
    from lt_rebalance.extract.run import ExtractConfig, extract_features
    from lt_rebalance.extract.tiny_cnn import TinyCNN

    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 0, 0, 1, 1, 1])
    model = TinyCNN(num_classes=2)
    calls = []

    def late_overflow(x):
        calls.append(len(x))
        z = model.forward_head(model.forward_features(x), pre_logits=True)
        return z.abs() + (1e5 if len(calls) > 2 else 0.0)  # after the dimension probe and one batch

    with pytest.raises(NonFiniteFeaturesError, match=r"the 2 rows written so far are kept in .*f\.h5\.partial.*--no-autocast"):
        extract_features(model, {"train": ArraySource(images, labels)}, tmp_path / "f.h5", counts=[3, 3],
                         transform=reference_config("cifar", 8), config=ExtractConfig(batch_size=2, dtype="float16"),
                         features_fn=late_overflow)
    with h5py.File(tmp_path / "f.h5.partial", "r") as f:
        assert int(f["splits/train"].attrs["rows"]) == 2 and np.isfinite(f["splits/train/features"][:2]).all()
    assert not (tmp_path / "f.h5").exists()


def test_resume_fingerprint_records_a_cuda_run_and_its_autocast():
    from lt_rebalance.extract.datasets import reference_config
    from lt_rebalance.extract.run import ExtractConfig, _fingerprint

    t = reference_config("cifar", 8)
    cpu = _fingerprint({"model": "m"}, t, ExtractConfig(device="cpu"), {"train": 6})
    assert "device" not in cpu and "autocast" not in cpu  # CPU partials of earlier versions still resume
    gpu = _fingerprint({"model": "m"}, t, ExtractConfig(device="cuda:1"), {"train": 6})
    plain = _fingerprint({"model": "m"}, t, ExtractConfig(device="cuda:1", autocast=False), {"train": 6})
    assert gpu["device"] == "cuda" and gpu["autocast"] is True and plain["autocast"] is False
    assert len({json.dumps(d, sort_keys=True) for d in (cpu, gpu, plain)}) == 3


def test_ranks_join_a_gloo_group_bound_to_their_gpu(monkeypatch):
    """Host-side counters and barriers need gloo (NCCL refuses CPU tensors); a CUDA rank binds its GPU first."""
    import torch.distributed as dist
    from lt_rebalance.extract.distributed import DistEnv, init_process_group

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **k: calls.append(("init", backend)))
    init_process_group("cuda:3", DistEnv(rank=3, world=4, local_rank=3))
    init_process_group("cpu", DistEnv(rank=0, world=2, local_rank=0))
    assert calls == [("set_device", 3), ("init", "gloo"), ("init", "gloo")]

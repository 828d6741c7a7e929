"""Never lose work: SIGKILL at chosen and random points, then --resume, equals an uninterrupted run."""
import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from lt_rebalance.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: no OpenMP spin-waits on shared cores

# Runs `ltr extract ARGS` with TARGET wrapped so that its K-th call SIGKILLs the process
# before it runs, after it returns, or at its first h5py flush ("mid": data written, rows not yet bumped).
KILLER = r"""
import importlib, os, signal, sys
import h5py
target, k, when, args = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
module, _, attr = target.partition(":")
owner = importlib.import_module(module)
*path, name = attr.split(".")
for p in path:
    owner = getattr(owner, p)
orig, calls, armed = getattr(owner, name), [0], [False]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
flush = h5py.File.flush
def patched_flush(self):
    flush(self)
    if armed[0]:
        die()
h5py.File.flush = patched_flush
def patched(*a, **kw):
    calls[0] += 1
    hit = calls[0] == k
    if hit and when == "before":
        die()
    armed[0] = hit and when == "mid"
    out = orig(*a, **kw)
    if hit and when == "after":
        die()
    return out
setattr(owner, name, patched)
from lt_rebalance.extract.cli import extract
extract.main(args, prog_name="extract")
"""


def _args(root, out, *extra):
    return ["--model", "resnet10", "--random-init", "--data", "imagefolder", "--root", str(root), "--out", str(out),
            "--image-size", "32", "--batch-size", "2", "--train-views", "1", "--dtype", "float32", "--quiet", *extra]


def _read(path):
    with h5py.File(path, "r") as f:
        out = {}
        f.visititems(lambda k, v: out.__setitem__(k, v[...]) if isinstance(v, h5py.Dataset) else None)
        return out


def _assert_same(a, b):
    da, db = _read(a), _read(b)
    assert sorted(da) == sorted(db)
    for k in da:
        np.testing.assert_array_equal(da[k], db[k], err_msg=k)


@pytest.fixture(scope="module")
def reference(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    res = CliRunner().invoke(main, ["extract", "--workers", "0", *_args(image_folder, out)])
    assert res.exit_code == 0, res.output
    return out


def _resume(root, out, *extra):
    res = CliRunner().invoke(main, ["extract", "--workers", "0", *_args(root, out, "--resume", *extra)])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("target,k,when", [
    ("lt_rebalance.store:FeatureFileWriter.append", 4, "mid"),  # train, data written, rows not bumped
    ("lt_rebalance.store:FeatureFileWriter.append_view", 3, "mid"),  # augmented view
    ("lt_rebalance.store:FeatureFileWriter.mark_complete", 2, "before"),  # val done, not marked
])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, image_folder, reference, target, k, when):
    out = tmp_path / "f.h5"
    proc = subprocess.run([sys.executable, "-c", KILLER, target, str(k), when, "--workers", "0",
                           *_args(image_folder, out)], capture_output=True, text=True, env=ENV)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists() and (tmp_path / "f.h5.partial").exists()
    if when == "mid":
        fresh = CliRunner().invoke(main, ["extract", "--workers", "0", *_args(image_folder, out)])
        assert fresh.exit_code == 1 and "--resume" in fresh.output and "Traceback" not in fresh.output
        changed = CliRunner().invoke(main, ["extract", "--workers", "0", *_args(image_folder, out, "--resume", "--seed", "5")])
        assert changed.exit_code == 1 and "different settings (seed)" in changed.output
    _resume(image_folder, out)
    assert not (tmp_path / "f.h5.partial").exists()
    _assert_same(out, reference)


def test_random_sigkill_with_workers(tmp_path, image_folder, reference):
    """Killed at a random moment (DataLoader workers on), then resumed."""
    out, partial = tmp_path / "f.h5", tmp_path / "f.h5.partial"
    proc = subprocess.Popen([sys.executable, "-m", "lt_rebalance.extract", "--workers", "2",
                             *_args(image_folder, out)], stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 60
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(0).uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != 0:  # killed before the end: the final path holds nothing yet
        assert not out.exists()
        _resume(image_folder, out)
    _assert_same(out, reference)


@pytest.fixture(scope="module")
def bad_folder(image_folder, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("bad") / "data"
    shutil.copytree(image_folder, root)
    (root / "train" / "c0" / "005.png").write_bytes(b"corrupt")
    (root / "train" / "c2" / "002.png").write_bytes(b"corrupt")
    out = root.parent / "ref.h5"
    res = CliRunner().invoke(main, ["extract", "--workers", "0", *_args(root, out, "--skip-bad")])
    assert res.exit_code == 0, res.output
    return root, out


@pytest.mark.parametrize("target,k,when", [
    ("lt_rebalance.extract.run:record_bad", 1, "after"),  # bad image recorded, its batch's good rows not
    ("lt_rebalance.extract.run:shrink_split", 1, "mid"),  # split copied, old one not yet replaced
])
def test_sigkill_with_skip_bad(tmp_path, bad_folder, target, k, when):
    root, reference_out = bad_folder
    out = tmp_path / "f.h5"
    proc = subprocess.run([sys.executable, "-c", KILLER, target, str(k), when, "--workers", "0",
                           *_args(root, out, "--skip-bad")], capture_output=True, text=True, env=ENV)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    _resume(root, out, "--skip-bad")
    _assert_same(out, reference_out)
    with h5py.File(out) as f:
        assert f["splits/train/features"].shape[0] == 19 and len(f["splits/train/bad_paths"]) == 2

"""`ltr extract --gpus 2 --device cpu`: two gloo processes, shard files merged by rank 0 == one process."""
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from lt_rebalance.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: no OpenMP spin-waits on shared cores


def _read(path):
    with h5py.File(path, "r") as f:
        data = {}
        f.visititems(lambda k, v: data.__setitem__(k, v[...]) if isinstance(v, h5py.Dataset) else None)
        attrs = {k: f.attrs[k] for k in ("model", "dataset", "checkpoint_sha256", "transform", "extract_fingerprint")}
        splits = {k: dict(g.attrs) for k, g in f["splits"].items()}
    return data, attrs, splits


def test_two_gloo_processes_equal_single_process(tmp_path, image_folder):
    # 21 train / 6 val images: shards of 10-11 / 3 rows; batch 1 makes the batches identical
    args = ["--model", "resnet10", "--random-init", "--data", "imagefolder", "--root", str(image_folder),
            "--image-size", "32", "--batch-size", "1", "--train-views", "1", "--dtype", "float32",
            "--device", "cpu", "--workers", "0", "--splits", "train,val"]
    single, multi = tmp_path / "single.h5", tmp_path / "multi.h5"
    res = CliRunner().invoke(main, ["extract", *args, "--out", str(single), "--quiet"])
    assert res.exit_code == 0, res.output
    proc = subprocess.run([sys.executable, "-m", "lt_rebalance.cli", "extract", *args, "--out", str(multi),
                           "--gpus", "2", "--json"], capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"train": 21' in proc.stdout
    d1, a1, s1 = _read(single)
    d2, a2, s2 = _read(multi)
    assert a1 == a2 and sorted(d1) == sorted(d2)
    for k in d1:
        np.testing.assert_array_equal(d1[k], d2[k], err_msg=k)
    for name in s1:
        for key in ("rows", "complete"):
            assert s1[name][key] == s2[name][key]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.h5", "single.h5"]  # shards removed


def test_more_processes_than_gpus_is_one_error_line(monkeypatch):
    import click
    import torch
    from lt_rebalance.extract.cli import _check_gpus

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(click.BadParameter, match="2 processes asked for, one per GPU, but this machine has 1"):
        _check_gpus(2, "cuda")
    _check_gpus(1, "cuda:0")
    _check_gpus(4, "cpu")  # CPU processes: no GPU needed

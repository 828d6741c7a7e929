"""Issue 24: files from strangers, jobs on a batch scheduler, a newcomer's first hour.

Each test reproduces one case of the issue (it failed before the fix); docs/BAD_INPUTS.md lists
them under "Files from strangers and batch schedulers (issue 24)".
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from lt_rebalance.cli import main
from lt_rebalance.store import FeatureFileError, FeatureStore, write_features

pytestmark = pytest.mark.usefixtures("torch_one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
C, D = 3, 4


def _arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), [12, 6, 3])
    x = (rng.normal(size=(len(y), D)) + 3 * y[:, None]).astype(np.float32)
    return x, y


def _features(path: Path, **kw) -> Path:
    x, y = _arrays()
    write_features(path, {"train": (x, y), "val": (x[::2], y[::2]), "test": (x[1::2], y[1::2])},
                   weight=np.eye(C, D, dtype=np.float32), bias=np.zeros(C, np.float32), overwrite=True, **kw)
    return path


def _one_error(result, *needles: str) -> str:
    """The result failed with exactly one ``Error:`` line holding every needle, and no traceback."""
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- 1. data loss --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fifo", "symlink", "dangling-symlink", "device"])
def test_outputs_are_regular_files_even_with_overwrite(tmp_path, kind):
    feats = _features(tmp_path / "f.h5")
    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    out = tmp_path / "r.json"
    if kind == "fifo":
        os.mkfifo(out)
        needle = "is a FIFO (named pipe), not a regular file"
    elif kind == "symlink":
        out.symlink_to(victim.name)
        needle = "is a symbolic link to victim.json, not a regular file"
    elif kind == "dangling-symlink":
        out.symlink_to("nowhere.json")
        needle = "is a symbolic link to nowhere.json"
    else:  # a null device of our own (never the system's /dev/null: a broken build would replace it)
        try:
            os.mknod(out, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except OSError:
            pytest.skip("cannot create a device node here (not root)")
        needle = "r.json is a character device, not a regular file"
    r = CliRunner().invoke(main, ["ncm", "-f", str(feats), "--save", str(out), "--overwrite"])
    assert r.exit_code == 1
    _one_error(r, needle, "even with --overwrite")
    assert victim.read_text() == "precious"
    assert os.path.islink(out) or out.is_fifo() or out.is_char_device()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_publish_refuses_a_link_that_appeared_meanwhile(tmp_path):
    from lt_rebalance.outputs import OutputError, publish

    tmp, out = tmp_path / "t", tmp_path / "o"
    tmp.write_text("new")
    (tmp_path / "victim").write_text("old")
    out.symlink_to("victim")
    with pytest.raises(OutputError, match="symbolic link"):
        publish(tmp, out, overwrite=True)
    assert out.is_symlink() and (tmp_path / "victim").read_text() == "old"


def test_extraction_lock_file_is_never_opened_through_a_link(tmp_path):
    from lt_rebalance.extract.output import output_lock

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "f.h5.lock").symlink_to(victim)
    with pytest.raises(FileExistsError, match="f.h5.lock is a symbolic link .*remove the link"):
        with output_lock(tmp_path / "f.h5"):
            pass
    assert victim.read_text() == "precious" and (tmp_path / "f.h5.lock").is_symlink()


def test_demo_overwrite_never_deletes_through_a_symlinked_subfolder(tmp_path):
    from lt_rebalance.demo import MANIFEST, MANIFEST_FORMAT, prepare_out

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "plots").mkdir(parents=True)
    (elsewhere / "plots" / "a.png").write_text("not the demo's")
    out = tmp_path / "out"
    out.mkdir()
    (out / "plots").symlink_to(elsewhere / "plots")
    (out / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": ["plots/a.png"]}))
    prepare_out(out, True, ["results.json"])
    assert (elsewhere / "plots" / "a.png").read_text() == "not the demo's"

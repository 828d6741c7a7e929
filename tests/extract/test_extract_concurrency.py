"""Concurrency (issue 9): two extractors on one output, and readers during an extraction.

* A second ``ltr extract`` on the output a first one is writing is refused (lock), touches none of
  the first one's files, and the first completes.
* Readers (``ltr info``, ``FeatureStore``, a head command) polling the final path during an
  extraction that replaces it only ever see a complete, valid file: the old one or the new one.
"""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from data_support import imagefolder_extract_args as _args
from data_support import make_image_folder

from lt_rebalance.cli import main
from lt_rebalance.store import FeatureStore

pytestmark = pytest.mark.usefixtures("torch_one_thread")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# `ltr extract ARGS` with FeatureFileWriter.append slowed down: it touches WAITING on its first call,
# then waits for GO (when given) and sleeps DELAY seconds per call.
SLOW = r"""
import os, sys, time
from pathlib import Path
from lt_rebalance.store import FeatureFileWriter
waiting, go, delay, args = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
orig = FeatureFileWriter.append
def append(self, *a, **kw):
    Path(waiting).touch()
    while go != "-" and not os.path.exists(go):
        time.sleep(0.02)
    time.sleep(delay)
    return orig(self, *a, **kw)
FeatureFileWriter.append = append
from lt_rebalance.extract.cli import extract
extract.main(args, prog_name="extract")
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("conc"), {"train": (6, 3, 2), "val": (2, 2, 2)})


def _slow(tmp_path, args, go="-", delay=0.0):
    waiting = tmp_path / "waiting"
    proc = subprocess.Popen([sys.executable, "-c", SLOW, str(waiting), str(go), str(delay), *args],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not waiting.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the extractor never started writing"
        time.sleep(0.02)
    return proc


def _state(folder):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir() if p.is_file()}


def test_second_extractor_is_refused_while_the_first_completes(tmp_path, data):
    out = tmp_path / "out" / "f.h5"
    out.parent.mkdir()
    go = tmp_path / "go"
    first = _slow(tmp_path, _args(data, out), go=go)  # holds the lock, blocked at its first batch
    try:
        before = _state(out.parent)
        assert set(before) == {"f.h5.lock", "f.h5.partial"}
        for extra in ([], ["--overwrite"], ["--resume"]):
            res = CliRunner().invoke(main, ["extract", *_args(data, out, *extra)])
            assert res.exit_code == 1, res.output
            errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
            assert len(errors) == 1 and "another extraction" in errors[0], res.output
            assert f"pid {first.pid}" in errors[0], errors[0]
            assert _state(out.parent) == before  # the first one's lock and partial file untouched
        go.touch()
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stderr
    store = FeatureStore(out)
    assert all(s.complete for s in store.splits.values()) and store.splits["train"].rows == 11
    assert sorted(p.name for p in out.parent.iterdir()) == ["f.h5"]  # no lock or partial left


def test_readers_only_ever_see_a_complete_file(tmp_path, data):
    out = tmp_path / "f.h5"
    res = CliRunner().invoke(main, ["extract", *_args(data, out, "--seed", "1")])
    assert res.exit_code == 0, res.output
    # replace it slowly (--overwrite, another seed, one augmented view)
    writer = _slow(tmp_path, _args(data, out, "--overwrite", "--train-views", "1"), delay=0.05)
    reads = 0
    try:
        while writer.poll() is None or reads == 0:
            store = FeatureStore(out)  # never incomplete, never damaged
            assert all(s.complete and s.rows == s.capacity for s in store.splits.values())
            assert np.isfinite(store.features("train").numpy()).all()
            info = CliRunner().invoke(main, ["info", str(out), "--json"])
            assert info.exit_code == 0, info.output
            ncm = CliRunner().invoke(main, ["ncm", "-f", str(out), "--splits", "val", "--json"])
            assert ncm.exit_code == 0, ncm.output
            reads += 1
    finally:
        if writer.poll() is None:
            writer.kill()
        _, stderr = writer.communicate()
    assert writer.returncode == 0, stderr
    assert reads >= 3, reads
    assert FeatureStore(out).splits["train"].views == 1  # the new file replaced the old one
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("f.h5")) == ["f.h5"]

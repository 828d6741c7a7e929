"""`ltr check`: a full verification that passes on a good file and names each problem in a bad one."""
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from lt_rebalance.cli import main
from lt_rebalance.integrity import record_checksums
from lt_rebalance.store import write_features


@pytest.fixture
def good_file(tmp_path):
    rng = np.random.default_rng(0)
    counts = np.array([30, 12, 5])
    y = np.repeat(np.arange(3), counts)
    path = tmp_path / "f.h5"
    write_features(path, {"train": (rng.normal(size=(len(y), 4)), y), "test": (rng.normal(size=(6, 4)), np.arange(6) % 3)},
                   weight=rng.normal(size=(3, 4)), bias=np.zeros(3))
    return path


def _check(path):
    r = CliRunner().invoke(main, ["check", str(path), "--json"])
    return r.exit_code, json.loads(r.output)


def _failed(doc):
    return {c["name"] for c in doc["checks"] if not c["ok"]}


def test_good_file_passes(good_file):
    code, doc = _check(good_file)
    assert code == 0 and doc["ok"] and not _failed(doc)
    names = {c["name"] for c in doc["checks"]}
    assert {"schema", "dtypes", "train: complete", "test: features finite", "counts = train label histogram",
            "head finite"} <= names


@pytest.mark.parametrize(
    "corrupt, failed",
    [
        (lambda f: f["splits/test/features"].__setitem__((2, 1), np.nan), "test: features finite"),
        (lambda f: f["splits/train/features"].__setitem__((0, 0), np.inf), "train: features finite"),
        (lambda f: f["head/weight"].__setitem__((1, 1), np.nan), "head finite"),
        (lambda f: f["classes/counts"].__setitem__(0, 99), "counts = train label histogram"),
        (lambda f: f["splits/test"].attrs.__setitem__("complete", False), "test: complete"),
    ],
)
def test_each_problem_is_reported(good_file, corrupt, failed):
    with h5py.File(good_file, "r+") as f:
        corrupt(f)
        record_checksums(f)  # as if written so: each problem alone (a changed byte is tests/test_integrity.py's)
    before = good_file.read_bytes()
    code, doc = _check(good_file)
    assert code == 1 and not doc["ok"]
    assert _failed(doc) == {failed}
    assert good_file.read_bytes() == before  # never modified


def test_not_hdf5(tmp_path):
    p = tmp_path / "x.h5"
    p.write_text("not hdf5")
    code, doc = _check(p)
    assert code == 1 and _failed(doc) == {"schema"}
    r = CliRunner().invoke(main, ["check", str(p)])
    assert r.exit_code == 1 and "FAIL" in r.output and "Traceback" not in r.output

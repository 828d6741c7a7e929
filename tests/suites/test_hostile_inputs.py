"""Issue 24: files from strangers, jobs on a batch scheduler, a newcomer's first hour.

Each test reproduces one case of the issue (it failed before the fix); docs/BAD_INPUTS.md lists
them under "Files from strangers and batch schedulers (issue 24)".
"""
from __future__ import annotations

import json
import os
import pickle
import re
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
    from lt_rebalance.commands.demo_pipeline import MANIFEST, MANIFEST_FORMAT, prepare_out

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "plots").mkdir(parents=True)
    (elsewhere / "plots" / "a.png").write_text("not the demo's")
    out = tmp_path / "out"
    out.mkdir()
    (out / "plots").symlink_to(elsewhere / "plots")
    (out / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": ["plots/a.png"]}))
    prepare_out(out, True, ["results.json"])
    assert (elsewhere / "plots" / "a.png").read_text() == "not the demo's"


# -- 2. files from strangers -----------------------------------------------------------------------------
def _outside(kind: str, d: Path) -> tuple[Path, str]:
    """A valid feature file whose /splits/test/labels lives outside it; (file, expected message part)."""
    path = _features(d / "f.h5")
    with h5py.File(path, "r+") as f:
        y = f["splits/test/labels"][...]
        del f["splits/test/labels"]
        if kind == "external-link":
            with h5py.File(d / "other.h5", "w") as o:
                o["y"] = y
            f["splits/test/labels"] = h5py.ExternalLink("other.h5", "/y")
            return path, "/splits/test/labels is an external link to other.h5:/y"
        if kind == "external-link-missing":
            f["splits/test/labels"] = h5py.ExternalLink("gone.h5", "/y")
            return path, "/splits/test/labels is an external link to gone.h5:/y"
        if kind == "external-raw":
            (d / "raw.bin").write_bytes(y.astype(np.int64).tobytes())
            f.create_dataset("splits/test/labels", shape=y.shape, dtype="int64",
                             external=[(str(d / "raw.bin"), 0, y.nbytes)])
            return path, f"/splits/test/labels stores its data outside this file (in {d / 'raw.bin'})"
        with h5py.File(d / "src.h5", "w") as o:
            o["y"] = y
        layout = h5py.VirtualLayout(shape=y.shape, dtype="int64")
        layout[:] = h5py.VirtualSource(str(d / "src.h5"), "y", shape=y.shape)
        f["splits/test"].create_virtual_dataset("labels", layout)
        return path, f"/splits/test/labels is a virtual dataset mapping data of {d / 'src.h5'}"


@pytest.mark.parametrize("kind", ["external-link", "external-link-missing", "external-raw", "virtual"])
def test_data_outside_the_file_is_refused_on_open_and_by_check(tmp_path, kind):
    path, where = _outside(kind, tmp_path)
    with pytest.raises(FeatureFileError, match="refused: a feature file must hold its own data") as e:
        FeatureStore(path)
    assert where in str(e.value) and "damaged" not in str(e.value)
    r = CliRunner().invoke(main, ["ncm", "-f", str(path)])
    assert r.exit_code == 1
    _one_error(r, where, "self-contained")
    r = CliRunner().invoke(main, ["check", str(path)])
    assert r.exit_code == 1 and where in r.output and "Traceback" not in r.output
    assert sum(ln.lstrip().startswith("[FAIL]") for ln in r.output.splitlines()) == 1, r.output


def test_resume_refuses_a_partial_file_pointing_outside(tmp_path):
    from lt_rebalance.extract.output import resume_partial

    target = tmp_path / "f.h5"
    with h5py.File(tmp_path / "f.h5.partial", "w") as f:
        f.attrs["extract_fingerprint"] = "{}"
        f["splits/train/features"] = h5py.ExternalLink("/etc/victim.h5", "/x")
    with pytest.raises(ValueError, match="external link to /etc/victim.h5:/x, and resuming would write there"):
        resume_partial(target, {}, resume=True, overwrite=False)


def test_cifar_batches_are_unpickled_with_a_restricted_unpickler(tmp_path):
    from data_support import make_cifar

    root = make_cifar(tmp_path / "data")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    args = ["extract", "--model", "tiny_cnn", "--random-init", "--data", "cifar10_lt", "--root", str(root),
            "--out", str(tmp_path / "f.h5"), "--image-size", "8", "--workers", "0", "--quiet"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and not marker.exists()
    _one_error(r, "data_batch_3: not an official CIFAR batch", "refers to posix.system")

    whole = (root / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(whole[: len(whole) // 2])  # interrupted download
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1
    _one_error(r, "data_batch_3: truncated (an interrupted download?)", "download and unpack")
    assert not (tmp_path / "f.h5").exists()


def test_markdown_report_escapes_file_attributes(tmp_path):
    pytest.importorskip("matplotlib")
    path = _features(tmp_path / "f.h5", model="<script>alert(1)</script>", dataset="[x](javascript:alert(1))",
                     class_names=["<img src=x onerror=alert(1)>", "a|b", "c"])
    out = tmp_path / "r.md"
    r = CliRunner().invoke(main, ["report", "-f", str(path), "--out", str(out), "--methods", "joint,ncm", "-q"])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert "&lt;script&gt;" in text  # the model is shown, neutralised
    assert "<script" not in text and "<img" not in text
    assert "\\[x\\](javascript" in text and not re.search(r"(?<!\\)\]\(javascript", text)  # no link


def test_md_escape_neutralises_markup():
    from lt_rebalance.report import Cell, Table, _md_table

    t = Table("t", ["model"], [[Cell("<b>x</b> [a](http://e) | *y*\nz")]])
    row = _md_table(t).splitlines()[-1]
    assert row == r"| &lt;b&gt;x&lt;/b&gt; \[a\](http://e) \| \*y\* z |"


def test_a_file_declaring_terabytes_is_refused_before_reading(tmp_path):
    path = _features(tmp_path / "f.h5")
    with h5py.File(path, "r+") as f:
        for key in ("features", "labels"):
            del f[f"splits/test/{key}"]
        f.create_dataset("splits/test/features", shape=(2**38, D), dtype="float32")  # 4 TB, never written
        f.create_dataset("splits/test/labels", shape=(2**38,), dtype="int64")
        f["splits/test"].attrs["rows"] = 2**38
    size = path.stat().st_size
    assert size < 1 << 20
    r = CliRunner().invoke(main, ["info", str(path)])
    assert r.exit_code == 1
    _one_error(r, "/splits/test/features declares 274877906944 x 4 float32 (4.0 TB) but the file stores only "
                  "0 bytes of it")


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_npz_declaring_more_than_it_holds_is_refused(tmp_path):
    import zipfile

    header = tmp_path / "h.npy"
    with open(header, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**7, 10**5)})
        f.write(b"\0" * 64)
    npz = tmp_path / "a.npz"
    with zipfile.ZipFile(npz, "w") as z:
        z.write(header, "x_train.npy")
        z.writestr("y_train.npy", _npy(np.zeros(3, np.int64)))
    r = CliRunner().invoke(main, ["import", "--npz", str(npz), "--out", str(tmp_path / "f.h5")])
    assert r.exit_code == 1
    _one_error(r, "x_train declares shape (10000000, 100000) float32 (3.6 TB) but the archive holds only 64 bytes")
    assert not (tmp_path / "f.h5").exists()


def test_npz_that_expands_beyond_memory_is_refused(tmp_path, monkeypatch):
    from lt_rebalance import memory

    npz = tmp_path / "bomb.npz"
    np.savez_compressed(npz, x_train=np.zeros((2**20, 16), np.float32), y_train=np.zeros(2**20, np.int64))
    assert npz.stat().st_size < 2**20
    monkeypatch.setattr(memory, "available_memory", lambda: 32 * 2**20)
    r = CliRunner().invoke(main, ["import", "--npz", str(npz), "--out", str(tmp_path / "f.h5")])
    assert r.exit_code == 1
    _one_error(r, "bomb.npz expands to 72.0 MB (it declares x_train of shape (1048576, 16) float32, 64.0 MB) but "
                  "only 32.0 MB of memory is available")


@pytest.mark.parametrize("version", [1, 2])
def test_available_memory_reads_the_cgroup_limit(tmp_path, version):
    from lt_rebalance.memory import cgroup_available

    if version == 2:
        job = tmp_path / "slurm" / "job_7"
        job.mkdir(parents=True)
        (tmp_path / "slurm" / "memory.max").write_text("max\n")
        (job / "memory.max").write_text(f"{4 * 2**30}\n")
        (job / "memory.current").write_text(f"{2**30}\n")
        proc = "0::/slurm/job_7\n"
    else:
        job = tmp_path / "memory" / "slurm" / "job_7"
        job.mkdir(parents=True)
        (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
        (tmp_path / "memory" / "slurm" / "memory.limit_in_bytes").write_text(f"{2 * 2**30}\n")
        (tmp_path / "memory" / "slurm" / "memory.usage_in_bytes").write_text(f"{2**29}\n")
        (job / "memory.limit_in_bytes").write_text(f"{8 * 2**30}\n")
        (job / "memory.usage_in_bytes").write_text(f"{2**29}\n")
        proc = "4:memory:/slurm/job_7\n3:cpu:/\n"
    expected = 3 * 2**30 if version == 2 else 2 * 2**30 - 2**29  # the tightest limit of the job and its parents
    assert cgroup_available(tmp_path, proc) == expected
    assert cgroup_available(tmp_path, "0::/elsewhere\n") is None


# -- 3. silent wrong results ---------------------------------------------------------------------------
def test_memmap_maps_only_data_stored_in_the_file_itself(tmp_path):
    from lt_rebalance.store.reader import _memmap_rows

    main_file = _features(tmp_path / "f.h5")
    with h5py.File(tmp_path / "other.h5", "w") as o:
        o["x"] = np.full((8, D), 7.0, np.float32)
    with h5py.File(tmp_path / "other.h5", "r") as o:  # a dataset of another file (as an external link reaches)
        assert _memmap_rows(main_file, o["x"], 8) is None
    with h5py.File(main_file, "r") as f:  # its own contiguous data is still mapped, and right
        t = _memmap_rows(main_file, f["splits/train/features"], 21)
        np.testing.assert_array_equal(t.numpy(), _arrays()[0])


def _relabel(path: Path, split: str, labels: np.ndarray) -> None:
    with h5py.File(path, "r+") as f:
        del f[f"splits/{split}/labels"]
        f[f"splits/{split}/labels"] = labels


def test_fractional_labels_are_refused_naming_file_and_split(tmp_path):
    path = _features(tmp_path / "f.h5")
    y = _arrays()[1][1::2].astype(np.float64)
    y[0] = 0.5
    _relabel(path, "test", y)
    r = CliRunner().invoke(main, ["ncm", "-f", str(path)])
    assert r.exit_code == 1
    _one_error(r, "f.h5: split 'test': /splits/test/labels holds 1 value(s) that are not class indices (e.g. 0.5 "
                  "at row 0)", "write the file again with integer labels")
    y[0] = np.nan
    _relabel(path, "test", y)
    r = CliRunner().invoke(main, ["ncm", "-f", str(path)])
    _one_error(r, "split 'test'", "(e.g. nan at row 0)")


def test_float_labels_holding_integers_are_read_and_checked_not_called_damaged(tmp_path):
    path = _features(tmp_path / "f.h5")
    _relabel(path, "train", _arrays()[1].astype(np.float32))
    assert CliRunner().invoke(main, ["ncm", "-f", str(path)]).exit_code == 0
    r = CliRunner().invoke(main, ["check", str(path)])
    assert "damaged" not in r.output and "re-create" not in r.output.split("checksums")[-1].split("\n")[1], r.output
    assert "[pass] dtypes: /splits/train/labels stored as floats holding whole numbers" in r.output
    assert "[pass] counts = train label histogram" in r.output


def test_a_dataset_under_splits_is_not_a_split(tmp_path):
    path = _features(tmp_path / "f.h5")
    with h5py.File(path, "r+") as f:
        f["splits/notes"] = np.zeros(3)
    with FeatureStore(path) as s:
        assert sorted(s.splits) == ["test", "train", "val"]


def test_bytes_class_names_are_decoded(tmp_path):
    x, y = _arrays()
    npz = tmp_path / "a.npz"
    np.savez(npz, x_train=x, y_train=y, class_names=np.array([b"cat", b"dog", b"emu"]))
    r = CliRunner().invoke(main, ["import", "--npz", str(npz), "--out", str(tmp_path / "f.h5")])
    assert r.exit_code == 0, r.output
    with FeatureStore(tmp_path / "f.h5") as s:
        assert s.class_names == ["cat", "dog", "emu"]
    write_features(tmp_path / "g.h5", {"train": (x, y)}, class_names=[b"a", "b", np.bytes_(b"c")])
    with FeatureStore(tmp_path / "g.h5") as s:
        assert s.class_names == ["a", "b", "c"]


def test_nul_in_a_class_name_names_the_file_and_class(tmp_path):
    x, y = _arrays()
    with pytest.raises(FeatureFileError, match=r"g.h5: class name 1 \('d\\x00g'\) holds a NUL character"):
        write_features(tmp_path / "g.h5", {"train": (x, y)}, class_names=["cat", "d\0g", "emu"])


def test_fractional_counts_are_refused_on_write_and_read(tmp_path):
    x, y = _arrays()
    with pytest.raises(ValueError, match=r"counts must be whole numbers of training images; got 5.5 for class 1"):
        write_features(tmp_path / "g.h5", {"train": (x, y)}, counts=[12.0, 5.5, 3.0])
    assert not (tmp_path / "g.h5").exists()
    path = _features(tmp_path / "f.h5")
    with h5py.File(path, "r+") as f:
        del f["classes/counts"]
        f["classes/counts"] = np.array([12.0, 5.5, 3.0])
    with pytest.raises(FeatureFileError, match=r"/classes/counts must hold whole numbers .* got 5.5 for class 1"):
        FeatureStore(path)


def test_features_dtype_float64_returns_float64(tmp_path):
    import torch

    path = _features(tmp_path / "f.h5", dtype="float16")
    with FeatureStore(path) as s:
        x64 = s.features("train", dtype="float64")
        assert x64.dtype == torch.float64
        np.testing.assert_array_equal(x64.numpy(), _arrays()[0].astype(np.float16).astype(np.float64))
        assert s.features("train", dtype="stored").dtype == torch.float16
        with pytest.raises(ValueError, match="dtype must be one of"):
            s.features("train", dtype="int8")


def test_taunorm_refuses_nan_tau_at_fit():
    from lt_rebalance.heads import TauNorm

    with pytest.raises(ValueError, match="tau"):
        TauNorm(np.eye(C, D, dtype=np.float32), tau=float("nan")).fit()


def test_skip_bad_publishes_counts_without_the_skipped_images(tmp_path):
    from data_support import make_image_folder

    root = make_image_folder(tmp_path / "data", counts={"train": (4, 3, 2), "val": (1, 1, 1)})
    (root / "train" / "c0" / "001.png").write_bytes(b"not an image")
    out = tmp_path / "f.h5"
    r = CliRunner().invoke(main, ["extract", "--model", "tiny_cnn", "--random-init", "--data", "imagefolder",
                                  "--root", str(root), "--out", str(out), "--splits", "train,val", "--image-size", "8",
                                  "--workers", "0", "--skip-bad", "--quiet"])
    assert r.exit_code == 0, r.output
    with FeatureStore(out) as s:
        assert s.counts.tolist() == [3, 3, 2]
    r = CliRunner().invoke(main, ["check", str(out)])
    assert r.exit_code == 0, r.output


# -- 4. batch schedulers and shared machines ---------------------------------------------------------------
def test_sigterm_during_import_is_handled_like_ctrl_c(tmp_path, big_npz):
    from test_faults import _import_then, _sha, _temps

    out = tmp_path / "f.h5"
    proc, _, before = _import_then(signal.SIGTERM, big_npz, out)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert stderr.splitlines() == [f"Error: terminated (SIGTERM); {out} was not changed"] and stdout == ""
    assert _sha(out) == before and _temps(tmp_path) == []


def _extract_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lt_rebalance.cli", "extract", "--model", "tiny_cnn", "--random-init", "--data",
            "imagefolder", "--root", str(root), "--out", str(out), "--splits", "train,val", "--image-size", "8",
            "--batch-size", "1", "--device", "cpu", *extra]


def _signal_once(argv: list[str], ready, signum: int = signal.SIGTERM, tries: int = 3, group: bool = False
                 ) -> subprocess.Popen:
    """Start ``argv`` and send ``signum`` once ``ready()`` (to its whole process group with ``group``, as
    SLURM does); started again when it finished first."""
    for _ in range(tries):
        proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        deadline = time.monotonic() + 120
        while proc.poll() is None and not ready():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        if proc.poll() is None:
            os.killpg(proc.pid, signum) if group else proc.send_signal(signum)
            return proc
        proc.communicate()
    pytest.fail("the extraction finished before it could be signalled, three times")


@pytest.mark.parametrize("group", [False, True], ids=["main-process", "process-group"])
def test_sigterm_during_extract_with_workers_keeps_the_partial_and_releases_the_lock(tmp_path, group):
    from data_support import make_image_folder

    root = make_image_folder(tmp_path / "data", {"train": (30, 20), "val": (5, 5)})
    out = tmp_path / "f.h5"
    partial = Path(f"{out}.partial")

    def started():  # rows are written (a signal during the creation removes the half-created file)
        try:
            with h5py.File(partial, "r", locking=False) as f:
                return int(f["splits/train"].attrs.get("rows", 0)) > 0
        except (OSError, KeyError, RuntimeError):
            return False

    proc = _signal_once(_extract_argv(root, out, "--workers", "2"), started, group=group)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert stderr.splitlines() == [f"Error: terminated (SIGTERM); {out} was not changed; the rows written so far "
                                   f"are in {partial}: continue with --resume"], stderr
    assert not out.exists() and partial.exists() and not Path(f"{out}.lock").exists()
    assert subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True).stdout == b""  # no worker left
    done = subprocess.run(_extract_argv(root, out, "--workers", "0", "--resume"), env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_sigterm_stops_torchrun_and_its_ranks(tmp_path):
    from data_support import make_image_folder

    root = make_image_folder(tmp_path / "data", {"train": (240, 160), "val": (5, 5)})
    for attempt in range(5):
        out = tmp_path / f"f{attempt}.h5"

        def shards_writing(out: Path = out) -> bool:  # both ranks have written rows
            rows = []
            for p in tmp_path.glob(f"{out.name}.shard*.partial"):
                try:
                    with h5py.File(p, "r", locking=False) as f:
                        rows.append(int(f["splits/train"].attrs.get("rows", 0)))
                except (OSError, KeyError, RuntimeError):
                    rows.append(0)
            return len(rows) == 2 and min(rows) > 0

        proc = _signal_once(_extract_argv(root, out, "--workers", "0", "--gpus", "2"), shards_writing)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 143, stderr
        time.sleep(1)
        left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
        assert left == [], left  # torchrun and its ranks are gone: none can publish the file later
        if stderr.splitlines()[-1] == f"Error: terminated (SIGTERM); {out} was written completely":
            assert out.exists()  # signalled while rank 0 published: the message says so; try again
            continue
        assert stderr.splitlines()[-1].startswith(f"Error: terminated (SIGTERM); {out} was not changed"), stderr
        assert not out.exists()
        return
    pytest.fail("the extraction was always publishing when signalled")


def test_requeued_resume_of_a_complete_output_exits_0_saying_so(tmp_path):
    from data_support import imagefolder_extract_args as _args
    from data_support import make_image_folder

    root = make_image_folder(tmp_path / "data", {"train": (3, 2), "val": (1, 1)})
    out = tmp_path / "f.h5"
    assert CliRunner().invoke(main, ["extract", *_args(root, out)]).exit_code == 0
    stamp = out.stat().st_mtime_ns
    for extra in (["--resume"], ["--resume", "--overwrite"]):
        r = CliRunner().invoke(main, ["extract", *[a for a in _args(root, out) if a != "--quiet"], *extra])
        assert r.exit_code == 0, r.output
        assert f"{out} is already complete, extracted with the same settings: nothing to do" in r.output
        assert out.stat().st_mtime_ns == stamp  # nothing re-extracted
    r = CliRunner().invoke(main, ["extract", *_args(root, out), "--resume", "--json"])
    assert json.loads(r.stdout)["already_complete"] is True
    r = CliRunner().invoke(main, ["extract", *_args(root, out, "--seed", "5"), "--resume"])  # other settings
    assert r.exit_code == 1 and "already exists" in r.output


@pytest.mark.parametrize("error", [MemoryError("Unable to allocate 40.0 GiB for an array"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 42949672960 bytes")])
def test_out_of_memory_is_one_line_naming_max_memory(tmp_path, monkeypatch, error):
    import lt_rebalance.runners.features as features

    feats = _features(tmp_path / "f.h5")

    def oom(*a, **k):
        raise error

    monkeypatch.setattr(features, "run_ncm", oom)
    r = CliRunner().invoke(main, ["ncm", "-f", str(feats)])
    assert r.exit_code == 1
    _one_error(r, "out of memory", "allocate", "--max-memory")


def test_a_live_temporary_file_of_another_pid_namespace_is_kept(tmp_path):
    from lt_rebalance import outputs

    name = f".g.h5.ltr-{outputs._HOST}-{2**22 + 12345}-0123abcd.tmp"  # a pid that does not run here
    tmp = tmp_path / name
    outputs.hold_temp(tmp)  # its writer (in another namespace) holds the lock
    try:
        assert outputs.remove_stale_temps(tmp_path) == [] and tmp.exists()
    finally:
        outputs.release_temp(tmp)
    assert outputs.remove_stale_temps(tmp_path) == [tmp] and not tmp.exists()  # dead writer: removed


def test_writers_hold_their_temporary_file_while_writing(tmp_path):
    from lt_rebalance import outputs

    seen = []

    def write(tmp):
        tmp.write_text("x")
        seen.append(outputs._locked_by_writer(str(tmp)) or outputs.held_temp(tmp))

    outputs.atomic_write(tmp_path / "r.json", write)
    x, y = _arrays()
    write_features(tmp_path / "f.h5", {"train": (x, y)})  # h5py writes into the held temporary file
    assert seen == [True] and not outputs._held


def test_hidden_folders_are_not_classes(tmp_path):
    from data_support import make_image_folder
    from lt_rebalance.extract.datasets.imagefolder import load_imagefolder_splits

    root = make_image_folder(tmp_path / "data", {"train": (2, 2), "val": (1, 1)})
    for split in ("train", "val"):
        (root / split / ".ipynb_checkpoints").mkdir()
    (root / "train" / "c0" / ".hidden.png").write_bytes(b"")
    sources, counts, names = load_imagefolder_splits(root, ["train", "val"])
    assert names == ["c0", "c1"] and counts.tolist() == [2, 2]


def test_a_fifo_among_the_images_does_not_hang(tmp_path):
    from data_support import make_image_folder
    from lt_rebalance.extract.datasets.imagefolder import load_imagefolder_splits
    from lt_rebalance.extract.datasets.sources import FileSource

    root = make_image_folder(tmp_path / "data", {"train": (2, 2), "val": (1, 1)})
    os.mkfifo(root / "train" / "c0" / "pipe.png")
    sources, counts, _ = load_imagefolder_splits(root, ["train", "val"])
    assert counts.tolist() == [2, 2]  # not an image: left out
    previous = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("reading a FIFO hung"))
    signal.alarm(20)
    try:
        with pytest.raises(OSError, match="pipe.png is not a regular file"):  # a listed FIFO: an unreadable image
            FileSource(root, ["train/c0/pipe.png"], [0]).load(0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_non_utf8_image_name_is_refused_before_extraction(tmp_path):
    from data_support import imagefolder_extract_args as _args
    from data_support import make_image_folder

    root = make_image_folder(tmp_path / "data", {"train": (2, 2), "val": (1, 1)})
    good = root / "train" / "c0" / "000.png"
    os.rename(good, os.path.join(os.fsencode(root / "train" / "c0"), b"caf\xe9.png"))
    out = tmp_path / "f.h5"
    r = CliRunner().invoke(main, ["extract", *_args(root, out)])
    assert r.exit_code == 1
    _one_error(r, "c0/caf\\xe9.png: the name is not valid UTF-8; rename it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no .partial that could never finish


def test_a_file_open_by_an_swmr_writer_is_not_called_damaged(tmp_path):
    src = _features(tmp_path / "src.h5")
    path = tmp_path / "f.h5"
    with h5py.File(src) as a, h5py.File(path, "w", libver="latest") as b:
        for k, v in a.attrs.items():
            b.attrs[k] = v
        for k in a:
            a.copy(a[k], b, k)
    writer = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time\n"
                               f"f = h5py.File({str(path)!r}, 'r+', libver='latest'); f.swmr_mode = True\n"
                               "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        r = CliRunner().invoke(main, ["info", str(path)])
    finally:
        writer.kill()
        writer.wait()
    assert r.exit_code == 1
    line = _one_error(r, "open for writing by another HDF5 writer (an SWMR writer", "h5clear -s")
    assert "damaged" not in line and "re-create" not in line


def test_an_empty_train_split_is_named(tmp_path):
    x, y = _arrays()
    path = tmp_path / "f.h5"
    write_features(path, {"train": (x[:0], y[:0]), "test": (x, y)}, counts=[12, 6, 3])
    r = CliRunner().invoke(main, ["ncm", "-f", str(path)])
    assert r.exit_code == 1
    _one_error(r, f"split 'train' of {path} has no rows, and this method trains on it")


def test_short_counts_are_not_blamed_on_the_head_alone(tmp_path):
    path = _features(tmp_path / "f.h5")
    with h5py.File(path, "r+") as f:
        del f["classes/counts"]
        f["classes/counts"] = np.array([12, 6])
        for s in ("train", "val", "test"):
            y = f[f"splits/{s}/labels"][...]
            f[f"splits/{s}/labels"][...] = np.minimum(y, 1)
    with pytest.raises(FeatureFileError, match=r"the classifier has 3 classes but /classes/counts lists 2"):
        FeatureStore(path)


# -- 5. the first hour ------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


def test_info_does_not_import_torch(tmp_path):
    path = _features(tmp_path / "f.h5")
    code = ("import sys\nfrom click.testing import CliRunner\nfrom lt_rebalance.cli import main\n"
            f"r = CliRunner().invoke(main, ['info', {str(path)!r}])\n"
            "assert r.exit_code == 0, r.output\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_license_and_cpu_install_are_documented():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "license = MIT" in (ROOT / "setup.cfg").read_text()
    readme = (ROOT / "README.md").read_text()
    install = readme.split("## Install and run", 1)[1].split("\n## ", 1)[0]
    assert "CPU build of torch" in install and "/whl/cpu" in install


def _all_help_texts():
    from lt_rebalance.cli import COMMANDS

    for name in COMMANDS:
        r = CliRunner().invoke(main, [name, "--help"])
        assert r.exit_code == 0, (name, r.output)
        yield name, r.output
    for sub in ("tau-curve", "norms", "per-class", "compare"):
        yield f"plot {sub}", CliRunner().invoke(main, ["plot", sub, "--help"]).output


def test_help_does_not_show_the_int64_limit():
    shown = [name for name, text in _all_help_texts() if "9223372036854775807" in text]
    assert shown == []
    r = CliRunner().invoke(main, ["compare", "--help"])
    assert "the file's shot_many, else 100]" in r.output and "x>=0" in r.output


def test_existing_output_wording_library_vs_cli(tmp_path):
    from lt_rebalance.outputs import check_output

    out = tmp_path / "r.json"
    out.write_text("{}")
    with pytest.raises(FileExistsError) as e:
        check_output(out)
    assert str(e.value) == f"{out} already exists; pass overwrite=True to replace it"
    feats = _features(tmp_path / "f.h5")
    r = CliRunner().invoke(main, ["ncm", "-f", str(feats), "--save", str(out)])
    assert r.exit_code == 1
    assert _one_error(r) == f"Error: {out} already exists; pass --overwrite to replace it"


def test_few_steps_warning_is_filtered_in_tests_but_printed_by_the_cli(tmp_path):
    import warnings

    assert "ignore::lt_rebalance.heads.training.FewStepsWarning" in (ROOT / "pyproject.toml").read_text()
    feats = _features(tmp_path / "f.h5")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*optimiser steps")  # as the test configuration does
        r = CliRunner().invoke(main, ["crt", "-f", str(feats), "--epochs", "2", "-q"])
    assert r.exit_code == 0, r.output
    assert "warning: 2 epochs of" in r.output and "optimiser steps" in r.output


def test_a_feature_option_given_twice_is_refused(tmp_path):
    a, b = _features(tmp_path / "a.h5"), _features(tmp_path / "b.h5")
    r = CliRunner().invoke(main, ["ncm", "-f", str(a), "-f", str(b)])
    assert r.exit_code == 2
    _one_error(r, "given 2 times", "reads one feature file")


def test_report_refuses_an_out_suffix_it_cannot_write(tmp_path):
    feats = _features(tmp_path / "f.h5")
    r = CliRunner().invoke(main, ["report", "-f", str(feats), "--out", str(tmp_path / "r.pdf")])
    assert r.exit_code == 2
    _one_error(r, "r.pdf: the report is HTML (.html) or Markdown (.md), not .pdf")
    assert not (tmp_path / "r.pdf").exists()


def test_one_failing_image_under_gpus_2_is_one_line(tmp_path):
    from data_support import make_image_folder

    root = make_image_folder(tmp_path / "data", {"train": (6, 4), "val": (2, 2)})
    (root / "train" / "c1" / "001.png").write_bytes(b"not an image")
    out = tmp_path / "f.h5"
    r = subprocess.run(_extract_argv(root, out, "--workers", "0", "--gpus", "2", "--quiet"), env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [ln for ln in r.stderr.splitlines() if ln.startswith("Error: ")], r.stderr
    assert len(r.stderr.splitlines()) == 1 and "unreadable image(s)" in r.stderr and "--skip-bad" in r.stderr


def test_resume_after_a_multi_process_failure_keeps_the_finished_shard(tmp_path):
    from data_support import make_image_folder

    root = make_image_folder(tmp_path / "data", {"train": (6, 4), "val": (2, 2)})
    bad = root / "train" / "c1" / "001.png"  # in rank 1's shard
    good = bad.read_bytes()
    bad.write_bytes(b"not an image")
    out = tmp_path / "f.h5"
    argv = _extract_argv(root, out, "--workers", "0", "--gpus", "2", "--quiet")
    first = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1, first.stderr
    bad.write_bytes(good)
    again = subprocess.run([*argv, "--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    with FeatureStore(out) as s:
        assert s.splits["train"].rows == 10 and s.counts.tolist() == [6, 4]


def test_the_demo_reproduce_commands_plot_into_out():
    import shlex

    from lt_rebalance.commands.demo_pipeline import DemoConfig, reproduce_commands

    plots = [shlex.split(c) for c in reproduce_commands(Path("/data/my demo"), DemoConfig()) if c.startswith("ltr plot")]
    assert len(plots) == 4
    for argv in plots:
        target = argv[argv.index("--out") + 1]
        assert target.startswith("/data/my demo/") and target.endswith(".png") and "--overwrite" in argv


@pytest.mark.parametrize("argv", [["plot", "compare"], ["plot", "compare", "-f", "feats.h5"]])
def test_plot_compare_says_it_takes_results(argv):
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 2
    _one_error(r, "`ltr plot compare` draws a results file", "ltr compare -f FEATURES --out results.json",
               "--results results.json")


def test_compare_takes_the_feature_file_positionally(tmp_path):
    feats = _features(tmp_path / "f.h5")
    a = CliRunner().invoke(main, ["compare", str(feats), "--methods", "joint,ncm", "--json", "-q"])
    b = CliRunner().invoke(main, ["compare", "-f", str(feats), "--methods", "joint,ncm", "--json", "-q"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output

    def rows(r):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in json.loads(r.stdout)["rows"]]

    assert rows(a) == rows(b)
    r = CliRunner().invoke(main, ["compare"])
    assert r.exit_code == 2
    _one_error(r, "Missing feature file", "compare feats.h5`")

"""Faults from outside (issue 13): Ctrl-C and SIGKILL during a write, read-only and full file systems.

The signal tests run ``ltr import`` of a ~100 MB ``.npz`` in a real subprocess and signal it once its
temporary file is being written. The file-system tests mount a small tmpfs (read-only, or filled up)
and skip when that is not possible (not root, no mount permission); they unmount in teardown.
"""
from __future__ import annotations

import errno
import gc
import hashlib
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lt_rebalance import outputs
from lt_rebalance.cli import main
from lt_rebalance.store import write_features

pytestmark = pytest.mark.usefixtures("torch_one_thread")
LTR = [sys.executable, "-m", "lt_rebalance.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _small_features(path: Path) -> Path:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), [12, 6, 3])
    x = (rng.normal(size=(len(y), 4)) + 3 * y[:, None]).astype(np.float32)
    write_features(path, {"train": (x, y), "val": (x[::2], y[::2]), "test": (x[1::2], y[1::2])},
                   weight=rng.normal(size=(3, 4)).astype(np.float32), bias=np.zeros(3, np.float32), overwrite=True,
                   shot_many=10, shot_few=5)  # thresholds that fit 12 / 6 / 3 rows: no empty-group warning
    return path


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def _size(path: Path) -> int:
    """``path``'s size; 0 once it is gone (the import published it between the listing and this look)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _import_then(signum: int, npz: Path, out: Path) -> tuple[subprocess.Popen, str, str]:
    """Write a small feature file at ``out``, start ``ltr import --overwrite`` into it and send ``signum``
    once the temporary file has data; the process, the temporary file's name and ``out``'s old SHA-256.

    On a loaded machine the import can finish between two looks at the folder; that run is not a
    test of the signal, so it is started again with a fresh ``out`` (three tries at most).
    """
    for _ in range(3):
        before = _sha(_small_features(out))
        proc = subprocess.Popen([*LTR, "import", "--npz", str(npz), "--out", str(out), "--overwrite"], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while proc.poll() is None:
            assert time.monotonic() < deadline
            busy = [p for p in out.parent.glob(f".{out.name}.*.tmp") if _size(p) > 1 << 20]
            if busy:
                proc.send_signal(signum)
                return proc, busy[0].name, before
            time.sleep(0.002)
        proc.communicate()
    pytest.fail("the import finished before it could be signalled, three times")


def test_ctrl_c_during_import_stops_with_one_line_and_changes_nothing(tmp_path, big_npz):
    out = tmp_path / "f.h5"
    proc, _, before = _import_then(signal.SIGINT, big_npz, out)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.splitlines() == [f"Error: interrupted; {out} was not changed"] and stdout == ""
    assert _sha(out) == before and _temps(tmp_path) == []


def test_sigkill_leaves_a_temporary_file_that_the_next_write_removes(tmp_path, big_npz):
    out = tmp_path / "f.h5"
    proc, name, before = _import_then(signal.SIGKILL, big_npz, out)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and _sha(out) == before
    assert _temps(tmp_path) == [name] and f"-{proc.pid}-" in name  # recognisable: the dead writer's pid
    # what the next write must keep: a live process's temporary file, another host's, a user's file
    live = outputs.temp_path(tmp_path / "g.h5").name
    other_host = f".g.h5.ltr-zzzzzz-{proc.pid}-0123abcd.tmp".replace("zzzzzz", "0" * 6 if outputs._HOST != "0" * 6 else "1" * 6)
    user = ".notes.tmp"
    for n in (live, other_host, user):
        (tmp_path / n).write_text("keep")
    r = CliRunner().invoke(main, ["ncm", "-f", str(out), "--save", str(tmp_path / "ncm.pt"), "-q"])
    assert r.exit_code == 0, r.output
    assert _temps(tmp_path) == sorted([live, other_host, user])


def test_a_ctrl_c_that_h5py_swallows_still_stops_the_write(tmp_path):
    """h5py runs Python code in weakref callbacks, where KeyboardInterrupt is only printed: simulated here."""
    class Obj:
        pass

    def write(tmp: Path) -> None:
        tmp.write_text("half")
        obj = Obj()
        ref = weakref.ref(obj, lambda _: (_ for _ in ()).throw(KeyboardInterrupt))  # noqa: F841
        del obj  # the callback raises; Python reports it as "Exception ignored in" and goes on
        tmp.write_text("complete")

    out = tmp_path / "r.json"
    out.write_text("old")
    with pytest.raises(KeyboardInterrupt, match=f"interrupted; {out} was not changed"):
        outputs.atomic_write(out, write, overwrite=True)
    assert out.read_text() == "old" and _temps(tmp_path) == []


def test_publish_never_replaces_a_file_that_appeared_meanwhile(tmp_path):
    out = tmp_path / "r.json"

    def write(tmp: Path) -> None:
        tmp.write_text("ours")
        out.write_text("someone else's")  # another process, while we were writing

    with pytest.raises(FileExistsError, match="appeared while this command ran"):
        outputs.atomic_write(out, write)
    assert out.read_text() == "someone else's" and _temps(tmp_path) == []
    outputs.atomic_write(out, lambda tmp: tmp.write_text("ours"), overwrite=True)
    assert out.read_text() == "ours"


def test_extract_does_not_replace_a_file_that_appeared_while_it_ran(tmp_path):
    import torch
    from lt_rebalance.extract.backbones import create_backbone
    from lt_rebalance.extract.datasets import ArraySource, reference_config
    from lt_rebalance.extract.run import ExtractConfig, extract_features

    from lt_rebalance.store import FeatureStore

    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    labels = np.array([0, 0, 0, 1, 1, 2])
    torch.manual_seed(0)
    model = create_backbone("tiny_cnn", num_classes=3)
    out = tmp_path / "f.h5"

    def appear(n: int) -> None:
        if not out.exists():
            out.write_text("someone else's")

    def run(config: ExtractConfig, progress=None):
        return extract_features(model, {"train": ArraySource(images, labels)}, out, counts=np.bincount(labels),
                                transform=reference_config("cifar", 8), config=config, progress=progress)

    with pytest.raises(FileExistsError, match="appeared while the extraction ran; not replacing it"):
        run(ExtractConfig(batch_size=2), appear)
    assert out.read_text() == "someone else's"
    assert FeatureStore(f"{out}.partial").splits["train"].rows == 6  # the work is kept, complete
    run(ExtractConfig(batch_size=2, resume=True, overwrite=True))  # as the message says
    assert FeatureStore(out).splits["train"].rows == 6 and not Path(f"{out}.partial").exists()


@pytest.mark.parametrize("spelling", ["same", "relative", "symlink", "hardlink"])
def test_output_equal_to_an_input_is_refused_however_spelled(tmp_path, monkeypatch, spelling):
    feats = _small_features(tmp_path / "f.h5")
    before = _sha(feats)
    monkeypatch.chdir(tmp_path)
    out = {"same": str(feats), "relative": "./sub/../f.h5", "symlink": "link.h5", "hardlink": "hard.h5"}[spelling]
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        os.symlink("f.h5", "link.h5")
    if spelling == "hardlink":
        os.link("f.h5", "hard.h5")
    for argv in (["ncm", "-f", str(feats), "--save", out, "--overwrite"],
                 ["compare", "-f", "f.h5", "--methods", "joint", "--out", out, "--overwrite"],
                 ["plot", "tau-curve", "-f", str(feats), "--out", out, "--overwrite"]):
        r = CliRunner().invoke(main, argv)
        assert r.exit_code == 1 and "is the same file as the input" in r.output, r.output
        assert r.output.count("\n") == 1
    assert _sha(feats) == before


# -- file systems -----------------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(name, options)`` mounts a tmpfs under tmp_path (skips when mounting is not possible)."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        target = tmp_path / name
        target.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        if subprocess.run(["umount", str(target)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _fill(folder: Path) -> None:
    """Fill the file system of ``folder`` up to the last byte."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def _cases(d: Path, m: Path) -> dict[str, list[str]]:
    """command -> argv writing into ``m`` (inputs in ``d``)."""
    from test_bad_inputs import _extract_args, _tiny_images

    feats = str(_small_features(d / "f.h5"))
    results = d / "r.json"
    results.write_text('{"rows": [{"method": "joint", "test": {"many": 0.5, "medium": 0.5, "few": 0.5, "all": 0.5}}]}')
    np.savez(d / "a.npz", x_train=np.ones((4000, 64), np.float32), y_train=np.arange(4000) % 3)
    extract = _extract_args(d, out="f.h5")
    extract[extract.index("--out") + 1] = str(m / "f.h5")
    _tiny_images(d / "data")
    return {
        "ncm-save": ["ncm", "-f", feats, "--save", str(m / "ncm.pt")],
        "crt-save": ["crt", "-f", feats, "--epochs", "1", "--batch-size", "4", "--save", str(m / "crt.pt")],
        "compare-out": ["compare", "-f", feats, "--methods", "joint,ncm", "--batch-size", "4", "--out", str(m / "r.json")],
        "import": ["import", "--npz", str(d / "a.npz"), "--out", str(m / "f.h5")],
        "plot": ["plot", "compare", "--results", str(results), "--out", str(m / "c.png")],
        "extract": extract,
        "demo": ["demo", "--out", str(m / "demo"), "--quick"],
    }


CASE_IDS = ["ncm-save", "crt-save", "compare-out", "import", "plot", "extract", "demo"]


def _needs(case: str) -> None:
    if case == "plot":
        pytest.importorskip("matplotlib")
    if case == "demo":
        pytest.importorskip("sklearn")


@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("fs", ["read-only", "full"])
def test_os_faults_end_in_one_error_line(tmp_path, tmpfs, fs, case):
    _needs(case)
    d = tmp_path / "in"
    d.mkdir()
    m = tmpfs("m", "size=256k,ro" if fs == "read-only" else "size=256k")
    argv = _cases(d, m)[case]
    if fs == "full":
        _fill(m)
    before = sorted(p.name for p in m.iterdir())
    r = CliRunner().invoke(main, argv)
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), \
        (repr(r.exception), r.output)
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 1 and len(errors) == 1, r.output
    cause = "Read-only file system (EROFS)" if fs == "read-only" else "No space left on device (ENOSPC)"
    assert cause in errors[0] and str(m) in errors[0], errors[0]
    assert sorted(p.name for p in m.iterdir()) == before  # no temporary, partial or lock file left


def test_read_only_folder_fails_before_training(tmp_path, tmpfs, monkeypatch):
    """The output check runs before the work: crt never starts training on a read-only folder."""
    import lt_rebalance.runners.trained as trained

    m = tmpfs("ro", "size=64k,ro")
    feats = _small_features(tmp_path / "f.h5")
    monkeypatch.setattr(trained, "run_crt", lambda *a, **k: pytest.fail("trained before checking the output"))
    r = CliRunner().invoke(main, ["crt", "-f", str(feats), "--save", str(m / "crt.pt")])
    assert r.exit_code == 1 and r.output.startswith(f"Error: cannot write {m / 'crt.pt'}: Read-only file system")


# -- Ctrl-C in the other writers ---------------------------------------------------------------------
def test_ctrl_c_during_extract_keeps_the_partial_for_resume(tmp_path, monkeypatch):
    """A real SIGINT once the first batch is written; the extract command itself (also run as
    ``python -m lt_rebalance.extract``, without the ``ltr`` group) says so in one line, exit 130."""
    from data_support import imagefolder_extract_args as _args
    from data_support import make_image_folder
    from lt_rebalance.extract.cli import extract

    from lt_rebalance.store import FeatureFileWriter

    root = make_image_folder(tmp_path / "data", {"train": (4, 2), "val": (2, 2)})
    out = tmp_path / "f.h5"
    append = FeatureFileWriter.append

    def append_then_ctrl_c(self, *a, **k):
        rows = append(self, *a, **k)
        os.kill(os.getpid(), signal.SIGINT)  # from the writer thread; Python raises it in the main thread
        return rows

    monkeypatch.setattr(FeatureFileWriter, "append", append_then_ctrl_c)
    r = CliRunner().invoke(extract, _args(root, out))
    assert r.exit_code == 130, r.output
    assert r.output == (f"Error: interrupted; {out} was not changed; the rows written so far are in "
                        f"{out}.partial: continue with --resume\n")
    assert not out.exists() and not Path(f"{out}.lock").exists() and _temps(tmp_path) == []
    monkeypatch.setattr(FeatureFileWriter, "append", append)
    # the interrupted run's traceback (held by its result) may keep its file handle until collected;
    # a real resume is a new process, so collect it here rather than race the garbage collector
    del r
    gc.collect()
    r = CliRunner().invoke(main, ["extract", *_args(root, out), "--resume"])
    assert r.exit_code == 0, r.output


def test_ctrl_c_during_training_says_nothing_was_written(tmp_path, monkeypatch):
    import lt_rebalance.runners.features as features

    feats = _small_features(tmp_path / "f.h5")
    before = sorted(p.name for p in tmp_path.iterdir())

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(features, "run_ncm", interrupted)
    r = CliRunner().invoke(main, ["ncm", "-f", str(feats), "--save", str(tmp_path / "ncm.pt")])
    assert r.exit_code == 130 and r.output == "Error: interrupted; no output was written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_ctrl_c_during_demo_leaves_a_folder_that_overwrite_replaces(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    import lt_rebalance.commands.demo_pipeline as demo

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "train_stage1", interrupted)  # after the images were written
    out = tmp_path / "d"
    r = CliRunner().invoke(main, ["demo", "--out", str(out), "--quick", "--quiet"])
    assert r.exit_code == 130
    assert r.output == f"Error: interrupted; {out} holds an unfinished demo: rerun with --overwrite to replace it\n"
    (out / "mine.txt").write_text("keep me")
    demo.prepare_out(out, True, ["results.json"])  # what --overwrite does first
    assert sorted(p.name for p in out.iterdir()) == [demo.MANIFEST, "mine.txt"]

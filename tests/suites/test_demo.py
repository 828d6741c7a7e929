"""ltr demo end to end on the reduced setting, and its refusals and install hints."""
import importlib.util
import json

import pytest
from click.testing import CliRunner

from lt_rebalance.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "ltr-demo"
    r = CliRunner().invoke(main, ["demo", "--out", str(out), "--epochs", "2", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


@needs_sklearn
def test_results_have_every_method_and_group(demo_run):
    from lt_rebalance.registry import DEFAULT_METHODS

    out, result = demo_run
    assert json.loads((out / "results.json").read_text()) == result
    assert [r["method"] for r in result["rows"]] == list(DEFAULT_METHODS)
    for row in result["rows"]:
        for split in ("val", "test"):
            assert all(row[split][g] is not None for g in ("many", "medium", "few", "all")), (row["method"], split)
    d = result["demo"]
    assert all(n > 0 for n in d["groups"].values()) and sum(d["groups"].values()) == 10
    assert d["extract"]["rows"] == {"train": sum(d["counts"]), "val": 300, "test": 400}
    assert result["summary"] and result["reproduce"][0].startswith("ltr extract --model tiny_cnn --data imagefolder")


@needs_sklearn
def test_outputs_written(demo_run):
    from lt_rebalance.store import FeatureStore

    out, result = demo_run
    for name in ("stage1.pth", "features.h5", "crt.pt", "results.json"):
        assert (out / name).stat().st_size > 0
    store = FeatureStore(out / "features.h5")
    assert store.has_head and store.attrs["model"] == "tiny_cnn" and store.attrs["checkpoint_sha256"]
    if result["demo"]["plots"]:
        from test_plots import SIZE, png_size

        assert sorted(p.rsplit("/", 1)[-1] for p in result["demo"]["plots"]) == [
            "compare.png", "norms.png", "per-class.png", "tau-curve.png"]
        assert all(png_size(out / p.rsplit("/", 1)[-1]) == SIZE for p in result["demo"]["plots"])


@needs_sklearn
def test_plot_commands_on_demo_output(demo_run, tmp_path):
    pytest.importorskip("matplotlib")
    out, _ = demo_run
    r = CliRunner().invoke(main, ["plot", "norms", "-f", str(out / "features.h5"), "--head", str(out / "crt.pt"),
                                  "--many", "40", "--few", "10", "--batch-size", "32", "--out", str(tmp_path / "n.png"), "-q"])
    assert r.exit_code == 0, r.output


@needs_sklearn
def test_existing_out_is_refused(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    r = CliRunner().invoke(main, ["demo", "--out", str(out), "--quick"])
    assert r.exit_code == 1 and "exists; pass --overwrite" in r.output and r.output.count("\n") == 1
    r = CliRunner().invoke(main, ["demo", "--out", str(out), "--quick", "--overwrite"])
    assert r.exit_code == 1 and "no .ltr-demo-manifest.json: the demo did not write it" in r.output
    assert (out / "mine.txt").read_text() == "keep me"


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@needs_sklearn
def test_manifest_lists_every_file_the_demo_wrote(demo_run):
    from lt_rebalance.commands.demo_pipeline import MANIFEST

    out, _ = demo_run
    listed = set(json.loads((out / MANIFEST).read_text())["files"])
    assert set(_files(out)) - {MANIFEST} <= listed
    assert sum(p.startswith("images/") for p in listed) == sum(p.startswith("images/") for p in _files(out)) > 300


@needs_sklearn
def test_overwrite_keeps_the_users_files(demo_run, tmp_path):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(demo_run[0], out)
    (out / "mine.txt").write_text("keep me")
    (out / "notes").mkdir()
    (out / "notes" / "crt.pt").write_text("mine too")
    before = (out / "features.h5").stat().st_mtime_ns
    r = CliRunner().invoke(main, ["demo", "--out", str(out), "--epochs", "1", "--overwrite", "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    assert (out / "mine.txt").read_text() == "keep me" and (out / "notes" / "crt.pt").read_text() == "mine too"
    assert (out / "features.h5").stat().st_mtime_ns != before and json.loads(r.stdout)["demo"]["stage1_epochs"] == 1


def _previous_run(out, listed):
    from lt_rebalance.commands.demo_pipeline import MANIFEST, MANIFEST_FORMAT

    for rel in listed:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("demo")
    (out / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": listed}))


def test_overwrite_deletes_only_listed_files(tmp_path):
    from lt_rebalance.commands.demo_pipeline import MANIFEST, prepare_out

    out = tmp_path / "old"
    _previous_run(out, ["images/train/0/0001.png", "images/val/3/0002.png", "results.json", "stage1.pth"])
    (out / "mine.txt").write_text("keep me")
    prepare_out(out, True, ["images/test/1/0005.png", "crt.pt"])
    assert _files(out) == [MANIFEST, "mine.txt"] and not (out / "images").exists()
    assert json.loads((out / MANIFEST).read_text())["files"] == ["crt.pt", "images/test/1/0005.png"]


@pytest.mark.parametrize("user_file, message", [
    ("images/train/0/mine.png", "which the extraction would read as images"),
    ("images/val/7", "which the extraction would read as images"),  # a folder: a class of its own
])
def test_overwrite_refuses_user_files_among_the_images(tmp_path, user_file, message):
    from lt_rebalance.commands.demo_pipeline import prepare_out

    out = tmp_path / "old"
    _previous_run(out, ["images/train/0/0001.png", "results.json"])
    (out / user_file).parent.mkdir(parents=True, exist_ok=True)
    (out / user_file).mkdir() if "." not in user_file else (out / user_file).write_text("mine")
    before = _files(out)
    with pytest.raises(FileExistsError, match=message):
        prepare_out(out, True, ["results.json"])
    assert _files(out) == before


def test_overwrite_refuses_a_manifest_pointing_outside(tmp_path):
    from lt_rebalance.commands.demo_pipeline import MANIFEST, MANIFEST_FORMAT, prepare_out

    (tmp_path / "outside.txt").write_text("keep me")
    out = tmp_path / "old"
    _previous_run(out, ["results.json"])
    (out / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": ["results.json", "../outside.txt"]}))
    with pytest.raises(FileExistsError, match="not a manifest written by `ltr demo`"):
        prepare_out(out, True, ["results.json"])
    assert (tmp_path / "outside.txt").read_text() == "keep me" and (out / "results.json").exists()


@needs_sklearn
def test_reproduce_commands_give_the_demo_numbers(demo_run, tmp_path):
    """The printed `ltr crt` and `ltr compare` commands use the demo's shot groups and settings."""
    import shlex

    out, result = demo_run
    rows = {r["method"]: r for r in result["rows"]}
    by_name = {c.split()[1]: shlex.split(c)[1:] for c in result["reproduce"]}
    crt = by_name["crt"]
    crt[crt.index("--save") + 1] = str(tmp_path / "crt.pt")
    r = CliRunner().invoke(main, [*crt, "--json", "-q"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    for split in ("val", "test"):
        assert doc[split] == rows["crt"][split], split  # same thresholds (40/10), seed and schedule
    cmp = by_name["compare"]
    cmp[cmp.index("--out") + 1] = str(tmp_path / "results.json")
    r = CliRunner().invoke(main, [*cmp, "--methods", "joint,ncm", "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["thresholds"] == {"many": 40, "few": 10}
    assert [row["test"] for row in json.loads(r.stdout)["rows"]] == [rows["joint"]["test"], rows["ncm"]["test"]]

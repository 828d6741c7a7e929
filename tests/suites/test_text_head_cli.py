"""``ltr text-head`` with random-initialised open_clip towers (offline), the /text_head group, its
bad inputs, and the text methods in ``compare``."""
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from lt_rebalance.cli import main
from lt_rebalance.integrity import verify_checksums
from lt_rebalance.store import FeatureStore, write_features

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

ARCH, DIM = "ViT-B-32", 512  # a shipped configuration (random weights)
TINY, TINY_DIM = "ltr-test-tiny", 32  # a two-layer tower registered below: fast bad-input tests
NAMES = ["cat", "dog", "fire_truck", "apple"]


@pytest.fixture(scope="module", autouse=True)
def tiny_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    (folder / f"{TINY}.json").write_text(json.dumps({
        "embed_dim": TINY_DIM,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }))
    open_clip.add_model_config(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random ViT-B-32 saved as a local checkpoint (what --pretrained PATH loads) and the model itself."""
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, pretrained=None).eval()
    path = tmp_path_factory.mktemp("ckpt") / "random-vit-b-32.pt"
    torch.save(model.state_dict(), path)
    return path, model


def _features(path, dim=DIM, names=NAMES, model=ARCH, val=True):
    rng = np.random.default_rng(0)
    C = len(names) if names else 4

    def split(n):
        y = np.arange(n) % C
        return rng.normal(size=(n, dim)).astype(np.float32), y

    splits = {"train": split(40), "test": split(16)}
    if val:
        splits["val"] = split(16)
    write_features(path, splits, class_names=names, model=model)
    return path


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_text_head_matches_an_independent_prompt_ensemble(tmp_path, checkpoint):
    ckpt, model = checkpoint
    f = _features(tmp_path / "f.h5")
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a {}.\nan origami {}.\n")
    r = _run("text-head", "--features", f, "--model", ARCH, "--pretrained", ckpt, "--templates", templates, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["forced"] is False
    tok = open_clip.get_tokenizer(ARCH)
    per_template = []
    with torch.no_grad():
        for t in ("a photo of a {}.", "an origami {}."):
            e = model.encode_text(tok([t.format(n.replace("_", " ")) for n in NAMES])).double().numpy()
            per_template.append(e / np.linalg.norm(e, axis=1, keepdims=True))
    mean = np.mean(per_template, axis=0)
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    with h5py.File(f, "r") as h:
        g = h["text_head"]
        np.testing.assert_allclose(g["weight"][...], expected, atol=1e-5)
        assert g["weight"].dtype == np.float32
        assert g.attrs["logit_scale"] == pytest.approx(float(model.logit_scale.detach().exp()))
        assert json.loads(g.attrs["templates"]) == ["a photo of a {}.", "an origami {}."]
        assert g.attrs["model"] == ARCH and g.attrs["pretrained"] == str(ckpt)
        report = verify_checksums(h)
        assert "/text_head/weight" in report.verified and not report.mismatched and not report.missing
    info = json.loads(_run("info", f, "--json").stdout)
    assert info["text_head"]["templates"] == 2 and info["text_head"]["model"] == ARCH
    assert "[pass] text head" in _run("check", f).output
    with h5py.File(f, "r+") as h:  # damage it: ltr check finds it (checksum and unit rows)
        h["text_head/weight"][0] *= 2
    out = _run("check", f).output
    assert "[FAIL] text head: 1 row(s) of /text_head/weight are not unit-norm" in out and "[FAIL] checksums" in out


def test_text_methods_in_compare(tmp_path):
    f = _features(tmp_path / "f.h5", dim=TINY_DIM, model=TINY)
    methods = "zero_shot,zero_shot_debiased,gla,text_init"
    r = _run("compare", "-f", f, "--methods", methods, "--json", "-q")
    skipped = {s["method"]: s["reason"] for s in json.loads(r.stdout)["skipped"]}
    assert set(skipped) == set(methods.split(",")) and all("text head" in v for v in skipped.values())
    assert _run("text-head", "--features", f, "--model", TINY, "--random-init", "--templates", "photo").exit_code == 0
    r = _run("compare", "-f", f, "--methods", methods, "--json", "-q", "--test-priors", "forward-5,uniform",
             "--bootstrap", "20", "--seeds", "0,1")
    assert r.exit_code == 0, r.output
    rows = {row["method"]: row for row in json.loads(r.stdout)["rows"]}
    assert set(rows) == set(methods.split(","))
    assert "pre-training" in json.dumps(rows["zero_shot"]["shifted_corrected"])  # no implied prior: the reason
    assert "reason" not in json.dumps(rows["gla"]["shifted_corrected"]) and "ci" in rows["gla"]
    assert rows["text_init"]["over_seeds"]["seeds"] == [0, 1]
    assert rows["gla"]["classifier"] == "linear_probe"  # no stored head: the probe
    assert len(rows["zero_shot_debiased"]["log_prior"]) == 4
    assert 0 <= rows["zero_shot"]["test"]["all"] <= 1


def _fails(r, *needles):
    assert r.exit_code == 1, r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("Error:") and "Traceback" not in r.output
    for n in needles:
        assert n in line, line


def test_bad_inputs(tmp_path, monkeypatch):
    f = _features(tmp_path / "f.h5", dim=TINY_DIM, model=TINY)
    base = ("text-head", "--features", f, "--model", TINY, "--random-init", "--templates", "photo")
    _fails(_run("text-head", "--features", f, "--model", "ViT-B-33", "--random-init"), "ViT-B-32")
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    _fails(_run(*base, "--classnames", short), "2 class names", "4 classes")
    empty = tmp_path / "empty.txt"
    empty.write_text("a\n\nc\nd\n")
    _fails(_run(*base, "--classnames", empty), "empty")
    dup = tmp_path / "dup.txt"
    dup.write_text("a\nb\nA\nd\n")
    r = _run(*base, "--classnames", dup)
    assert r.exit_code == 0 and "warning: " in r.output and "duplicated" in r.output
    _fails(_run(*base), "already has a text head", "--overwrite")
    narrow = _features(tmp_path / "narrow.h5", dim=64, model=TINY)
    _fails(_run("text-head", "--features", narrow, "--model", TINY, "--random-init", "--templates", "photo"),
           "32", "64")
    other = _features(tmp_path / "other.h5", dim=TINY_DIM, model="resnet50.a1_in1k")
    _fails(_run("text-head", "--features", other, "--model", TINY, "--random-init", "--templates", "photo"),
           TINY, "resnet50.a1_in1k", "--force")
    r = _run("text-head", "--features", other, "--model", TINY, "--random-init", "--templates", "photo", "--force")
    assert r.exit_code == 0, r.output
    with h5py.File(other, "r") as h:
        assert bool(h["text_head"].attrs["forced"]) and h["text_head"].attrs["features_model"] == "resnet50.a1_in1k"
    _fails(_run("text-head", "--features", f, "--model", ARCH, "--pretrained", "no-such-tag", "--overwrite"),
           "openai")
    _fails(_run("text-head", "--features", f, "--model", TINY, "--overwrite"), "--random-init")
    unnamed = _features(tmp_path / "unnamed.h5", dim=TINY_DIM, names=None, model=TINY)
    _fails(_run("text-head", "--features", unnamed, "--model", TINY, "--random-init"), "--classnames")


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    f = _features(tmp_path / "f.h5", dim=TINY_DIM, model=TINY)

    def offline(*a, **k):
        raise RuntimeError("Failed to download weights for tag 'openai'")

    monkeypatch.setattr(open_clip, "create_model", offline)
    _fails(_run("text-head", "--features", f, "--model", ARCH, "--pretrained", "openai"),
           "could not get", "--pretrained PATH")


def test_open_clip_missing(tmp_path, monkeypatch):
    import sys

    f = _features(tmp_path / "f.h5", dim=TINY_DIM, model=TINY)
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    _fails(_run("text-head", "--features", f, "--model", TINY, "--random-init"), 'pip install "lt-rebalance[clip]"')


def test_failed_write_leaves_the_file_unchanged(tmp_path, monkeypatch):
    f = _features(tmp_path / "f.h5", dim=TINY_DIM, model=TINY)
    before = f.read_bytes()
    import lt_rebalance.text_store as ts

    def broken(group, known=None):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ts, "record_checksums", broken)
    r = _run("text-head", "--features", f, "--model", TINY, "--random-init", "--templates", "photo")
    assert r.exit_code == 1
    assert f.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]  # no temporary file left
    with FeatureStore(f) as s:
        assert s.num_classes == 4


def test_model_identity_accepts_the_timm_name_of_the_same_weights():
    from lt_rebalance.text_encode import model_mismatch

    assert model_mismatch("vit_base_patch32_clip_224.openai", ARCH, "openai") is None
    assert model_mismatch("hf-hub:timm/vit_base_patch32_clip_224.openai", ARCH, "openai") is None
    assert model_mismatch("ViT-B-32/openai", ARCH, "openai") is None
    assert model_mismatch("", ARCH, "openai") is None  # the file names no model: nothing to compare
    assert "vit_base_patch16_clip_224.openai" in model_mismatch("vit_base_patch16_clip_224.openai", ARCH, "openai")

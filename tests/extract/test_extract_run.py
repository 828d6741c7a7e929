"""The extraction loop: logits invariant, in-memory API, augmented views, bad images, output safety."""
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from lt_rebalance.extract.backbones import create_backbone
from lt_rebalance.extract.checkpoints import linear_head, save_reference_checkpoint
from lt_rebalance.extract.datasets import ArraySource, reference_config
from lt_rebalance.extract.output import output_lock
from lt_rebalance.extract.run import ExtractConfig, extract_features
from PIL import Image
from torchvision import transforms as T

from lt_rebalance.cli import main
from lt_rebalance.store import FeatureStore

pytestmark = pytest.mark.usefixtures("torch_one_thread")

HOLD_LOCK = "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"
IMNET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _extract(args, code=0):
    res = CliRunner().invoke(main, ["extract", "--workers", "0", "--quiet", *args])
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    return res


def _user_error(args, code, *needles):
    res = _extract(args, code)
    assert sum(line.startswith("Error:") for line in res.output.splitlines()) == 1, res.output
    for n in needles:
        assert n in res.output, res.output


@pytest.fixture(scope="module")
def reference_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = create_backbone("resnet10", num_classes=3)
    for m in model.modules():  # non-trivial BN statistics and bias
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("ckpt") / "resnet10.pth"
    save_reference_checkpoint(model, path)
    return path, model


def test_logits_invariant_imagefolder(tmp_path, image_folder, reference_ckpt):
    ckpt, model = reference_ckpt
    out = tmp_path / "f.h5"
    _extract(["--model", "resnet10", "--checkpoint", str(ckpt), "--data", "imagefolder", "--root", str(image_folder),
              "--out", str(out), "--image-size", "64", "--batch-size", "5"])
    store = FeatureStore(out)
    W, b = store.head()
    X, y = store.load("test")
    paths = store.paths("test")
    assert store.attrs["checkpoint_sha256"] and store.attrs["model"] == "resnet10" and store.dim == 512
    # independent: PIL + torchvision Resize(64/0.875) -> CenterCrop(64), the model's own logits
    tf = T.Compose([T.Resize(73, T.InterpolationMode.BILINEAR), T.CenterCrop(64), T.ToTensor(), T.Normalize(*IMNET)])
    x = torch.stack([tf(Image.open(image_folder / p).convert("RGB")) for p in paths])
    with torch.no_grad():
        logits = model.eval()(x)
    torch.testing.assert_close(X @ W.T + b, logits, rtol=1e-4, atol=1e-4)
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert store.counts.tolist() == [12, 6, 3] and store.class_names == ["c0", "c1", "c2"]
    assert not (tmp_path / "f.h5.partial").exists() and not (tmp_path / "f.h5.lock").exists()


def test_in_memory_api_and_views(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    torch.manual_seed(0)
    model = create_backbone("resnet10", num_classes=3)
    tf = reference_config("cifar")
    cfg = ExtractConfig(batch_size=4, dtype="float32", train_views=2, seed=7)

    def run(path, **kw):
        return extract_features(model, {"train": ArraySource(images, labels), "test": ArraySource(images[:3], labels[:3])},
                                path, counts=np.bincount(labels), transform=tf, head=linear_head(model),
                                meta={"model": "tiny", "dataset": "demo"}, config=kw.get("config", cfg))

    res = run(tmp_path / "a.h5")
    assert res.rows == {"train": 10, "test": 3} and res.images == 10 * 3 + 3
    s = FeatureStore(tmp_path / "a.h5")
    # eval features == the model's own pooled pre-logits on the normalised images
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(tf.mean)[:, None, None]) \
        / torch.tensor(tf.std)[:, None, None]
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(s.features("train"), ref, rtol=1e-4, atol=1e-5)
    V = s.views("train")
    assert V.shape == (2, 10, 512) and not torch.allclose(V[0], V[1]) and not torch.allclose(V[0], ref)
    run(tmp_path / "b.h5")  # same seed: identical views; other seed: different
    torch.testing.assert_close(FeatureStore(tmp_path / "b.h5").views("train"), V, rtol=0, atol=0)
    run(tmp_path / "c.h5", config=ExtractConfig(batch_size=3, dtype="float32", train_views=2, seed=8))
    assert not torch.allclose(FeatureStore(tmp_path / "c.h5").views("train"), V)
    with pytest.raises(FileExistsError):
        run(tmp_path / "a.h5")


def _folder_with_bad(tmp_path, image_folder):
    root = tmp_path / "data"
    shutil.copytree(image_folder, root)
    (root / "train" / "c1" / "002.png").write_bytes(b"not a png")
    (root / "train" / "c2" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def test_bad_images_stop_by_default_then_skip_bad_resumes(tmp_path, image_folder):
    root = _folder_with_bad(tmp_path, image_folder)
    out = tmp_path / "f.h5"
    opts = ["--image-size", "32", "--batch-size", "4", "--dtype", "float32", "--train-views", "1"]
    args = ["--model", "resnet10", "--random-init", "--data", "imagefolder", "--root", str(root), "--out", str(out),
            *opts]
    _user_error(args, 1, "unreadable image(s)", "train/c1/002.png", "--skip-bad")
    assert not out.exists() and (tmp_path / "f.h5.partial").exists()
    _extract([*args, "--resume", "--skip-bad"])
    s = FeatureStore(out)
    assert s.splits["train"].rows == 19 and s.views("train").shape == (1, 19, 512)
    with h5py.File(out) as f:
        assert [p.decode() for p in f["splits/train/bad_paths"][...]] == ["train/c1/002.png", "train/c2/001.png"]
    assert "train/c1/002.png" not in s.paths("train")
    # same rows as a clean run over the good images only
    clean = tmp_path / "clean"
    shutil.copytree(root, clean)
    os.unlink(clean / "train" / "c1" / "002.png")
    os.unlink(clean / "train" / "c2" / "001.png")
    _extract(["--model", "resnet10", "--random-init", "--data", "imagefolder", "--root", str(clean),
              "--out", str(tmp_path / "g.h5"), *opts])
    g = FeatureStore(tmp_path / "g.h5", allow_incomplete=True)
    assert g.paths("train") == s.paths("train")
    assert torch.equal(g.labels("train"), s.labels("train"))


def test_output_safety_overwrite_lock_and_stale_lock(tmp_path, image_folder):
    out = tmp_path / "f.h5"
    args = ["--model", "resnet10", "--random-init", "--data", "imagefolder", "--root", str(image_folder),
            "--out", str(out), "--image-size", "32", "--splits", "val"]
    (tmp_path / "f.h5.lock").write_text("12345")  # stale lock file: nobody holds it
    _extract(args)
    before = out.stat().st_mtime_ns
    _user_error(args, 1, "already exists", "--overwrite")
    assert out.stat().st_mtime_ns == before
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "f.h5.lock")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        _user_error([*args, "--overwrite"], 1, "another extraction")
    finally:
        holder.kill()
        holder.wait()
    with output_lock(out):  # a second extraction inside one process is refused too
        _user_error([*args, "--overwrite"], 1, "another extraction")
    _extract([*args, "--overwrite"])
    _user_error([*args[:-4], "--out", str(tmp_path / "nodir" / "x.h5")], 1, "does not exist")


def test_cli_usage_errors(tmp_path, image_folder):
    base = ["--model", "resnet10", "--random-init", "--data", "imagefolder", "--root", str(image_folder),
            "--out", str(tmp_path / "o.h5")]
    _user_error([*base, "--splits", " , "], 2, "--splits")
    _user_error([*base, "--device", "tpu"], 2, "--device")
    _user_error([*base, "--batch-size", "0"], 2)
    if not torch.cuda.is_available():
        _user_error([*base, "--device", "cuda"], 1, "no CUDA GPU")
    _user_error([*base, "--splits", "train,holdout"], 1, "holdout/")
    _user_error([*base, "--splits", "val", "--train-views", "2"], 1, "--train-views needs the train split")


def test_extract_help_is_lazy():
    import subprocess
    import sys

    code = "import sys, lt_rebalance.extract.cli; assert 'torch' not in sys.modules and 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert "--train-views" in CliRunner().invoke(main, ["extract", "--help"]).output

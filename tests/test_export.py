"""``ltr export`` (issue 7): the exported timm model predicts on images what the head predicts on features."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from lt_rebalance.extract.backbones import create_backbone
from lt_rebalance.extract.checkpoints import file_sha256

from lt_rebalance.cli import main
from lt_rebalance.head_io import load_head
from lt_rebalance.store import write_features

pytestmark = pytest.mark.usefixtures("torch_one_thread")
C = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random-init ResNet-10 (timm resnet18, layers 1-1-1-1) as stage 1, features of 32x32 images."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = create_backbone("resnet10", num_classes=C)
    ckpt = root / "stage1.pth"
    torch.save(model.state_dict(), ckpt)
    g = torch.Generator().manual_seed(1)
    images = {s: torch.rand(n, 3, 32, 32, generator=g) for s, n in (("train", 40), ("val", 10), ("test", 12))}
    labels = {s: torch.arange(len(x)) % C for s, x in images.items()}
    with torch.no_grad():
        feats = {s: model.forward_head(model.forward_features(x), pre_logits=True) for s, x in images.items()}
    path = write_features(
        root / "f.h5", {s: (feats[s], labels[s]) for s in images},
        weight=model.fc.weight.detach(), bias=model.fc.bias.detach(), model="resnet10",
        checkpoint_sha256=file_sha256(ckpt),
    )
    return dict(root=root, ckpt=str(ckpt), features=str(path), images=images, feats=feats)


def invoke(args):
    return CliRunner().invoke(main, args)


def exported_model(path):
    import timm

    obj = torch.load(path, weights_only=True)
    model = timm.create_model(obj["timm_name"], num_classes=obj["num_classes"], checkpoint_path=str(path),
                              **obj["model_kwargs"])
    return model.eval()


@pytest.mark.parametrize("method", ["crt", "lws", "ncm-un"])
def test_export_predicts_like_the_head(setup, method):
    root = setup["root"]
    head = root / f"{method}.pt"
    args = {"crt": ["crt", "--epochs", "2", "--batch-size", "8", "--lr", "0.01"],
            "lws": ["lws", "--epochs", "2", "--batch-size", "8"],
            "ncm-un": ["ncm", "--variant", "un"]}[method]
    r = invoke([*args, "-f", setup["features"], "--save", str(head), "-q"])
    assert r.exit_code == 0, r.output
    out = root / f"{method}-model.pth"
    r = invoke(["export", "--head", str(head), "-f", setup["features"], "--checkpoint", setup["ckpt"],
                "--out", str(out), "--json", "-q"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["timm_name"] == "resnet18" and info["model_kwargs"] == {"layers": [1, 1, 1, 1]}
    model = exported_model(out)  # strict load by timm itself
    with torch.no_grad():
        logits = model(setup["images"]["test"])
    state = load_head(head)
    X = setup["feats"]["test"]
    if "weight" in state:
        want = X @ state["weight"].T + state["bias"]
    else:  # NCM 'un': -squared distance to each centroid
        want = -torch.cdist(X, state["centroids"]).square()
    assert torch.equal(logits.argmax(1), want.argmax(1))
    torch.testing.assert_close(logits.softmax(1), want.softmax(1), atol=1e-4, rtol=1e-3)


def test_export_refusals(setup):
    root = setup["root"]
    head = root / "ncm-cl2n.pt"
    assert invoke(["ncm", "-f", setup["features"], "--save", str(head), "-q"]).exit_code == 0
    base = ["export", "-f", setup["features"], "--checkpoint", setup["ckpt"]]
    r = invoke([*base, "--head", str(head), "--out", str(root / "x.pth")])
    assert r.exit_code == 1 and "cannot export an NCM head with variant 'cl2n'" in r.output
    assert "Traceback" not in r.output and not (root / "x.pth").exists()
    # another checkpoint than the features were extracted with
    other = root / "other.pth"
    torch.manual_seed(5)
    torch.save(create_backbone("resnet10", num_classes=C).state_dict(), other)
    lws = root / "lws-refusals.pt"
    assert invoke(["lws", "-f", setup["features"], "--save", str(lws), "--epochs", "1", "--batch-size", "8",
                   "-q"]).exit_code == 0
    r = invoke(["export", "-f", setup["features"], "--checkpoint", str(other), "--head", str(lws),
                "--out", str(root / "y.pth")])
    assert r.exit_code == 1 and "is not the checkpoint" in r.output
    # a model that does not fit the checkpoint
    r = invoke([*base, "--head", str(lws), "--out", str(root / "z.pth"), "--model", "resnet18"])
    assert r.exit_code == 1 and "does not fit" in r.output and r.output.count("Error:") == 1
    # an existing output
    (root / "exists.pth").write_bytes(b"")
    r = invoke([*base, "--head", str(lws), "--out", str(root / "exists.pth")])
    assert r.exit_code == 1 and "Traceback" not in r.output

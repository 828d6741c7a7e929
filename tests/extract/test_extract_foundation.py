"""Foundation-model extraction: the model's own preprocessing by default, which embedding is stored
and how it is recorded (random-initialised timm towers: no download)."""
import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from lt_rebalance.extract.foundation import embedding_function, is_foundation_model, transform_kind

from lt_rebalance.cli import main

timm = pytest.importorskip("timm")

# (timm name, pre-logits width, projected width or None, mean of its pretrained config)
TOWERS = [
    ("vit_xsmall_patch16_clip_224", 256, 512, (0.48145466, 0.4578275, 0.40821073)),  # CLIP: projection head
    ("vit_base_patch16_siglip_224", 768, None, (0.5, 0.5, 0.5)),  # SigLIP: the pooled output is the embedding
    ("vit_small_patch14_dinov2", 384, None, (0.485, 0.456, 0.406)),
    ("eva02_tiny_patch14_224", 192, None, (0.48145466, 0.4578275, 0.40821073)),
]


@pytest.mark.parametrize("name,width,proj,mean", TOWERS)
def test_towers_embeddings_and_preprocessing(name, width, proj, mean):
    from lt_rebalance.extract.datasets import timm_config

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    assert is_foundation_model(name, model) and transform_kind("auto", name, model) == "timm"
    cfg = timm_config(model, "imagenet")
    assert cfg.mean == pytest.approx(mean) and cfg.interpolation == "bicubic"
    x = torch.randn(2, 3, cfg.size, cfg.size)
    fn, attrs = embedding_function(model, "pre-logits", name=name)
    with torch.no_grad():
        pre = fn(x)
    assert pre.shape == (2, width) and attrs == {"embedding": "pre-logits", "l2_normalized": False}
    fn, attrs = embedding_function(model, "projected", l2_normalize=True, name=name)
    with torch.no_grad():
        out = fn(x)
    assert out.shape == (2, proj or width)
    assert attrs["embedding"] == ("projected" if proj else "pre-logits") and attrs["l2_normalized"]
    np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, atol=1e-5)
    if proj:  # the projection is the model's own head applied to the pre-logits
        with torch.no_grad():
            np.testing.assert_allclose(out.numpy(), torch.nn.functional.normalize(model.head(pre), dim=1).numpy(),
                                       atol=1e-5)


def test_classic_models_keep_the_reference_transform():
    assert transform_kind("auto", "resnet50") == "reference"
    assert transform_kind("auto", "resnet50.a1_in1k") == "reference"
    assert transform_kind("timm", "resnet50") == "timm"
    model = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(ValueError, match="pre-logits"):
        embedding_function(model, "projected", name="resnet18")


def test_extract_records_the_embedding(tmp_path, image_folder):
    out = tmp_path / "clip.h5"
    r = CliRunner().invoke(main, ["extract", "--workers", "0", "--quiet", "--model", "vit_xsmall_patch16_clip_224",
                                  "--random-init", "--data", "imagefolder", "--root", str(image_folder),
                                  "--out", str(out), "--embedding", "projected", "--l2-normalize", "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    with h5py.File(out, "r") as f:
        assert f.attrs["embedding"] == "projected" and bool(f.attrs["l2_normalized"]) and f.attrs["preprocess"] == "timm"
        X = f["splits/train/features"][...]
        assert X.shape[1] == 512 and "head" not in f
        np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
        transform = json.loads(f.attrs["transform"])
        assert transform["interpolation"] == "bicubic" and transform["mean"][0] == pytest.approx(0.48145466)
    info = json.loads(CliRunner().invoke(main, ["info", str(out), "--json"]).stdout)
    assert info["embedding"] == {"embedding": "projected", "l2_normalized": True, "preprocess": "timm"}
    assert "embedding: embedding projected" in CliRunner().invoke(main, ["info", str(out)]).stdout

"""Backbone aliases and strict checkpoint loading (reference layout and plain state dicts)."""
import pytest
import timm
import torch
from click.testing import CliRunner
from lt_rebalance.extract.backbones import create_backbone
from lt_rebalance.extract.checkpoints import (
    file_sha256,
    linear_head,
    load_checkpoint,
    save_reference_checkpoint,
)

from lt_rebalance.cli import main

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _resnet10(num_classes=3, seed=0):
    torch.manual_seed(seed)
    return create_backbone("resnet10", num_classes=num_classes)


def test_resnet10_alias_is_basicblock_1111_512d():
    m = _resnet10()
    assert m.num_features == 512
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert type(m.layer1[0]).__name__ == "BasicBlock"


def test_resnext152_alias_layers():
    m = create_backbone("resnext152", num_classes=5)
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == [3, 8, 36, 3]
    assert m.layer1[0].conv2.groups == 32 and m.num_features == 2048


def test_reference_checkpoint_roundtrip_strict(tmp_path):
    src = _resnet10(seed=1)
    path = tmp_path / "ckpt.pth"
    save_reference_checkpoint(src, path)
    raw = torch.load(path, weights_only=True)
    best = raw["state_dict_best"]
    assert set(best["classifier"]) == {"module.fc.weight", "module.fc.bias"}
    assert all(k.startswith("module.") and not k.startswith("module.fc.") for k in best["feat_model"])

    dst = _resnet10(seed=2)
    loaded = load_checkpoint(dst, path)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    assert loaded.sha256 == file_sha256(path) and loaded.scales is None
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(src(x), dst(x))


def test_plain_timm_state_dict_with_module_prefix(tmp_path):
    src = timm.create_model("resnet18", layers=(1, 1, 1, 1), num_classes=3)
    path = tmp_path / "plain.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    dst = _resnet10()
    load_checkpoint(dst, path)
    assert torch.equal(dst.fc.weight, src.fc.weight)


def test_key_mismatch_is_rejected_by_name(tmp_path):
    src = _resnet10()
    sd = src.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["layer1.0.bn1.running_mean"]
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    try:
        load_checkpoint(_resnet10(), path)
        raise AssertionError("expected ValueError")
    except ValueError as e:
        assert "extra.weight" in str(e) and "layer1.0.bn1.running_mean" in str(e)


def test_class_count_mismatch_names_shapes(tmp_path):
    path = tmp_path / "c5.pth"
    save_reference_checkpoint(_resnet10(num_classes=5), path)
    try:
        load_checkpoint(_resnet10(num_classes=3), path)
        raise AssertionError("expected ValueError")
    except ValueError as e:
        assert "fc.weight: checkpoint (5, 512) vs model (3, 512)" in str(e)


def test_lws_scales_fold_into_head(tmp_path):
    src = _resnet10()
    scales = torch.tensor([0.5, 2.0, 3.0])
    path = tmp_path / "lws.pth"
    save_reference_checkpoint(src, path, scales=scales)
    dst = _resnet10(seed=3)
    loaded = load_checkpoint(dst, path)
    w, b = linear_head(dst, loaded.scales)
    x = torch.randn(4, 512)
    expected = scales * (x @ src.fc.weight.T + src.fc.bias)  # LWS logits s_j * (w_j x + b_j)
    torch.testing.assert_close(x @ w.T + b, expected)


def _invoke(args):
    return CliRunner().invoke(main, ["extract", *args])


def _assert_user_error(result, code, *needles):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    err_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(err_lines) == 1, result.output
    for n in needles:
        assert n in result.output, result.output


def test_cli_rejects_bad_checkpoint(tmp_path, image_folder):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    common = ["--model", "resnet10", "--data", "imagefolder", "--root", str(image_folder), "--workers", "0"]
    _assert_user_error(_invoke([*common, "--checkpoint", str(bad), "--out", str(tmp_path / "a.h5")]), 1,
                       "cannot read checkpoint")
    wrong = tmp_path / "wrong.pth"
    save_reference_checkpoint(_resnet10(num_classes=7), wrong)
    _assert_user_error(_invoke([*common, "--checkpoint", str(wrong), "--out", str(tmp_path / "b.h5")]), 1,
                       "fc.weight: checkpoint (7, 512) vs model (3, 512)")
    assert not list(tmp_path.glob("*.h5*"))


def test_cli_weights_choice_and_offline_pretrained(tmp_path, image_folder):
    common = ["--data", "imagefolder", "--root", str(image_folder), "--out", str(tmp_path / "o.h5")]
    _assert_user_error(_invoke(["--model", "resnet10", *common]), 2, "--random-init")
    _assert_user_error(_invoke(["--model", "resnet10", "--random-init", "--pretrained", *common]), 2)
    _assert_user_error(_invoke(["--model", "resnet18", "--pretrained", *common]), 1, "--checkpoint")
    _assert_user_error(_invoke(["--model", "resnet10", "--pretrained", *common]), 1, "--checkpoint")
    _assert_user_error(_invoke(["--model", "no_such_net", "--random-init", *common]), 1, "unknown model")

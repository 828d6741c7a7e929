"""Reference presets: each one builds its head, and the table is the authors' configuration files'."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lt_rebalance.presets import PRESETS, preset, preset_source


def test_presets_are_torch_free():
    code = "import sys, lt_rebalance.presets as p; p.preset('crt', 'imagenet_lt'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_published_numbers():
    # classifier-balancing configs (cRT/LWS), robustlearn marc configs, MiSLAS stage-2 configs
    assert {k: preset("crt", "places_lt")[k] for k in ("epochs", "lr", "batch_size", "sampler", "schedule")} == {
        "epochs": 10, "lr": 0.1, "batch_size": 256, "sampler": "cb", "schedule": "cosine-reference"}
    assert (preset("crt", "inat2018")["epochs"], preset("crt", "inat2018")["weight_decay"]) == (30, 1e-4)
    assert preset("lws", "imagenet_lt")["epochs"] == 5
    m = preset("marc", "places_lt")
    assert (m["protocol"], m["lr"], m["batch_size"], m["sampler"], m["loss"], m["rho"]) == (
        "authors", 0.05, 128, "ib", "grw", 1.2)
    assert preset("marc", "inat2018")["epochs"] == 30
    las = preset("lws_las", "places_lt")
    assert (las["smooth_head"], las["smooth_tail"], las["loss"]) == (0.4, 0.1, "las")
    assert "classifier-balancing" in preset_source("crt", "imagenet_lt")
    p = preset("crt", "imagenet_lt")
    p["lr"] = 9.0
    assert preset("crt", "imagenet_lt")["lr"] == 0.2  # a fresh dict each call


def test_unknown_choices_are_named():
    with pytest.raises(ValueError, match="crt, lws, marc, disalign, lws_las, wb"):
        preset("ncm", "imagenet_lt")
    with pytest.raises(ValueError, match="choose one of imagenet_lt, places_lt, inat2018"):
        preset("crt", "cifar10_lt")
    with pytest.raises(ValueError, match="choose one of imagenet_lt$"):
        preset("disalign", "places_lt")


@pytest.mark.filterwarnings("ignore::lt_rebalance.heads.training.FewStepsWarning")
def test_every_preset_builds_and_validates_its_head():
    from lt_rebalance.heads import CRT, LWS, MARC, DisAlign, WeightBalancing

    heads = {"crt": CRT, "lws": LWS, "lws_las": LWS, "marc": MARC, "disalign": DisAlign, "wb": WeightBalancing}
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 3)).astype(np.float32), np.repeat([0, 1], 20)
    W = rng.normal(size=(2, 3))
    for (method, dataset), (params, _) in PRESETS.items():
        params = {**params, "epochs": 1, "batch_size": 8}  # the rest as published, on a tiny problem
        head = heads[method](**params, device="cpu") if method == "crt" else heads[method](W, **params, device="cpu")
        head.fit(X, y)
        assert head.predict(X).shape == (40,), (method, dataset)

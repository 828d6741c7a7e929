"""Published training configurations of the trained stage-2 methods, per dataset (torch-free).

``preset(method, dataset)`` gives the keyword arguments of the method's head that set the
authors' epochs, learning rate, batch, weight decay, sampler, schedule (and loss, protocol) for
that dataset; ``preset_source`` names the file each number comes from. docs/METHODS.md,
"Reference presets", lists them. Only configurations read in the authors' repositories are
here: a (method, dataset) pair without one is a ValueError naming the pairs that exist.
"""
from __future__ import annotations

from typing import Any

DATASETS = ("imagenet_lt", "places_lt", "inat2018")

_KANG = "facebookresearch/classifier-balancing config/{}/cls_{}.yaml (scheduler stepped before each epoch)"
_MARC = "microsoft/robustlearn marc/config/{}/MARC.yaml, marc/loss/GRWLoss.py, marc/run_networks.py"
_DISALIGN = ("Megvii-BaseDetection/DisAlign classification/imagenetlt/resnext50/"
             "resx50.scratch.imagenet_lt.224size.90e.disalign.10e/config.py (GRW_SCALE 1.2, epoch-wise cosine); "
             "cvpods defaults: momentum 0.9, shuffled sampler")
_MISLAS = ("dvlab-research/MiSLAS config/{}_stage2_mislas.yaml, train_stage2.py (class-balanced loader, "
           "cosine set at the start of each epoch; the LWS scales at lr, the classifier at 0.05 lr, not trained here)")
_WB = "ShadeAlsha/LTR-weight-balancing demo2_second-stage-training.py (CIFAR-100-LT), utils/trainval.py"


def _kang(epochs: int, lr: float, batch: int, wd: float) -> dict[str, Any]:
    return {"epochs": epochs, "lr": lr, "batch_size": batch, "weight_decay": wd, "momentum": 0.9,
            "sampler": "cb", "schedule": "cosine-reference"}


def _marc(epochs: int, batch: int, wd: float) -> dict[str, Any]:
    return {"protocol": "authors", "epochs": epochs, "lr": 0.05, "batch_size": batch, "weight_decay": wd,
            "momentum": 0.9, "sampler": "ib", "schedule": "cosine", "loss": "grw", "rho": 1.2}


def _mislas(head: float, tail: float, wd: float) -> dict[str, Any]:
    return {"epochs": 10, "lr": 0.1, "batch_size": 256, "weight_decay": wd, "momentum": 0.9, "sampler": "cb",
            "schedule": "cosine", "loss": "las", "smooth_head": head, "smooth_tail": tail,
            "smooth_shape": "concave"}


# (method, dataset) -> (keyword arguments of the method's head, source)
PRESETS: dict[tuple[str, str], tuple[dict[str, Any], str]] = {
    ("crt", "imagenet_lt"): (_kang(10, 0.2, 512, 5e-4), _KANG.format("ImageNet_LT", "crt")),
    ("crt", "places_lt"): (_kang(10, 0.1, 256, 5e-4), _KANG.format("Places_LT", "crt")),
    ("crt", "inat2018"): (_kang(30, 0.2, 512, 1e-4), _KANG.format("iNaturalist18", "crt")),
    ("lws", "imagenet_lt"): (_kang(5, 0.2, 512, 5e-4), _KANG.format("ImageNet_LT", "lws")),
    ("lws", "places_lt"): (_kang(5, 0.1, 256, 5e-4), _KANG.format("Places_LT", "lws")),
    ("lws", "inat2018"): (_kang(5, 0.2, 512, 1e-4), _KANG.format("iNaturalist18", "lws")),
    ("marc", "imagenet_lt"): (_marc(10, 256, 5e-4), _MARC.format("ImageNet_LT")),
    ("marc", "places_lt"): (_marc(10, 128, 5e-4), _MARC.format("Places_LT")),
    ("marc", "inat2018"): (_marc(30, 256, 1e-4), _MARC.format("iNaturalist18")),
    ("disalign", "imagenet_lt"): ({"epochs": 10, "lr": 0.1, "batch_size": 256, "weight_decay": 5e-4, "momentum": 0.9,
                                   "sampler": "ib", "schedule": "cosine", "loss": "grw", "rho": 1.2}, _DISALIGN),
    # MiSLAS stage 2 = LWS (here: scales only) trained with label-aware smoothing
    ("lws_las", "imagenet_lt"): (_mislas(0.3, 0.0, 5e-4), _MISLAS.format("imagenet/imagenet_resnet50")),
    ("lws_las", "places_lt"): (_mislas(0.4, 0.1, 5e-4), _MISLAS.format("places/places_resnet152")),
    ("lws_las", "inat2018"): (_mislas(0.3, 0.0, 1e-4), _MISLAS.format("ina2018/ina2018_resnet50")),
    ("wb", "cifar100_lt"): ({"protocol": "authors", "epochs": 10, "lr": 0.01, "batch_size": 64, "weight_decay": 0.1,
                             "momentum": 0.9, "sampler": "ib", "schedule": "cosine-reference", "thresh": 0.1,
                             "beta": 0.9999}, _WB),
}
METHODS = tuple(dict.fromkeys(m for m, _ in PRESETS))


def _entry(method: str, dataset: str) -> tuple[dict[str, Any], str]:
    if (method, dataset) not in PRESETS:
        if method not in METHODS:
            raise ValueError(f"no presets for method {method!r}; choose one of {', '.join(METHODS)}")
        have = [d for m, d in PRESETS if m == method]
        raise ValueError(f"no published configuration of {method} for {dataset!r} was found in the authors' code; "
                         f"choose one of {', '.join(have)}")
    return PRESETS[method, dataset]


def preset(method: str, dataset: str) -> dict[str, Any]:
    """Keyword arguments of ``method``'s head for ``dataset``'s published configuration (a new dict).

    ``method``: crt, lws, marc, disalign, lws_las (MiSLAS stage 2 as LWS with label-aware
    smoothing) or wb; ``dataset``: imagenet_lt, places_lt, inat2018 (wb: cifar100_lt only).
    Raises ValueError naming the choices.
    """
    return dict(_entry(method, dataset)[0])


def preset_source(method: str, dataset: str) -> str:
    """Where the numbers of :func:`preset` come from (repository, files)."""
    return _entry(method, dataset)[1]

"""lt-rebalance: decoupled long-tailed recognition on cached features.

Extract backbone features once (``ltr extract``), then re-balance the classifier in seconds
(cRT, NCM, tau-normalisation, LWS, MARC, weight balancing, kNN, an L-BFGS linear probe and
post-hoc methods) on the cached HDF5 feature file.

The public names below are imported lazily so that ``import lt_rebalance`` (and ``ltr --help``)
stays fast; torch is loaded on first use of a name that needs it.
"""
from __future__ import annotations

import importlib

from ._version import __version__

_EXPORTS = {
    "FeatureStore": "store",
    "FeatureFileError": "store",
    "FeatureFileWriter": "store",
    "write_features": "store",
    "evaluate": "metrics",
    "shot_groups": "metrics",
    "NCM": "heads",
    "TauNorm": "heads",
    "tau_normalize": "heads",
    "tau_sweep": "heads",
    "LWS": "heads",
    "CRT": "heads",
    "JointHead": "heads",
    "KNN": "heads",
    "LinearProbe": "heads",
    "MARC": "heads",
    "DisAlign": "heads",
    "WeightBalancing": "heads",
    "make_sampler": "samplers",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'lt_rebalance' has no attribute {name!r}")

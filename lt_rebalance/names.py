"""The canonical method names (one per method, as ``compare`` rows, JSON and head files spell them)
and the older spellings accepted as aliases. No heavy imports: the CLI's ``--help`` reads this."""
from __future__ import annotations

# ``compare`` runs them in this order (lt_rebalance.experiments.METHODS has the same keys)
METHOD_NAMES = ("joint", "ncm", "crt", "tau_norm", "lws", "logit_adjust", "pc_softmax", "marc", "wb", "knn",
                "linear_probe")
METHOD_ALIASES = {"tau": "tau_norm", "tau-norm": "tau_norm", "tau-sweep": "tau_norm",
                  "logit-adjust": "logit_adjust", "pc-softmax": "pc_softmax", "linear-probe": "linear_probe",
                  "weight-balancing": "wb"}
# methods that use the stored stage-1 classifier (/head)
HEAD_METHODS = ("joint", "tau_norm", "lws", "logit_adjust", "pc_softmax", "marc", "wb")
TRAINED_METHODS = ("crt", "lws", "marc", "wb")  # trained with SGD: the only users of epochs and batch size
# run by ``compare`` only when named: each costs more than the rest of the study on ImageNet-LT-sized
# files on a CPU (kNN: one eval x train similarity GEMM; the probe: up to max_iter passes of two GEMMs;
# weight balancing: the authors' 10 full epochs in steps of 64 rows, which --crt-epochs does not shorten)
OPT_IN_METHODS = ("wb", "knn", "linear_probe")
DEFAULT_METHODS = tuple(m for m in METHOD_NAMES if m not in OPT_IN_METHODS)


def canonical_method(name: str) -> str:
    """``name`` or its alias as the canonical method name; ValueError for an unknown one."""
    key = name.strip().lower()
    key = METHOD_ALIASES.get(key, key)
    if key not in METHOD_NAMES:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)} "
                         f"(aliases: {', '.join(f'{a}={c}' for a, c in METHOD_ALIASES.items())})")
    return key


def parse_methods(text: str) -> list[str]:
    """'joint, tau,crt' -> ['joint', 'tau_norm', 'crt'] (canonical, duplicates dropped, order kept)."""
    out: list[str] = []
    for part in text.split(","):
        if part.strip() and (name := canonical_method(part)) not in out:
            out.append(name)
    return out

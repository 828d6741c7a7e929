"""The bfloat16 accuracy contract of docs/METHODS.md ("Precision"), measured on a feature file.

``python -m benchmarks.precision FILE [--methods ...] [--seeds 0,1,2] [--json OUT]``

Each method runs through its registry runner in float32 and in bfloat16 on the same session.
Closed-form methods: the share of test rows whose prediction is identical, and the selected τ of
both. Trained methods: test top-1 (all, few) of both per seed, the differences of the seed means
and the float32 seed-to-seed spread (max − min over seeds). Whole runs, not micro-benchmarks: the
seconds are those of one process on a shared machine, for orientation only.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from typing import Optional

import torch

CLOSED_FORM = ("joint", "tau_norm", "logit_adjust", "pc_softmax", "ncm", "knn")
TRAINED = ("crt", "lws", "marc", "wb", "linear_probe")
SEEDED = ("crt", "lws", "marc", "wb")  # the probe (full-batch L-BFGS from zeros) has no seed


def _predictions(session, head, split: str = "test") -> torch.Tensor:
    X, _ = session.load(split)
    return torch.cat([z.argmax(1).cpu() for _, z in head.scores_in_blocks(X)])


def measure(path: str, methods, seeds=(0, 1, 2), options: Optional[dict] = None, log=print) -> dict:
    from lt_rebalance.registry import runner
    from lt_rebalance.session import Session
    from lt_rebalance.store import FeatureStore

    options = options or {}
    base = Session(FeatureStore(path), eval_splits=["test"])
    out: dict = {"file": path, "rows": {}}
    for m in methods:
        row: dict = {}
        for p in ("float32", "bfloat16"):
            runs = []
            for seed in (seeds if m in SEEDED else seeds[:1]):
                s = replace(base, precision=p, seed=seed)
                t0 = time.perf_counter()
                run = runner(m)(s, **options.get(m, {}))
                secs = time.perf_counter() - t0
                test = run.result["test"]
                runs.append({"seed": seed, "all": test["all"], "few": test["few"], "seconds": round(secs, 2),
                             "tau": run.result.get("selected_tau"),
                             "pred": _predictions(s, run.head) if m in CLOSED_FORM else None})
                log(f"{m} {p} seed {seed}: top-1 {100 * test['all']:.2f} few {100 * test['few']:.2f} ({secs:.1f} s)")
            row[p] = runs
        a, b = row["float32"], row["bfloat16"]
        summary: dict = {"seconds": {"float32": [r["seconds"] for r in a], "bfloat16": [r["seconds"] for r in b]}}
        if m in CLOSED_FORM:
            summary.update(identical=float((a[0]["pred"] == b[0]["pred"]).double().mean()),
                           tau={"float32": a[0]["tau"], "bfloat16": b[0]["tau"]},
                           all={"float32": a[0]["all"], "bfloat16": b[0]["all"]})
        else:
            def mean(rs, k):
                return sum(r[k] for r in rs) / len(rs)

            summary.update(
                all={"float32": mean(a, "all"), "bfloat16": mean(b, "all"),
                     "diff": mean(b, "all") - mean(a, "all"),
                     "spread_float32": max(r["all"] for r in a) - min(r["all"] for r in a)},
                few={"float32": mean(a, "few"), "bfloat16": mean(b, "few"),
                     "diff": mean(b, "few") - mean(a, "few"),
                     "spread_float32": max(r["few"] for r in a) - min(r["few"] for r in a)},
                seeds=[r["seed"] for r in a])
        out["rows"][m] = summary
        log(f"{m}: {json.dumps(summary)}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    p.add_argument("--methods", default=",".join(CLOSED_FORM + TRAINED))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--crt-epochs", default=None, type=int, help="cRT epochs (default: the method's)")
    p.add_argument("--wb-epochs", default=None, type=int, help="weight-balancing epochs (default: the method's)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    opts = {m: {"epochs": e} for m, e in (("crt", a.crt_epochs), ("wb", a.wb_epochs)) if e}
    doc = measure(a.file, a.methods.split(","), tuple(int(s) for s in a.seeds.split(",")), opts)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()

"""``ltr compare``: every method with its defaults, one table."""
from __future__ import annotations

import click

from ..names import METHOD_NAMES
from ._common import (
    MethodNames,
    check_training_fits,
    check_writable,
    common_options,
    device_option,
    emit,
    eval_splits,
    fmt_acc,
    handle_user_errors,
    log,
    open_store,
    resolve_device,
    seed_option,
    thresholds_options,
    to_json,
    training_options,
)


def compare_table(result: dict) -> str:
    """method x many / medium / few / all per split, plus seconds (accuracy %)."""
    splits = result["eval_splits"]
    groups = ("many", "medium", "few", "all")
    width = max([6] + [len(r["method"]) + 1 for r in result["rows"]])
    header = f"{'method':<{width}}  " + "   ".join(
        " ".join(f"{(s[:4] + '/' + g[:3]):>8}" for g in groups) for s in splits
    ) + f"  {'seconds':>8}"
    t = result.get("thresholds") or {"many": 100, "few": 20}
    lines = [f"accuracy % per split and shot group (many > {t['many']}, medium {t['few']}-{t['many']}, "
             f"few < {t['few']} train images)", header]
    notes = []
    for r in result["rows"]:
        cells = "   ".join(" ".join(f"{fmt_acc((r.get(s) or {}).get(g)):>8}" for g in groups) for s in splits)
        label = r["method"]
        if r.get("note"):
            if r["note"] not in notes:
                notes.append(r["note"])
            label += "*" * (notes.index(r["note"]) + 1)
        lines.append(f"{label:<{width}}  {cells}  {r['seconds']:>8.2f}")
    for k, note in enumerate(notes):
        lines.append(f"({'*' * (k + 1)} {note})")
    for s in result.get("skipped", []):
        lines.append(f"(skipped {s['method']}: {s['reason']})")
    return "\n".join(lines)


@click.command()
@common_options
@click.option("--methods", default=None, type=MethodNames(),
              help=f"Comma-separated subset of {', '.join(METHOD_NAMES)} (default: all the file supports; "
                   "old spellings such as tau accepted).")
@training_options
@thresholds_options
@click.option("--splits", default=None, help="Comma-separated splits to evaluate (default: val and test).")
@click.option("--out", "out", type=click.Path(dir_okay=False), help="Also write the JSON results to this file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@seed_option
@device_option
@handle_user_errors
def compare(features, as_json, quiet, allow_incomplete, methods, overrides, thresholds, splits, out, overwrite,
            seed, device):
    """Run joint, ncm, crt, tau_norm (tau selected on val), lws, logit_adjust (tau selected on val) and
    pc_softmax with defaults; print one table.

    Methods that need the stored classifier are skipped, with the reason, when the file has none
    or when it is a random initialisation (name them in --methods to run them anyway). cRT and LWS
    use --batch-size auto (512, or N // 8 on fewer than 4096 train rows) and auto epochs (at least
    500 optimiser steps).
    """
    from ..experiments import Context
    from ..experiments import compare as run_compare

    check_writable(out, overwrite, [features])  # fail early if --out cannot be written
    store = open_store(features, allow_incomplete)
    ctx = Context(store, eval_splits=eval_splits(store, splits), device=resolve_device(device), seed=seed,
                  thresholds=thresholds)
    check_training_fits(store, overrides, methods or METHOD_NAMES)
    result = run_compare(ctx, methods, overrides, log=None if quiet else log)
    result["features"] = features
    if out:
        from ..store import atomic_write

        text = to_json(result)
        atomic_write(out, lambda tmp: tmp.write_text(text), overwrite, [features])
    emit(result, as_json, compare_table)

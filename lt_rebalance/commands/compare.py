"""``ltr compare``: every method with its defaults, one table."""
from __future__ import annotations

import click

from ._common import (
    check_batch_fits,
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
    width = max([6] + [len(r["method"]) for r in result["rows"]])
    header = f"{'method':<{width}}  " + "   ".join(
        " ".join(f"{(s[:4] + '/' + g[:3]):>8}" for g in groups) for s in splits
    ) + f"  {'seconds':>8}"
    t = result.get("thresholds") or {"many": 100, "few": 20}
    lines = [f"accuracy % per split and shot group (many > {t['many']}, medium {t['few']}-{t['many']}, "
             f"few < {t['few']} train images)", header]
    for r in result["rows"]:
        cells = "   ".join(" ".join(f"{fmt_acc((r.get(s) or {}).get(g)):>8}" for g in groups) for s in splits)
        lines.append(f"{r['method']:<{width}}  {cells}  {r['seconds']:>8.2f}")
    for s in result.get("skipped", []):
        lines.append(f"(skipped {s['method']}: {s['reason']})")
    return "\n".join(lines)


@click.command()
@common_options
@click.option("--methods", default=None,
              help="Comma-separated methods (default: all the file supports but knn and linear_probe, "
                   "which run when named).")
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
    """Run joint, NCM, cRT, tau-norm (tau selected on val), LWS and the later methods with defaults; one table.

    kNN and the linear probe run only when named in --methods (on ImageNet-LT-sized files each costs
    more on a CPU than the rest of the study).
    """
    from ..experiments import Context
    from ..experiments import compare as run_compare

    check_writable(out, overwrite)  # fail early if --out cannot be written
    store = open_store(features, allow_incomplete)
    ctx = Context(store, eval_splits=eval_splits(store, splits), device=resolve_device(device), seed=seed,
                  thresholds=thresholds)
    check_batch_fits(store, overrides["crt"]["batch_size"])
    names = [m.strip() for m in methods.split(",")] if methods else None
    result = run_compare(ctx, names, overrides, log=None if quiet else log)
    result["features"] = features
    if out:
        from ..store import atomic_write

        text = to_json(result)
        atomic_write(out, lambda tmp: tmp.write_text(text), overwrite)
    emit(result, as_json, compare_table)

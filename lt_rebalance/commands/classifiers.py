"""``ltr knn | linear-probe | wb | marc``: more classifiers on the cached features (docs/METHODS.md)."""
from __future__ import annotations

import click

from ._common import (
    check_writable,
    common_options,
    device_option,
    emit,
    fmt_acc,
    handle_user_errors,
    log,
    protocol_options,
    require_split,
    resolve_device,
    seeds_option,
    thresholds_options,
)
from ._protocol_text import with_protocol
from .methods import (
    FloatList,
    _context,
    _human,
    _metric_splits,
    _save,
    _splits_table,
    _train_on_joint,
    _trained_human,
    joint_calibration_command,
    overwrite_option,
    save_option,
    sgd_options,
    splits_option,
)


@click.command()
@common_options
@thresholds_options
@click.option("--k", "k", default=20, show_default=True, type=click.IntRange(1), help="Neighbours that vote.")
@click.option("--temperature", default=0.07, show_default=True, type=click.FloatRange(0, min_open=True),
              help="T of the vote weight exp(sim / T) (DINO's).")
@click.option("--balance", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Class-balanced votes: divide by n_c^BALANCE (0: plain, 1: per train image).")
@device_option
@splits_option
@protocol_options
@handle_user_errors
def knn(features, as_json, quiet, allow_incomplete, thresholds, k, temperature, balance, device, splits, protocol):
    """Weighted kNN: the k most cosine-similar train rows vote with weight exp(sim / T)."""
    from ..experiments import run_knn

    ctx = _context(features, allow_incomplete, splits, resolve_device(device), thresholds=thresholds,
                   protocol=protocol)
    require_split(ctx.store, "train", "for the neighbours")
    result, _ = run_knn(ctx, k=k, temperature=temperature, balance=balance)
    title = f"weighted kNN (k {k}, T {temperature:g}" + (f", votes / n_c^{balance:g}" if balance else "") + "), accuracy %"
    emit(result, as_json, with_protocol(_human(lambda r: title, ctx.eval_splits)))


def _probe_human(result: dict) -> str:
    lines = []
    if "grid" in result:
        lines += ["C grid selected on val by top-1", f"{'C':>10} {'iters':>5}  {'val/all':>8}"]
        for row in result["grid"]:
            mark = "  <- selected" if row["C"] == result["C"] else ""
            conv = "" if row["converged"] else " (max_iter reached)"
            lines.append(f"{row['C']:>10g} {row['n_iter']:>5}  {fmt_acc(row['val_top1']):>8}{conv}{mark}")
        lines.append("")
    conv = "converged" if result["converged"] else "NOT converged: raise --max-iter"
    lines.append(f"linear probe (L-BFGS, C {result['C']:g}, class weight {result['class_weight']}, "
                 f"{result['n_iter']} iterations, {conv}), accuracy %")
    return "\n".join(lines) + "\n" + _splits_table(result, _metric_splits(result))


@click.command("linear-probe")
@common_options
@thresholds_options
@click.option("--C", "C", default=None, type=click.FloatRange(0, min_open=True),
              help="Inverse L2 strength, scikit-learn's C (default 1.0).")
@click.option("--C-grid", "C_grid", default=None, type=FloatList(),
              help="Comma list of C values; each is fitted and the best val top-1 kept.")
@click.option("--class-weight", type=click.Choice(["balanced", "none"]), default="balanced", show_default=True,
              help="balanced: sample weights N / (K n_y), scikit-learn's class_weight='balanced'.")
@click.option("--max-iter", default=100, show_default=True, type=click.IntRange(1), help="L-BFGS iterations at most.")
@click.option("--tol", default=1e-4, show_default=True, type=click.FloatRange(0),
              help="Stop when max |gradient| of the scaled objective <= TOL (scikit-learn's).")
@click.option("--precision", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
              help="Arithmetic of the passes over the train rows.")
@device_option
@splits_option
@save_option
@overwrite_option
@protocol_options
@handle_user_errors
def linear_probe(features, as_json, quiet, allow_incomplete, thresholds, C, C_grid, class_weight, max_iter, tol, precision,
                 device, splits, save, overwrite, protocol):
    """Logistic regression with full-batch L-BFGS: scikit-learn's LogisticRegression objective."""
    from ..experiments import run_linear_probe

    if C is not None and C_grid is not None:
        raise click.UsageError("give --C or --C-grid, not both")
    if C_grid is not None and any(c <= 0 for c in C_grid):
        raise click.BadParameter(f"every C must be positive; got {C_grid}", param_hint="--C-grid")
    check_writable(save, overwrite, [features])
    ctx = _context(features, allow_incomplete, splits, resolve_device(device), thresholds=thresholds,
                   protocol=protocol)
    require_split(ctx.store, "train", "to fit on")
    if C_grid is not None:
        require_split(ctx.store, "val", "to select C from --C-grid")
    result, head = run_linear_probe(ctx, C=1.0 if C is None else C, C_grid=C_grid, class_weight=class_weight,
                                    max_iter=max_iter, tol=tol, precision=precision)
    if not result["converged"]:
        log(f"warning: L-BFGS stopped after {result['n_iter']} iterations before reaching --tol {tol:g}; "
            "raise --max-iter", quiet)
    _save(save, overwrite, head, result, features, quiet)
    emit(result, as_json, with_protocol(_probe_human))


def _wb_human(result: dict) -> str:
    norms = result["norms"]
    return (f"{_trained_human(result)}\nMaxNorm radius {result['radius']:.4g}; class weight norms after training "
            f"{min(norms):.4g} .. {max(norms):.4g}")


@click.command()
@common_options
@thresholds_options
@sgd_options(10, 0.01, "ib (instance-balanced, default: the authors'), cb, sqrt, pb or a power q.",
             weight_decay=0.1, sampler="ib")
@click.option("--thresh", default=0.1, show_default=True, type=click.FloatRange(0),
              help="MaxNorm radius = min norm + THRESH x (max norm - min norm) of the stored classifier.")
@click.option("--beta", default=0.9999, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Class-balanced loss weights (1 - beta) / (1 - beta^n_c).")
@seeds_option
@protocol_options
@handle_user_errors
def wb(**options):
    """Weight balancing stage 2: fine-tune the stored classifier with weight decay and MaxNorm."""
    _train_on_joint("wb", _wb_human, **options)


marc = joint_calibration_command("marc", "MARC: learn z'_j = omega_j z_j + beta_j ||w_j|| on the frozen stored classifier.")

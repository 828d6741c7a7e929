"""``ltr knn | linear-probe | wb | marc | disalign``: more classifiers on the cached features (docs/METHODS.md)."""
from __future__ import annotations

import click

from ._protocol_text import with_protocol
from .errors import handle_user_errors
from .methods import splits_human
from .options import (
    PRECISION_HELP,
    PRECISIONS,
    FloatList,
    common_options,
    device_option,
    overwrite_option,
    precision_option,
    protocol_options,
    save_option,
    seeds_option,
    sgd_options,
    splits_option,
    thresholds_options,
)
from .render import emit, fmt_acc, log, splits_table, trained_human
from .setup import (
    check_writable,
    make_session,
    per_class_option,
    require_split,
    save_head_file,
    write_per_class,
)
from .trained import preset_option, stored_head_command, train_command, train_protocol_option


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
@per_class_option
@overwrite_option
@protocol_options
@precision_option
@handle_user_errors
def knn(features, as_json, quiet, allow_incomplete, thresholds, k, temperature, balance, device, splits, per_class_out,
        overwrite, protocol, precision):
    """Weighted kNN: the k most cosine-similar train rows vote with weight exp(sim / T)."""
    from ..runners.features import run_knn

    check_writable(per_class_out, overwrite, [features])
    session = make_session(features, allow_incomplete, splits, device, thresholds=thresholds, protocol=protocol,
                           precision=precision)
    require_split(session.store, "train", "for the neighbours")
    run = run_knn(session, k=k, temperature=temperature, balance=balance)
    write_per_class(per_class_out, overwrite, session, {"knn": run.head}, run.result, features, quiet)
    title = f"weighted kNN (k {k}, T {temperature:g}" + (f", votes / n_c^{balance:g}" if balance else "") + "), accuracy %"
    emit(run.result, as_json, splits_human(lambda r: title, session.eval_splits))


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
    return "\n".join(lines) + "\n" + splits_table(result)


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
@click.option("--precision", type=click.Choice(["float32", "float64", *PRECISIONS[1:]], case_sensitive=False),
              default="float32", show_default=True,
              help="Arithmetic of the passes over the train rows: float64, or as in the other commands: "
                   + PRECISION_HELP[0].lower() + PRECISION_HELP[1:])
@device_option
@splits_option
@save_option
@per_class_option
@overwrite_option
@protocol_options
@handle_user_errors
def linear_probe(features, as_json, quiet, allow_incomplete, thresholds, C, C_grid, class_weight, max_iter, tol, precision,
                 device, splits, save, per_class_out, overwrite, protocol):
    """Logistic regression with full-batch L-BFGS: scikit-learn's LogisticRegression objective."""
    from ..runners.features import run_linear_probe

    if C is not None and C_grid is not None:
        raise click.UsageError("give --C or --C-grid, not both")
    if C_grid is not None and any(c <= 0 for c in C_grid):
        raise click.BadParameter(f"every C must be positive; got {C_grid}", param_hint="--C-grid")
    check_writable(save, overwrite, [features])
    check_writable(per_class_out, overwrite, [features, save])
    session = make_session(features, allow_incomplete, splits, device, thresholds=thresholds, protocol=protocol,
                           precision="float32" if precision == "float64" else precision)
    require_split(session.store, "train", "to fit on")
    if C_grid is not None:
        require_split(session.store, "val", "to select C from --C-grid")
    run = run_linear_probe(session, C=1.0 if C is None else C, C_grid=C_grid, class_weight=class_weight,
                           max_iter=max_iter, tol=tol, precision=precision)
    result = run.result
    if not result["converged"]:
        log(f"warning: L-BFGS stopped after {result['n_iter']} iterations before reaching --tol {tol:g}; "
            "raise --max-iter", quiet)
    save_head_file(save, overwrite, run.head, result, features, quiet)
    write_per_class(per_class_out, overwrite, session, {"linear_probe": run.head}, result, features, quiet)
    emit(result, as_json, with_protocol(_probe_human))


def _wb_human(result: dict) -> str:
    norms = result["norms"]
    return (f"{trained_human(result)}\nMaxNorm radius {result['radius']:.4g}; class weight norms after training "
            f"{min(norms):.4g} .. {max(norms):.4g}")


@click.command()
@common_options
@thresholds_options
@sgd_options(10, 0.01, "ib (instance-balanced, default: the authors'), cb, sqrt, pb or a power q.",
             weight_decay=0.1, sampler="ib", schedule=None,
             schedule_help=" Default: the protocol's (paper: cosine; authors: cosine-reference).")
@click.option("--thresh", default=0.1, show_default=True, type=click.FloatRange(0),
              help="MaxNorm radius = min norm + THRESH x (max norm - min norm) of the stored classifier.")
@click.option("--beta", default=0.9999, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Class-balanced loss weights (1 - beta) / (1 - beta^n_c).")
@train_protocol_option("paper: MaxNorm projection after every step, full batches only, cosine schedule; authors "
                       "(ShadeAlsha/LTR-weight-balancing): projection once per epoch, the last partial batch kept, "
                       "cosine stepped before each epoch (cosine-reference). docs/METHODS.md, \"Weight balancing\".")
@preset_option("wb")
@per_class_option
@seeds_option
@protocol_options
@handle_user_errors
def wb(**options):
    """Weight balancing stage 2: fine-tune the stored classifier with weight decay and MaxNorm."""
    train_command("wb", _wb_human, **options)


marc = stored_head_command(
    "marc", "MARC: learn z'_j = omega_j z_j + beta_j ||w_j|| on the frozen stored classifier.",
    epochs="5 (authors: 10)", lr=None, sampler=None, loss=None,
    lr_help=" Default: the protocol's (paper 0.2, authors 0.05).",
    sampler_help="ib, cb, sqrt, pb or a power q; default: the protocol's (paper cb, authors ib).",
    loss_help=" Default: the protocol's (paper ce, authors grw).",
    batch_note=" With --protocol authors auto is 256 instead of 512.",
    extra=[train_protocol_option(
        "paper: LWS's recipe (class-balanced sampling, cross-entropy, lr 0.2, batch 512, 5 epochs); authors "
        "(microsoft/robustlearn marc): GRW loss (rho 1.2), instance-balanced sampling, lr 0.05, batch 256, 10 epochs, "
        "floor(N/B) - 1 steps an epoch. Explicit flags win. docs/METHODS.md, \"MARC\".")],
)

disalign = stored_head_command(
    "disalign", "DisAlign: confidence-gated per-class scale and bias on the frozen stored classifier.",
    epochs=10, lr=0.1, sampler="ib", loss="grw",
    sampler_help="ib (instance-balanced, default: the authors'), cb, sqrt, pb or a power q.",
    batch_note=" DisAlign's auto is 256 (the authors') instead of 512.",
    save=False,  # no linear layer (its gate depends on the features): no --save, no export
)

"""``ltr joint | ncm | tau-sweep | crt | lws``: one method on a feature file, per split and group."""
from __future__ import annotations

from typing import Callable

import click

from ._protocol_text import with_protocol
from .errors import handle_user_errors
from .options import (
    common_options,
    max_memory_option,
    overwrite_option,
    precision_option,
    protocol_options,
    save_option,
    seeds_option,
    sgd_options,
    splits_option,
    sweep_options,
    thresholds_options,
)
from .render import emit, log, splits_table
from .setup import (
    check_batch_fits,
    check_writable,
    make_session,
    per_class_option,
    require_head,
    require_split,
    run_trained,
    save_head_file,
    write_per_class,
)
from .sweeps import run_sweep_command
from .trained import apply_preset, crt_human, loss_options, preset_option, stored_head_command


def splits_human(title: Callable[[dict], str], splits) -> Callable[[dict], str]:
    """A method's table under ``title(result)``, its protocol sections after it."""
    return with_protocol(lambda r: f"{title(r)}\n{splits_table(r, splits)}")


@click.command()
@common_options
@thresholds_options
@splits_option
@per_class_option
@overwrite_option
@protocol_options
@max_memory_option
@precision_option
@handle_user_errors
def joint(features, as_json, quiet, allow_incomplete, thresholds, splits, per_class_out, overwrite, protocol,
          max_memory, precision):
    """Evaluate the stored stage-1 (joint) classifier: the baseline every method is compared with."""
    from ..runners.stored_head import run_joint

    check_writable(per_class_out, overwrite, [features])
    session = make_session(features, allow_incomplete, splits, thresholds=thresholds, protocol=protocol,
                           max_memory=max_memory, precision=precision)
    require_head(session.store, "joint")
    run = run_joint(session)
    write_per_class(per_class_out, overwrite, session, {"joint": run.head}, run.result, features, quiet)
    emit(run.result, as_json, splits_human(lambda r: "joint (stored stage-1 classifier), accuracy %",
                                           session.eval_splits))


@click.command()
@common_options
@thresholds_options
@click.option("--variant", type=click.Choice(["cl2n", "l2n", "un", "cos"]), default="cl2n", show_default=True,
              help="cl2n: centre on the train mean then L2-normalise; l2n: normalise; un: raw; cos: reference's cosine.")
@splits_option
@save_option
@per_class_option
@overwrite_option
@protocol_options
@max_memory_option
@precision_option
@handle_user_errors
def ncm(features, as_json, quiet, allow_incomplete, thresholds, variant, splits, save, per_class_out, overwrite,
        protocol, max_memory, precision):
    """Nearest class mean on the cached train features (needs no stored classifier)."""
    from ..runners.features import run_ncm

    check_writable(save, overwrite, [features])
    check_writable(per_class_out, overwrite, [features, save])
    session = make_session(features, allow_incomplete, splits, thresholds=thresholds, protocol=protocol,
                           max_memory=max_memory, precision=precision)
    require_split(session.store, "train", "to compute class means")
    run = run_ncm(session, variant)
    save_head_file(save, overwrite, run.head, run.result, features, quiet)
    write_per_class(per_class_out, overwrite, session, {"ncm": run.head}, run.result, features, quiet)
    emit(run.result, as_json, splits_human(lambda r: f"NCM ({variant}), accuracy %", session.eval_splits))


@click.command("tau-sweep")
@common_options
@thresholds_options
@sweep_options
@per_class_option
@overwrite_option
@protocol_options
@handle_user_errors
def tau_sweep(features, as_json, quiet, allow_incomplete, thresholds, taus, select_on, metric, eval_split,
              per_class_out, overwrite, protocol, max_memory, precision):
    """tau-normalise the stored classifier (w / ||w||^tau, bias dropped) for every tau in one GEMM.

    --bootstrap and --test-priors are reported at the selected tau.
    """
    from ..runners.sweeps import run_tau_sweep

    run_sweep_command("tau-sweep", run_tau_sweep, features, as_json, allow_incomplete, thresholds, taus, select_on,
                      metric, eval_split, protocol, max_memory, per_class_out, overwrite, quiet, precision=precision)


@click.command()
@common_options
@thresholds_options
@sgd_options(10, 0.2, "ib, cb (class-balanced, default), sqrt, pb or a power q.", grid=True)
@click.option("--views", default=0, show_default=True, type=click.IntRange(0),
              help="Train on K stored augmented views (a random view per row per step; at most the stored K).")
@loss_options(("ce", "balanced-softmax", "las"), "ce")
@click.option("--class-weights", type=click.Choice(["none", "cb"]), default="none", show_default=True,
              help="cb: class-balanced loss weights (Cui et al.) with --beta.")
@click.option("--beta", default=0.9999, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--label-smoothing", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Uniform label smoothing ε (--loss ce or balanced-softmax).")
@preset_option("crt")
@per_class_option
@seeds_option
@protocol_options
@handle_user_errors
def crt(features, as_json, quiet, allow_incomplete, thresholds, seed, device, splits, save, overwrite, views, preset,
        per_class_out, seeds, protocol, max_memory, precision, **options):
    """Re-train the linear classifier on the cached features (class-balanced sampling by default)."""
    check_writable(save, overwrite, [features])
    check_writable(per_class_out, overwrite, [features, save])
    chosen = apply_preset("crt", preset, options, quiet, lists=("lr", "weight_decay")) if preset else None
    lr, weight_decay, batch_size = options.pop("lr"), options.pop("weight_decay"), options["batch_size"]
    session = make_session(features, allow_incomplete, splits, device, seeds[0] if seeds else seed, thresholds,
                           protocol, max_memory, precision)
    require_split(session.store, "train", "to train on")
    check_batch_fits(session.store, batch_size, chosen)
    stored = session.store.splits["train"].views
    if views > stored:
        raise click.BadParameter(f"{views} views asked for, but {features} stores {stored} train views",
                                 param_hint="--views")
    grid = None if len(lr) == len(weight_decay) == 1 else (lr, weight_decay)
    run = run_trained(session, "crt", seeds, views=views, log=None if quiet else log, grid=grid, lr=lr[0],
                      weight_decay=weight_decay[0], **options)
    if chosen is not None:
        run.result["preset"] = chosen
    save_head_file(save, overwrite, run.head, run.result, features, quiet)
    write_per_class(per_class_out, overwrite, session, {"crt": run.head}, run.result, features, quiet)
    emit(run.result, as_json, with_protocol(crt_human))


lws = stored_head_command("lws", "Learn one scale per class on the frozen stored classifier (Places-LT: --lr 0.1).",
                          presets=("lws", "lws_las"))

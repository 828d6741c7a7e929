"""``ltr compare``: every method with its defaults, one table."""
from __future__ import annotations

import functools
from typing import Any

import click

from ..registry import METHOD_NAMES, OPT_IN_METHODS
from ._protocol_text import ESTIMATOR_LABELS, corrections, em_caveat, fmt_ci
from .errors import handle_user_errors
from .options import (
    MethodNames,
    allow_incomplete_option,
    device_option,
    json_option,
    max_memory_option,
    precision_option,
    protocol_options,
    quiet_option,
    seed_option,
    seeds_option,
    thresholds_options,
    training_options,
)
from .render import emit, fmt_acc, log
from .setup import check_training_fits, check_writable, eval_splits, open_store, per_class_option


def _by_file(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """Rows grouped by their "features" file, in order of first appearance."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r.get("features"), []).append(r)
    return list(groups.items())


def compare_table(result: dict) -> str:
    """method x many / medium / few / all per split, plus seconds (accuracy %); grouped by file."""
    splits = result["eval_splits"]
    groups = ("many", "medium", "few", "all")
    width = max([6] + [len(r["method"]) + 1 for r in result["rows"]])
    header = f"{'method':<{width}}  " + "   ".join(
        " ".join(f"{(s[:4] + '/' + g[:3]):>8}" for g in groups) for s in splits
    ) + f"  {'seconds':>8}"
    t = result.get("thresholds") or {"many": 100, "few": 20}
    lines = [f"accuracy % per split and shot group (many > {t['many']}, medium {t['few']}-{t['many']}, "
             f"few < {t['few']} train images)", header]
    several = isinstance(result.get("features"), list)
    notes: list[str] = []
    for path, rows in _by_file(result["rows"]):
        if several:
            lines.append(f"[{path}]")
        for r in rows:
            cells = "   ".join(" ".join(f"{fmt_acc((r.get(s) or {}).get(g)):>8}" for g in groups) for s in splits)
            label = r["method"]
            if r.get("note"):  # e.g. a method run on a random-init stored classifier
                if r["note"] not in notes:
                    notes.append(r["note"])
                label += "*" * (notes.index(r["note"]) + 1)
            lines.append(f"{label:<{width}}  {cells}  {r['seconds']:>8.2f}")
    for k, note in enumerate(notes):
        lines.append(f"({'*' * (k + 1)} {note})")
    for s in result.get("skipped", []):
        where = f" in {s['features']}" if several and "features" in s else ""
        lines.append(f"(skipped {s['method']}{where}: {s['reason']})")
    for section in (_tail_section(result, width), _seeds_section(result, width), _ci_section(result, width),
                    _shifted_section(result, width)):
        if section:
            lines += ["", section]
    return "\n".join(lines)


TAIL_COLUMNS = (("mean_class", "mcls"), ("worst_class", "worst"), ("worst_10pct", "w10%"), ("hmean", "hmean"))


def _tail_section(result: dict, width: int) -> str:
    """Per split: balanced (mean-class) accuracy, the worst class, the mean of the worst 10 % of classes
    and the harmonic mean of the shot groups (accuracy %)."""
    splits = result["eval_splits"]
    if not result["rows"]:
        return ""
    lines = ["balanced and tail accuracy % per split: mean-class (= balanced accuracy), worst class, mean of the "
             "worst 10 % of classes, harmonic mean of many/medium/few",
             f"{'method':<{width}}  " + "   ".join(" ".join(f"{(s[:4] + '/' + c):>10}" for _, c in TAIL_COLUMNS)
                                                   for s in splits)]
    several = isinstance(result.get("features"), list)
    for r in result["rows"]:
        cells = "   ".join(" ".join(f"{fmt_acc((r.get(s) or {}).get(k)):>10}" for k, _ in TAIL_COLUMNS)
                           for s in splits)
        lines.append(f"{r['method']:<{width}}  {cells}" + (f"  {r['features']}" if several else ""))
    return "\n".join(lines)


def _row_label(r: dict, several: bool, width: int) -> str:
    return f"{r['method']:<{width}}" + (f"  {r['features']}" if several else "")


def _seeds_section(result: dict, width: int) -> str:
    rows = [r for r in result["rows"] if r.get("over_seeds")]
    if not rows:
        return ""
    seeds = ", ".join(map(str, rows[0]["over_seeds"]["seeds"]))
    lines = [f"trained heads over seeds {seeds}: mean ± std (accuracy %)",
             f"{'method':<{width}}  " + "  ".join(f"{s + '/all':>14}" for s in result["eval_splits"])]
    several = isinstance(result.get("features"), list)
    for r in rows:
        cells = []
        for s in result["eval_splits"]:
            m = (r["over_seeds"].get(s) or {}).get("all")
            cells.append(f"{100 * m['mean']:7.2f} ± {100 * m['std']:4.2f}" if m else f"{'-':>14}")
        lines.append(f"{r['method']:<{width}}  " + "  ".join(cells) + (f"  {r['features']}" if several else ""))
    return "\n".join(lines)


def _ci_section(result: dict, width: int) -> str:
    """Per split: top-1 with its interval, and the paired difference to the best row."""
    rows = [r for r in result["rows"] if r.get("ci")]
    if not rows:
        return ""
    p = result.get("protocol") or rows[0].get("protocol", {})
    level = f"{100 * p.get('ci_level', 0.95):g} %"
    several = isinstance(result.get("features"), list)
    lines = [f"{level} bootstrap intervals ({p.get('bootstrap')} resamples, stratified by class) and paired "
             "differences to the best method (same resamples), top-1 accuracy %"]
    for split in result["eval_splits"]:
        lines.append(f"{split}: {'method':<{width}}  {'all':>6}  {'interval':>16}  {'- best':>7}  "
                     f"{'interval of difference':>22}  verdict")
        for r in rows:
            if split not in r["ci"]:
                continue
            vs = (r.get("vs_best") or {}).get(split)
            if vs is None:
                diff, verdict = f"{'':>7}  {'':>22}", ""
            else:
                lo, hi = vs["ci"]
                interval = "-" if lo is None else f"[{100 * lo:+6.2f}, {100 * hi:+6.2f}]"
                is_best = vs["best"] == r["method"] and vs.get("best_features") == r.get("features")
                verdict = "best" if is_best else ("differs from best" if vs["differs"] else "not distinguishable")
                diff = f"{100 * vs['diff']:+7.2f}  {interval:>22}"
            lines.append(f"{'':>{len(split) + 2}}{_row_label(r, False, width)}  {fmt_acc(r[split]['all'])}  "
                         f"{fmt_ci(r['ci'][split]['all'])}  {diff}  {verdict}" + (f"  {r['features']}" if several else ""))
    return "\n".join(lines)


def _shifted_section(result: dict, width: int) -> str:
    """Top-1 on the test split under each shifted prior: plain, known-prior and EM corrected."""
    rows = [r for r in result["rows"] if r.get("shifted")]
    if not rows:
        return ""
    names = list(rows[0]["shifted"])
    col = max(8, *(len(n) for n in names))
    several = isinstance(result.get("features"), list)
    lines = ["test split under shifted priors: top-1 %, plain / after correction with the true prior / with each "
             "estimated prior"]
    lines.append(f"{'method':<{width}}  {'':<6}" + "".join(f"  {n:>{col}}" for n in names))
    notes = []
    for r in rows:
        corrected = r.get("shifted_corrected") or {}
        variants = [("plain", r["shifted"])]
        if "reason" in corrected:  # a method without an implied prior
            notes.append(f"({r['method']}: no prior correction: {corrected['reason']})")
        else:
            variants += [(ESTIMATOR_LABELS.get(k, k), {n: c[k] for n, c in corrected.items()})
                         for k in corrections(corrected)]
            caveat = em_caveat(r["method"], corrections(corrected), result.get("protocol") or {})
            if caveat:
                notes.append(caveat)
        for k, (kind, table) in enumerate(variants):
            label = (r["method"] if k == 0 else "")
            cells = "".join(f"  {fmt_acc((table.get(n) or {}).get('all')):>{col}}" for n in names)
            lines.append(f"{label:<{width}}  {kind:<6}{cells}" + (f"  {r['features']}" if several and k == 0 else ""))
    return "\n".join(lines + notes)


def compare_options(f):
    """The options of a compare run, shared by ``ltr compare`` and ``ltr report`` (see :func:`run_compare_command`)."""
    opts = [
        click.argument("paths", nargs=-1, type=click.Path(dir_okay=False, path_type=str), metavar="[FEATURES]..."),
        click.option("--features", "-f", "features", multiple=True,
                     type=click.Path(dir_okay=False, path_type=str),
                     help="Feature file (.h5); repeat for several stage-1 representations of one dataset "
                          "(same classes and train counts): one table, grouped by file. Also given "
                          "positionally, like `ltr info FEATURES`."),
        json_option,
        quiet_option,
        allow_incomplete_option,
        click.option("--methods", default=None, type=MethodNames(),
                     help=f"Comma-separated subset of {', '.join(METHOD_NAMES)} (default: all the file "
                          f"supports but {', '.join(OPT_IN_METHODS)}, which run when named; old spellings "
                          "such as tau accepted)."),
        training_options,
        thresholds_options,
        click.option("--splits", default=None, help="Comma-separated splits to evaluate (default: val and test)."),
        seed_option,
        seeds_option,
        protocol_options,
        device_option,
        max_memory_option,
        precision_option,
    ]

    @functools.wraps(f)
    def merged(*args: Any, paths: tuple = (), features: tuple = (), **kwargs: Any) -> Any:
        features = (*features, *paths)
        if not features:
            ctx = click.get_current_context()
            raise click.UsageError(f"Missing feature file: give FEATURES (or -f FEATURES), e.g. "
                                   f"`{ctx.command_path} feats.h5`", ctx)
        return f(*args, features=features, **kwargs)

    for opt in reversed(opts):
        merged = opt(merged)
    return merged


@click.command()
@compare_options
@click.option("--out", "out", type=click.Path(dir_okay=False), help="Also write the JSON results to this file.")
@per_class_option
@click.option("--overwrite", is_flag=True, help="Replace an existing --out or --per-class-out file.")
@handle_user_errors
def compare(features, as_json, quiet, allow_incomplete, methods, overrides, thresholds, splits, out, per_class_out,
            overwrite, seed, seeds, protocol, device, max_memory, precision):
    """Run every default method of the registry (joint, ncm, crt, tau_norm and logit_adjust with tau
    selected on val, lws, pc_softmax, marc) with defaults; print one table. The opt-in methods (see
    --methods) run when named: on ImageNet-LT-sized files wb, knn and linear_probe each cost more on a
    CPU than the rest; disalign and experts are later methods, not in the default set.

    Methods that need the stored classifier are skipped, with the reason, when the file has none
    or when it is a random initialisation (name them in --methods to run them anyway). cRT and LWS
    use --batch-size auto (512, or N // 8 on fewer than 4096 train rows) and auto epochs (at least
    500 optimiser steps). With several --features, every method runs on each file (each file is
    read once). --per-class-out writes one CSV with a row per method, split and class (and a
    features column with several files).
    """
    check_writable(out, overwrite, features)  # fail early if --out cannot be written
    if per_class_out:
        check_writable(per_class_out, overwrite, [*features, out])
    heads: dict = {}
    result, sessions = run_compare_command(features, allow_incomplete, methods, overrides, thresholds, splits, seed,
                                           seeds, protocol, device, quiet, heads=heads if per_class_out else None,
                                           max_memory=max_memory, precision=precision)
    if per_class_out:
        from ..per_class import per_class_rows, write_per_class_csv

        rows = [{"features": path, **r} if len(features) > 1 else r
                for session, path in zip(sessions, features)
                for r in per_class_rows(session, heads[path])]
        write_per_class_csv(per_class_out, rows, overwrite, [*features, out])
        result["per_class_out"] = per_class_out
        log(f"wrote per-class accuracy to {per_class_out}", quiet)
    if out:
        from ..results import to_json
        from ..store import atomic_write

        text = to_json(result)
        atomic_write(out, lambda tmp: tmp.write_text(text), overwrite, features)
    emit(result, as_json, compare_table)


def compare_sessions(features, allow_incomplete, thresholds, splits, seed, protocol, device, max_memory=None,
                     precision="float32") -> list:
    """One :class:`~lt_rebalance.session.Session` per --features file, after the command-line checks."""
    from ..session import Session
    from .setup import check_precision

    check_precision(precision, device)
    dupes = sorted({f for f in features if features.count(f) > 1})
    if dupes:
        raise click.BadParameter(f"{', '.join(dupes)} given more than once", param_hint="--features")
    sessions = []
    for path in features:
        store = open_store(path, allow_incomplete)
        if protocol.test_priors and "test" not in store.splits:
            raise click.ClickException(f"{path} has no 'test' split, which --test-priors are evaluated on")
        sessions.append(Session(store, eval_splits=eval_splits(store, splits), device=device,
                                seed=seed, thresholds=thresholds, protocol=protocol, max_memory=max_memory,
                                precision=precision))
    return sessions


def run_compare_command(features, allow_incomplete, methods, overrides, thresholds, splits, seed, seeds, protocol,
                        device, quiet, heads=None, max_memory=None, precision="float32") -> tuple[dict, list]:
    """Check the options, run :func:`lt_rebalance.study.compare_files`; its result and the sessions."""
    from ..registry import DEFAULT_METHODS
    from ..study import compare_files

    sessions = compare_sessions(features, allow_incomplete, thresholds, splits, seed, protocol, device, max_memory,
                                precision)
    for session in sessions:
        check_training_fits(session.store, overrides, methods or DEFAULT_METHODS)
    result = compare_files(sessions, list(features), methods, overrides, log=None if quiet else log, heads=heads,
                           seeds=seeds)
    return result, sessions

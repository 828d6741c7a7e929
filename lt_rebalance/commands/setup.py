"""What a command does before its method runs: open the file, check it has what the command needs,
build the :class:`~lt_rebalance.session.Session`; and after: save the head."""
from __future__ import annotations

from typing import Any, Iterable, Optional

import click

from .errors import user_errors
from .render import log


def open_store(path: str, allow_incomplete: bool = False):
    from ..store import FeatureStore

    with user_errors():
        return FeatureStore(path, allow_incomplete=allow_incomplete)


def check_writable(path: Optional[str], overwrite: bool, inputs: Iterable[Optional[str]] = ()) -> None:
    """Fail before any work when an output file (--out, --save) cannot be written or is one of the
    command's ``inputs`` (with or without --overwrite); None: no output."""
    if path:
        from ..outputs import check_output

        check_output(path, overwrite, inputs)


def eval_splits(store, names: Optional[str] = None) -> list[str]:
    """The splits named in ``names`` (comma-separated, each checked), or [] for the session's default."""
    wanted = [s.strip() for s in (names or "").split(",") if s.strip()]
    for s in wanted:
        if s not in store.splits:
            raise click.ClickException(f"no split {s!r} in {store.path}; available: {', '.join(store.splits)}")
    return wanted


def require_split(store, name: str, purpose: str) -> None:
    if name not in store.splits:
        raise click.ClickException(
            f"{store.path} has no {name!r} split, needed {purpose}; available: {', '.join(store.splits)}"
        )


def require_head(store, command: str) -> None:
    """A stored classifier must exist; a random-init one gets a warning line (its numbers mean little)."""
    if not store.has_head:
        raise click.ClickException(
            f"{store.path} has no stored classifier (/head/weight), which `ltr {command}` needs; "
            "`ltr ncm` and `ltr crt` work without one"
        )
    if store.head_random_init:
        from ..store import RANDOM_HEAD_NOTE

        click.echo(f"warning: {store.path}: {RANDOM_HEAD_NOTE}; `ltr {command}` builds on it", err=True)


def check_batch_fits(store, batch_size: Any, preset: Optional[dict] = None) -> None:
    """An explicit --batch-size must not exceed the train rows ("auto" shrinks to them; no check
    when the file has no train split). ``preset``: the JSON ``"preset"`` of the run, when its
    batch size came from there (the message then says so)."""
    rows = store.splits["train"].rows if "train" in store.splits else None
    if batch_size != "auto" and rows is not None and batch_size > rows:
        if preset is not None and "batch_size" not in preset["overridden"]:
            raise click.BadParameter(f"--preset {preset['name']} sets batch size {batch_size}, larger than the "
                                     f"{rows} train rows; give --batch-size (at most {rows}, or auto) to override "
                                     "it", param_hint="--batch-size")
        raise click.BadParameter(f"{batch_size} is larger than the {rows} train rows; give at most {rows}, "
                                 "or leave it at auto", param_hint="--batch-size")


def check_training_fits(store, overrides: dict[str, dict], methods: Any) -> None:
    """:func:`check_batch_fits` for the trained methods among ``methods`` that can run on this file (those
    built on the stored classifier only when it has one): an option only blocks the methods that use it."""
    from ..registry import BY_NAME

    for m in methods:
        spec = BY_NAME[m]
        if spec.trained and (not spec.needs_head or store.has_head) and "batch_size" in overrides.get(m, {}):
            check_batch_fits(store, overrides[m]["batch_size"])


def check_precision(precision: str, device: str) -> None:
    """``--precision bfloat16`` on hardware without bfloat16 units: one warning line (the run goes on,
    slower); the library's own :class:`~lt_rebalance.precision.PrecisionWarning` is then silenced."""
    import warnings

    from ..precision import PrecisionWarning, hardware_note

    note = hardware_note(precision, device)
    if note:
        click.echo(f"warning: {note}", err=True)
        warnings.filterwarnings("ignore", category=PrecisionWarning)


def make_session(features: str, allow_incomplete: bool, splits: Optional[str], device: str = "cpu", seed: int = 0,
                 thresholds: Optional[dict] = None, protocol: Any = None, max_memory: Optional[int] = None,
                 precision: str = "float32"):
    """The :class:`~lt_rebalance.session.Session` of a method command, its options checked."""
    from ..protocols import Protocol
    from ..session import Session

    store = open_store(features, allow_incomplete)
    protocol = protocol or Protocol()
    if protocol.test_priors:
        require_split(store, "test", "for --test-priors")
    check_precision(precision, device)
    return Session(store, eval_splits=eval_splits(store, splits), device=device, seed=seed,
                   thresholds=thresholds or {}, protocol=protocol, max_memory=max_memory, precision=precision)


def save_head_file(save: Optional[str], overwrite: bool, head: Any, result: dict, features: str, quiet: bool) -> None:
    """``--save``: the fitted head to ``save`` (result gains ``"saved"``); nothing when None."""
    if save:
        from ..head_io import head_state, save_head

        save_head(save, head_state(head, result["method"], result.get("params"), features), overwrite)
        result["saved"] = save
        log(f"saved {result['method']} head to {save}", quiet)


def run_trained(session: Any, method: str, seeds: Optional[list[int]], **options: Any):
    """The run of trained ``method`` (its registry runner), or once per seed of ``seeds``
    (:func:`lt_rebalance.study.run_seeds`)."""
    from ..registry import runner
    from ..study import run_seeds

    if seeds and len(seeds) > 1:
        return run_seeds(session, method, seeds, **options)
    return runner(method)(session, **options)


per_class_option = click.option(
    "--per-class-out", "per_class_out", type=click.Path(dir_okay=False), default=None,
    help="Also write per-class accuracy (CSV: method, split, class, train_count, group, support, correct, "
         "accuracy) of every evaluated split to this file (replaced only with --overwrite).",
)


def write_per_class(path: Optional[str], overwrite: bool, session: Any, heads: dict, result: dict, features: Any,
                    quiet: bool) -> None:
    """``--per-class-out``: the per-class CSV of ``heads`` (method -> head) on ``session``'s splits;
    ``result`` gains ``"per_class_out"``; nothing when None."""
    if path:
        from ..per_class import per_class_rows, write_per_class_csv

        inputs = [features] if isinstance(features, str) else list(features)
        write_per_class_csv(path, per_class_rows(session, heads), overwrite, inputs)
        result["per_class_out"] = path
        log(f"wrote per-class accuracy to {path}", quiet)

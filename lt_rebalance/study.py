"""Studies over methods: ``compare`` (every method of the registry on one or more files), seeds
(a trained method once per seed) and temperature calibration of a method's head."""
from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from typing import Any, Callable, Optional, Sequence

import torch

from . import registry
from .logit_store import LogitStore
from .metrics import head_row_statistics
from .posthoc import TemperatureScaled, calibration_from_rows
from .protocols import Protocol, paired_differences, seed_summary
from .runners import MethodRun
from .session import Session
from .store import RANDOM_HEAD_NOTE
from .text_store import has_text_head

Log = Optional[Callable[[str], None]]


def _call(session: Session, method: registry.Method, logits: Optional[LogitStore], log: Log,
          **options: Any) -> MethodRun:
    """``method``'s runner with the arguments it takes: ``log`` for trained methods, ``logits`` for
    those that use the stored classifier's shared logits."""
    if method.trained:
        options["log"] = log
    if method.uses_stored_logits:
        options["logits"] = logits
    return registry.runner(method.name)(session, **options)


def run_seeds(session: Session, method: str, seeds: Sequence[int], logits: Optional[LogitStore] = None,
              **options: Any) -> MethodRun:
    """Train ``method`` (a trained method of the registry) once per seed; the first seed's run.

    cRT trains its seeds as members of one batched run; the others run in turn and share
    ``logits`` (a store of their own when None: LWS and MARC build the joint logits once).
    The result gains ``"over_seeds": {"seeds": [...], <split>: {metric: {"mean", "std"}}}`` (sample
    std); the protocol (bootstrap, shifted priors) is computed for the first seed's head only.
    """
    spec = registry.get(method)
    if not spec.trained:
        raise ValueError(f"--seeds applies to the trained heads ({', '.join(registry.TRAINED_METHODS)}); "
                         f"got {method!r}")
    if spec.name == "crt" and options.get("grid") is None:
        return registry.runner("crt")(session, seeds=seeds, **options)  # the seeds as members of one batched run
    log = options.pop("log", None)
    owned = LogitStore(session) if logits is None else contextlib.nullcontext(logits)
    with owned as shared:
        runs = [_call(replace(session, seed=seed, protocol=session.protocol if i == 0 else Protocol()),
                      spec, shared, log, **options) for i, seed in enumerate(seeds)]
    first = runs[0]
    first.result["over_seeds"] = {"seeds": list(seeds),
                                  **seed_summary([r.result for r in runs], session.eval_splits)}
    return first


def run_calibrate(session: Session, method: str, eval_split: str = "test", log: Log = None,
                  **options: Any) -> MethodRun:
    """Temperature scaling of ``method``'s head (``options`` go to its runner).

    T is fitted on val; NLL and ECE before and after are reported on ``eval_split``, over all rows
    and per shot group: ``{"method": "calibrate", "base_method", "temperature", "fit_on": "val",
    "eval_split", "before": {all|many|medium|few: {nll, ece, n}}, "after": {...}}``.
    """
    spec = registry.get(method)
    for split in ("val", eval_split):
        if split not in session.store.splits:
            raise ValueError(f"{session.store.path} has no {split!r} split, which calibration needs; available: "
                             f"{', '.join(session.store.splits)}")
    if spec.needs_head and not session.store.has_head:
        raise ValueError(f"{session.store.path} has no stored classifier, which {spec.name} needs")
    head = _call(session, spec, None, log, **options).head
    scaled = TemperatureScaled(head).fit(*session.load("val"))
    X, y = session.load(eval_split)
    before, after = (
        calibration_from_rows(head_row_statistics(h, X, y, session.num_classes), y, session.counts,
                              **session.thresholds)
        for h in (head, scaled)
    )
    return MethodRun({"method": "calibrate", "base_method": spec.name, "temperature": scaled.temperature_,
                      "fit_on": "val", "eval_split": eval_split, "before": before, "after": after}, scaled)


def _skip_reason(session: Session, spec: registry.Method, named: bool) -> Optional[str]:
    """Why ``compare`` skips ``spec`` on this file (None: it runs)."""
    if spec.needs_head and not session.store.has_head:
        return "the file has no stored classifier"
    if spec.needs_head and session.store.head_random_init and not named:
        return RANDOM_HEAD_NOTE
    if spec.needs_text_head and not has_text_head(session.store):
        return "the file has no text head (/text_head); add one with `ltr text-head` (docs/FOUNDATION.md)"
    if spec.needs_val and not session.has_rows("val"):
        return f"{spec.name} selects {spec.selects} on val, and the file has no val rows"
    return None


def compare(
    session: Session,
    methods: Optional[Sequence[str]] = None,
    options: Optional[dict[str, dict]] = None,
    log: Log = None,
    heads: Optional[dict[str, Any]] = None,
    seeds: Optional[Sequence[int]] = None,
) -> dict:
    """Run ``methods`` (default: the registry's default methods) with defaults; time each.

    ``options`` maps a method to keyword arguments for its runner (e.g. fewer epochs). ``heads``,
    when given, receives each method's fitted head (name -> head), e.g. to save one. ``seeds``: the
    trained methods run once per seed (:func:`run_seeds`). Returns ``{"rows": [{"method",
    <split>: metrics, "seconds", ...}], "skipped": [{"method", "reason"}], "eval_splits",
    "thresholds"}``; with a bootstrap each row gains ``"vs_best"`` (paired differences against the
    best row, same resamples). A random-init stored classifier (``/head`` attribute
    ``random_init``) is no stage-1 classifier: by default the methods built on it are skipped;
    named in ``methods``, they run and their row has ``"note"``.
    """
    result, samples = _run_methods(session, methods, options, log, heads, seeds)
    if session.protocol.bootstrap:
        paired_differences(result["rows"], samples, session.protocol.ci_level)
    return result


def _run_methods(session: Session, methods: Optional[Sequence[str]], options: Optional[dict[str, dict]], log: Log,
                 heads: Optional[dict[str, Any]], seeds: Optional[Sequence[int]]) -> tuple[dict, list[dict]]:
    """:func:`compare`'s result without paired differences, and each row's bootstrap samples."""
    names = [registry.canonical_method(m) for m in methods] if methods else list(registry.DEFAULT_METHODS)
    specs = [registry.BY_NAME[n] for n in names]
    rows, skipped, row_samples = [], [], []
    scored = [s for s in specs if s.scored_from_stored]
    with LogitStore(session, keep_eval=len(scored) > 1) as logits:
        for i, spec in enumerate(specs):
            later = specs[i:]
            if not any(s.trained_on_stored for s in later):
                logits.release("joint")  # no later method trains on the joint logits
            if not any(s.scored_from_stored for s in later):
                logits.release("eval")  # nor is scored from the kept evaluation logits
            reason = _skip_reason(session, spec, named=bool(methods))
            if reason:
                skipped.append({"method": spec.name, "reason": reason})
                continue
            note = RANDOM_HEAD_NOTE if spec.needs_head and session.store.head_random_init else None
            kwargs = dict((options or {}).get(spec.name, {}))
            t0 = time.perf_counter()
            if seeds and len(seeds) > 1 and spec.trained:
                run = run_seeds(session, spec.name, seeds, logits=logits, log=log, **kwargs)
            else:
                sub = replace(session, seed=seeds[0]) if seeds and spec.trained else session
                run = _call(sub, spec, logits, log, **kwargs)
            if heads is not None:
                heads[spec.name] = run.head
            row = run.result
            row.pop("history", None)
            if note:
                row["note"] = note
            row["seconds"] = round(time.perf_counter() - t0, 4)
            rows.append(row)
            row_samples.append(run.samples)
            if log:
                p = row.get("params", {})
                steps = f" ({p['epochs']} epochs x batch {p['batch_size']} = {p['steps']} steps)" if "steps" in p else ""
                log(f"{spec.name}: {row['seconds']:.2f} s{steps}")
    return {"rows": rows, "skipped": skipped, "eval_splits": list(session.eval_splits),
            "thresholds": session.group_thresholds}, row_samples


def check_same_classes(sessions: Sequence[Session]) -> None:
    """ValueError (with the reason) unless every file has the same classes, train counts and splits."""
    first = sessions[0]
    for s in sessions[1:]:
        a, b = first.store, s.store
        if b.num_classes != a.num_classes:
            reason = f"{b.num_classes} classes vs {a.num_classes}"
        elif a.class_names is not None and b.class_names is not None and a.class_names != b.class_names:
            i = next(k for k, (x, y) in enumerate(zip(a.class_names, b.class_names)) if x != y)
            reason = f"class {i} is {b.class_names[i]!r} vs {a.class_names[i]!r}"
        elif not torch.equal(s.counts, first.counts):
            i = int((s.counts != first.counts).nonzero()[0])
            reason = f"class {i} has {int(s.counts[i])} train rows vs {int(first.counts[i])}"
        elif list(s.eval_splits) != list(first.eval_splits):
            reason = f"evaluation splits {', '.join(s.eval_splits)} vs {', '.join(first.eval_splits)}"
        else:
            continue
        raise ValueError(f"cannot compare {b.path} with {a.path}: {reason}; the files of one compare must "
                         "share classes, train counts and splits (stage-1 representations of one dataset)")


def compare_files(
    sessions: Sequence[Session],
    labels: Sequence[str],
    methods: Optional[Sequence[str]] = None,
    options: Optional[dict[str, dict]] = None,
    log: Log = None,
    heads: Optional[dict[str, dict[str, Any]]] = None,
    seeds: Optional[Sequence[int]] = None,
) -> dict:
    """:func:`compare` on several feature files (``labels``: their paths as given) in one result.

    Every row and skipped entry gains ``"features"``. With a bootstrap, rows gain ``"vs_best"``:
    paired differences against the best row of all files when their test labels are identical
    (same rows, same order: the same resamples apply), else against the best row of the same file.
    ``heads``, when given, receives label -> method -> fitted head. For one file, ``"features"`` is
    its path, else the list.
    """
    check_same_classes(sessions)
    rows, skipped, samples, owners = [], [], [], []
    for label, session in zip(labels, sessions):
        if log and len(sessions) > 1:
            log(f"== {label}")
        file_heads: Optional[dict[str, Any]] = {} if heads is not None else None
        part, part_samples = _run_methods(session, methods, options, log, file_heads, seeds)
        if heads is not None:
            heads[label] = file_heads
        for r in (*part["rows"], *part["skipped"]):
            r["features"] = label
        rows += part["rows"]
        skipped += part["skipped"]
        samples += part_samples
        owners += [label] * len(part["rows"])
    protocol = sessions[0].protocol
    if protocol.bootstrap:
        first = sessions[0]
        same_test = "test" in first.store.splits and all(
            "test" in s.store.splits and torch.equal(s.load("test")[1], first.load("test")[1]) for s in sessions)
        groups = [list(range(len(rows)))] if same_test else \
            [[i for i, o in enumerate(owners) if o == label] for label in labels]
        for g in groups:
            paired_differences([rows[i] for i in g], [samples[i] for i in g], protocol.ci_level)
    return {"rows": rows, "skipped": skipped, "eval_splits": list(sessions[0].eval_splits),
            "thresholds": sessions[0].group_thresholds, "features": labels[0] if len(labels) == 1 else list(labels),
            **({"protocol": protocol.describe()} if protocol.active else {})}

"""Terminal tables of the evaluation protocols: intervals, shifted test priors, seeds (accuracy %)."""
from __future__ import annotations

from typing import Optional

from .render import fmt_acc

CI_COLUMNS = ("all", "many", "medium", "few", "mean_class")
SHIFT_COLUMNS = ("all", "many", "medium", "few")


def fmt_ci(ci: Optional[list]) -> str:
    """[lo, hi] as '[ 89.75, 94.75]' in percent ('-' when undefined)."""
    if not ci or ci[0] is None:
        return f"{'-':>16}"
    return f"[{fmt_acc(ci[0])},{fmt_acc(ci[1])}]"


def ci_text(result: dict) -> str:
    """One line per split: the bootstrap interval of each metric."""
    ci = result.get("ci")
    if not ci:
        return ""
    p = result.get("protocol", {})
    lines = [f"{100 * p.get('ci_level', 0.95):g} % bootstrap intervals ({p.get('bootstrap')} resamples, stratified "
             "by class), accuracy %", f"{'split':<6}  " + "  ".join(f"{k:>16}" for k in CI_COLUMNS)]
    for split, cis in ci.items():
        lines.append(f"{split:<6}  " + "  ".join(fmt_ci(cis.get(k)) for k in CI_COLUMNS))
    return "\n".join(lines)


ESTIMATOR_LABELS = {"known_prior": "known", "em": "EM", "bbse": "BBSE", "rlls": "RLLS", "mapls": "MAPLS"}


def em_caveat(method: str, fixes: list[str], protocol: dict) -> str:
    """A note when EM ran on scores that are no calibrated posteriors (the registry's ``calibrated``;
    docs/METHODS.md, "Prior correction"), '' otherwise."""
    from ..registry import BY_NAME

    spec = BY_NAME.get(method)
    if spec is not None and not spec.calibrated and "em" in fixes and not protocol.get("calibration"):
        return (f"({method}: its scores are no calibrated posteriors, so EM's estimate can collapse; use "
                "--prior-calibration bcts or --prior-estimators bbse)")
    return ""


def corrections(corrected: dict) -> list[str]:
    """The corrections present in a result's ``shifted_corrected`` (known prior first, then the
    estimators in the order run); [] for a method without an implied prior."""
    if not corrected or "reason" in corrected:
        return []
    return list(next(iter(corrected.values())))


def shifted_text(result: dict) -> str:
    """The shifted test priors: plain predictions, then top-1 after each prior correction, per shift."""
    shifted = result.get("shifted")
    if not shifted:
        return ""
    corrected = result.get("shifted_corrected", {})
    reason = corrected.get("reason")
    fixes = corrections(corrected)
    width = max(len(n) for n in shifted)
    cols = [f"{c:>6}" for c in SHIFT_COLUMNS] + [f"{'n':>6}"]
    labels = [ESTIMATOR_LABELS.get(k, k) for k in fixes]
    lines = ["test split under shifted priors, accuracy %"
             + (f"; {' / '.join(labels)}: all after prior correction (true prior / estimated)" if fixes else ""),
             f"{'prior':<{width}}  " + "  ".join(cols + [f"{e:>6}" for e in labels])]
    for name, m in shifted.items():
        cells = [fmt_acc(m.get(c)) for c in SHIFT_COLUMNS] + [f"{m['n']:>6.0f}"]
        cells += [fmt_acc(corrected[name][k]["all"]) for k in fixes]
        draws = f"  (mean of {m['draws']} draws, std {100 * m['std']['all']:.2f})" if m.get("std") else ""
        lines.append(f"{name:<{width}}  " + "  ".join(cells) + draws)
    errors = [f"{ESTIMATOR_LABELS.get(k, k)} {sum(c[k]['prior_error']['l1'] for c in corrected.values()) / len(corrected):.3f}"
              for k in fixes if k != "known_prior"]
    if errors:
        lines.append("mean L1 error of the estimated prior: " + ", ".join(errors))
    if reason:
        lines.append(f"(no prior correction: {reason})")
    caveat = em_caveat(result.get("method", ""), fixes, result.get("protocol") or {})
    return "\n".join(lines + ([caveat] if caveat else []))


def seeds_text(result: dict) -> str:
    """Mean ± std over seeds, per split."""
    over = result.get("over_seeds")
    if not over:
        return ""
    lines = [f"mean ± std over seeds {', '.join(map(str, over['seeds']))} (accuracy %)",
             f"{'split':<6}  " + "  ".join(f"{k:>13}" for k in CI_COLUMNS)]
    for split, stats in over.items():
        if split == "seeds":
            continue
        cells = [f"{100 * stats[k]['mean']:6.2f} ± {100 * stats[k]['std']:4.2f}" if k in stats else f"{'-':>13}"
                 for k in CI_COLUMNS]
        lines.append(f"{split:<6}  " + "  ".join(cells))
    return "\n".join(lines)


def protocol_text(result: dict) -> str:
    """Every protocol section of a method's result, blank-line separated ('' when there is none)."""
    parts = [t for t in (seeds_text(result), ci_text(result), shifted_text(result)) if t]
    return "\n\n".join(parts)


def with_protocol(human):
    """Wrap a human renderer so that the protocol sections follow its table."""
    def render(result: dict) -> str:
        extra = protocol_text(result)
        return human(result) + ("\n\n" + extra if extra else "")

    return render

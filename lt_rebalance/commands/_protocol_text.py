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


def shifted_text(result: dict) -> str:
    """The shifted test priors: plain predictions, then known-prior and EM corrected, per prior."""
    shifted = result.get("shifted")
    if not shifted:
        return ""
    corrected = result.get("shifted_corrected", {})
    reason = corrected.get("reason")
    if reason:  # a method without an implied prior: plain numbers only, and why
        corrected = {}
    width = max(len(n) for n in shifted)
    cols = [f"{c:>6}" for c in SHIFT_COLUMNS] + [f"{'n':>6}"]
    extra = ["known", "   EM"] if corrected else []
    lines = ["test split under shifted priors (LADE protocol), accuracy %"
             + ("; known / EM: all after prior correction" if corrected else ""),
             f"{'prior':<{width}}  " + "  ".join(cols + [f"{e:>6}" for e in extra])]
    for name, m in shifted.items():
        cells = [fmt_acc(m.get(c)) for c in SHIFT_COLUMNS] + [f"{m['n']:>6}"]
        if name in corrected:
            cells += [fmt_acc(corrected[name]["known_prior"]["all"]), fmt_acc(corrected[name]["em"]["all"])]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    if reason:
        lines.append(f"(no prior correction: {reason})")
    return "\n".join(lines)


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

"""Figures of ``ltr plot`` and ``ltr demo``: the numbers come from the experiment runners.

matplotlib is an optional extra, imported inside the functions (Agg canvas, no pyplot state).
Every figure is ``FIGSIZE`` inches at ``DPI``: 900 x 550 pixels.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from .metrics import GROUPS, per_class_accuracy
from .registry import canonical_method

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .runners import MethodRun
    from .session import Session

FIGSIZE, DPI = (9.0, 5.5), 100
MATPLOTLIB_HINT = 'plots need matplotlib: pip install "lt-rebalance[plot]" (or pip install matplotlib)'
GROUP_COLORS = {"all": "black", "many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}


def require_matplotlib() -> None:
    """Raise ImportError with the install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(MATPLOTLIB_HINT) from None


def _figure(ncols: int = 1) -> tuple[Figure, Any]:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, sharey=True, squeeze=False)[0]


def _save(fig: Figure, out: str | os.PathLike, overwrite: bool) -> Path:
    """Write atomically; the format follows the suffix (png when there is none)."""
    from .store import atomic_write

    fmt = Path(out).suffix.lstrip(".").lower() or "png"
    return atomic_write(out, lambda tmp: fig.savefig(tmp, format=fmt, dpi=DPI), overwrite)


def _group_labels(ctx: Session) -> dict[str, str]:
    many, few = ctx.group_thresholds["many"], ctx.group_thresholds["few"]
    return {"all": "all", "many": f"many (> {many} train imgs)", "medium": f"medium ({few}-{many})",
            "few": f"few (< {few})"}


def _require_split(ctx: Session, split: str) -> None:
    if split not in ctx.store.splits:
        raise ValueError(f"{ctx.store.path} has no split {split!r}; available: {', '.join(ctx.store.splits)}")


def _fit(ctx: Session, name: str, overrides: Optional[dict]) -> MethodRun:
    """The run of method ``name`` (its registry runner, with ``overrides[name]``)."""
    from . import registry

    spec = registry.get(name)
    if spec.needs_head and not ctx.store.has_head:
        raise ValueError(f"{spec.name} needs the stored classifier, which {ctx.store.path} lacks")
    return registry.runner(spec.name)(ctx, **(overrides or {}).get(spec.name, {}))


def tau_curve_figure(ctx: Session, result: Optional[dict] = None) -> Figure:
    """Accuracy vs tau on val and test per shot group, the tau selected on val marked.

    ``result``: a :func:`~lt_rebalance.runners.sweeps.run_tau_sweep` result (default: run it, tau on val).
    """
    from .runners.sweeps import run_tau_sweep

    if result is None:
        result = run_tau_sweep(ctx, select_on="val" if "val" in ctx.store.splits else None).result
    curves = result["curves"]
    fig, axes = _figure(len(curves))
    labels = _group_labels(ctx)
    for ax, (split, curve) in zip(axes, curves.items()):
        for g in ("all", *GROUPS):
            ax.plot(result["taus"], [100 * v if v is not None else float("nan") for v in curve[g]], marker=".",
                    color=GROUP_COLORS[g], lw=2.5 if g == "all" else 1.5, label=labels[g])
        if result["selected_tau"] is not None:
            ax.axvline(result["selected_tau"], color="gray", ls="--",
                       label=f"selected τ = {result['selected_tau']:g} (on {result['selected_on']})")
        ax.set(title=f"{split} split", xlabel="τ (exponent of the weight norm, unitless)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%)")
    axes[-1].legend(loc="best", fontsize=9)
    fig.suptitle(f"τ-normalisation: accuracy vs τ per shot group ({Path(ctx.store.path).name})")
    return fig


def plot_tau_curve(ctx: Session, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """:func:`tau_curve_figure` written to ``out``."""
    return _save(tau_curve_figure(ctx), out, overwrite)


def norm_heads(ctx: Session, head: Optional[dict] = None, overrides: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """label -> classifier weight (C, D): joint, tau-norm, LWS (when stored), and cRT (``head`` replaces it)."""
    names = ["joint", "tau_norm", "lws"] if ctx.store.has_head else []
    heads = {}
    for name in names + ([] if head is not None else ["crt"]):
        run = _fit(ctx, name, overrides)
        heads[head_label(name, run.result)] = run.head.linear_form()[0]
    if head is not None:
        if "weight" not in head:
            raise ValueError(f"the --head file holds a {head.get('method')} head without a weight matrix (NCM?)")
        heads[f"{head['method']} (--head)"] = torch.as_tensor(head["weight"])
    return heads


def head_label(name: str, result: dict) -> str:
    """A method's label in the figures: tau-norm shows its selected tau."""
    return f"τ-norm (τ = {result['selected_tau']:g})" if name == "tau_norm" else name


def norms_figure(ctx: Session, weights: dict[str, torch.Tensor]) -> Figure:
    """Per-class weight norm (relative to the head's mean) vs train images per class, log x."""
    counts = ctx.counts.double()
    order = torch.argsort(counts, descending=True, stable=True)
    fig, (ax,) = _figure()
    for label, W in weights.items():
        norms = W.double().cpu().norm(dim=1)
        ax.plot(counts[order].numpy(), (norms / norms.mean())[order].numpy(), marker="o", ms=4, label=label)
    ax.set_xscale("log")
    ax.set(xlabel="training images of the class (log scale)", ylabel="weight norm ‖w_j‖ / mean over classes",
           title=f"Classifier weight norms vs class size ({Path(ctx.store.path).name})")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=9)
    return fig


def plot_norms(ctx: Session, out: str | os.PathLike, head: Optional[dict] = None, overrides: Optional[dict] = None,
               overwrite: bool = False) -> Path:
    """:func:`norms_figure` of :func:`norm_heads` written to ``out``."""
    return _save(norms_figure(ctx, norm_heads(ctx, head, overrides)), out, overwrite)


def per_class_figure(ctx: Session, heads: dict[str, Any], split: str = "test") -> Figure:
    """Per-class accuracy on ``split`` of each fitted head (label -> head), classes sorted by train count."""
    _require_split(ctx, split)
    X, y = ctx.load(split)
    counts = ctx.counts
    order = torch.argsort(counts, descending=True, stable=True)
    rank = list(range(len(order)))
    fig, (ax,) = _figure()
    twin = ax.twinx()
    twin.bar(rank, counts[order].numpy(), color="0.85", width=1.0, label="train images (right axis)")
    twin.set_yscale("log")
    twin.set_ylabel("training images per class (log scale)")
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    for label, head in heads.items():
        acc = per_class_accuracy(head.predict(X).cpu(), y.cpu(), len(counts))
        ax.plot(rank, 100 * acc[order].numpy(), marker="o" if len(order) <= 50 else None, ms=4, label=label)
    if len(order) <= 30:
        names = ctx.store.class_names or [str(i) for i in range(len(counts))]
        ax.set_xticks(rank, [f"{names[i]}\n({int(counts[i])})" for i in order])
    ax.set(xlabel="class (training images), sorted by training images, most first", ylabel=f"top-1 accuracy on {split} (%)",
           title=f"Per-class accuracy, classes sorted by class size ({Path(ctx.store.path).name})")
    ax.grid(alpha=0.3)
    lines, bars = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
    ax.legend(lines[0] + bars[0], lines[1] + bars[1], loc="lower left", fontsize=9)
    return fig


def plot_per_class(ctx: Session, out: str | os.PathLike, methods: Sequence[str], split: str = "test",
                   overrides: Optional[dict] = None, overwrite: bool = False) -> Path:
    """Per-class accuracy on ``split`` for each method, classes sorted by train count (largest first)."""
    _require_split(ctx, split)
    heads = {canonical_method(name): _fit(ctx, name, overrides).head for name in methods}
    return _save(per_class_figure(ctx, heads, split), out, overwrite)


RESULTS_SHAPE = ('{"rows": [{"method": str, <split>: {"many", "medium", "few", "all": number or null}}], '
                 '"eval_splits": [str]}')


def _compare_rows(result: Any, split: Optional[str]) -> tuple[str, list[str], list[dict]]:
    """(split, eval splits, rows evaluated on the split) of a results document; ValueError for another shape."""
    def bad(problem: str) -> ValueError:
        return ValueError(f"the results are not what `ltr compare --out` writes ({problem}; expected {RESULTS_SHAPE}); "
                          "write one with `ltr compare --out results.json`")

    if not isinstance(result, dict):
        raise bad(f"the document is a {type(result).__name__}")
    splits, rows = result.get("eval_splits") or [], result.get("rows", [])
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise bad("eval_splits is not a list of split names")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise bad("rows is not a list of objects")
    split = split or ("test" if "test" in splits else (splits or ["test"])[-1])
    rows = [r for r in rows if r.get(split)]
    for r in rows:
        m = r[split]
        if not isinstance(r.get("method"), str) or not isinstance(m, dict) or not all(
                m.get(g) is None or (isinstance(m[g], (int, float)) and not isinstance(m[g], bool))
                for g in (*GROUPS, "all")):
            raise bad(f"row {r.get('method')!r} has no method name or no numbers under {split!r}")
    return split, splits, rows


def plot_compare(result: dict, out: str | os.PathLike, split: Optional[str] = None, overwrite: bool = False) -> Path:
    """:func:`compare_figure` written to ``out``."""
    return _save(compare_figure(result, split), out, overwrite)


def compare_figure(result: dict, split: Optional[str] = None) -> Figure:
    """Grouped bars: many / medium / few / all accuracy per method (``ltr compare --out`` or demo results)."""
    split, splits, rows = _compare_rows(result, split)
    if not rows:
        raise ValueError(f"the results hold no method evaluated on {split!r} (splits: {', '.join(splits) or 'none'})")
    groups = (*GROUPS, "all")
    fig, (ax,) = _figure()
    width = 0.8 / len(rows)
    for k, r in enumerate(rows):
        x = [g + (k - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        vals = [100 * r[split][g] if r[split].get(g) is not None else float("nan") for g in groups]
        bars = ax.bar(x, vals, width, label=r["method"])
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), [f"{g}-shot" if g != "all" else "all classes" for g in groups])
    ax.set(xlabel="shot group (by training images per class)", ylabel=f"top-1 accuracy on {split} (%)",
           title=f"Accuracy per shot group and method ({split} split)", ylim=(0, 108))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    return fig


SHIFT_LINES = {"known_prior": ("true prior (ceiling)", "black", "--"), "em": ("EM", "tab:blue", "-"),
               "bbse": ("BBSE", "tab:orange", "-"), "rlls": ("RLLS", "tab:green", "-"),
               "mapls": ("MAPLS", "tab:purple", "-")}


def shift_figure(rows: Sequence[dict], max_methods: int = 4) -> Optional[Figure]:
    """Test top-1 against the shifted prior, one panel per method (the first ``max_methods`` rows with
    shifted numbers): the plain predictions and one line per prior correction, the true prior's as
    the ceiling. None when no row has shifted numbers."""
    rows = [r for r in rows if r.get("shifted")][:max_methods]
    if not rows:
        return None
    fig, axes = _figure(len(rows))
    for ax, r in zip(axes, rows):
        names = list(r["shifted"])
        x = range(len(names))
        ax.plot(x, [100 * r["shifted"][n]["all"] for n in names], marker="o", color="gray", label="plain")
        corrected = r.get("shifted_corrected") or {}
        if "reason" not in corrected:
            for key in next(iter(corrected.values()), {}):
                label, color, style = SHIFT_LINES.get(key, (key, None, "-"))
                ax.plot(x, [100 * corrected[n][key]["all"] for n in names], marker=".", color=color, ls=style,
                        label=label)
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        ax.set(title=r["method"], xlabel="test prior")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy on the shifted test subset (%)")
    fullest = max(axes[:len(rows)], key=lambda ax: len(ax.get_lines()))
    fullest.legend(loc="best", fontsize=8)
    fig.suptitle("Accuracy under shifted test priors: plain, and corrected with each estimated prior")
    return fig

"""``ltr info``: what a feature file holds, from metadata only (instant: reads no features)."""
from __future__ import annotations

import click

from ._common import emit, handle_user_errors, json_option, open_store


def file_summary(store) -> dict:
    """The ``ltr info`` document: the keys are a pinned contract, extend rather than rename."""
    from ..shots import group_sizes  # torch-free: info reads metadata only

    return {
        "path": str(store.path),
        "format_version": store.format_version,
        "model": store.attrs.get("model", ""),
        "dataset": store.attrs.get("dataset", ""),
        "num_classes": store.num_classes,
        "dim": store.dim,
        "has_head": store.has_head,
        "head_random_init": store.head_random_init,
        "splits": {
            s.name: {"rows": s.rows, "complete": s.complete, "dtype": s.dtype, "views": s.views}
            for s in store.splits.values()
        },
        "groups": group_sizes(store.counts),
        "train_images": int(store.counts.sum()),
    }


def _head_text(d: dict) -> str:
    if not d["has_head"]:
        return "no"
    if d.get("head_random_init"):
        return ("yes, but random-init (not a trained stage-1 classifier: joint, tau_norm, lws, logit_adjust "
                "and pc_softmax mean nothing on it)")
    return "yes"


def _human(d: dict) -> str:
    lines = [
        f"{d['path']}: lt-rebalance feature file v{d['format_version']}",
        f"  model {d['model'] or '-'}, dataset {d['dataset'] or '-'}",
        f"  {d['num_classes']} classes, {d['dim']}-d features, stored classifier: {_head_text(d)}",
        f"  shot groups (train counts): many {d['groups']['many']}, medium {d['groups']['medium']}, "
        f"few {d['groups']['few']}",
        "  splits:",
    ]
    for name, s in d["splits"].items():
        state = "complete" if s["complete"] else "INCOMPLETE"
        views = f", {s['views']} augmented views" if s["views"] else ""
        lines.append(f"    {name:<8} {s['rows']:>9} rows  {s['dtype']}  {state}{views}")
    return "\n".join(lines)


@click.command()
@click.argument("features", type=click.Path(dir_okay=False))
@json_option
@handle_user_errors
def info(features, as_json):
    """Summarise FEATURES: classes, dimension, splits, shot groups (reads no features)."""
    store = open_store(features, allow_incomplete=True)
    emit(file_summary(store), as_json, _human)

"""``ltr info``: what a feature file holds, from metadata only (instant: reads no features)."""
from __future__ import annotations

import click

from .errors import handle_user_errors
from .options import json_option
from .render import emit
from .setup import open_store

# root attributes that say which features a foundation-model extraction stored (docs/FORMAT.md)
EMBEDDING_ATTRS = ("embedding", "l2_normalized", "preprocess")


def file_summary(store) -> dict:
    """The ``ltr info`` document: the keys are a pinned contract, extend rather than rename.

    ``imbalance_factor``, ``gini``, ``top20_share``: the imbalance of the train counts
    (:func:`lt_rebalance.imbalance.imbalance_stats`; NaN → null without train rows)."""
    from ..imbalance import group_sizes, imbalance_stats
    from ..text_store import text_head_summary

    stats = imbalance_stats(store.counts)
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
        "groups": group_sizes(store.counts, **store.shot_thresholds),
        "shot_thresholds": {"many": 100, "few": 20, **store.shot_thresholds},
        "train_images": int(store.counts.sum()),
        "imbalance_factor": stats["imbalance_factor"],
        "gini": stats["gini"],
        "top20_share": stats["top20_share"],
        "empty_classes": stats["empty_classes"],
        "text_head": text_head_summary(store),
        "embedding": {k: store.attrs[k] for k in EMBEDDING_ATTRS if k in store.attrs},
    }


def _head_text(d: dict) -> str:
    if not d["has_head"]:
        return "no"
    if d.get("head_random_init"):
        return ("yes, but random-init (not a trained stage-1 classifier: joint, tau_norm, lws, logit_adjust "
                "and pc_softmax mean nothing on it)")
    return "yes"


def _imbalance_text(d: dict) -> str:
    """imbalance factor, Gini and top-20 % share of a summary (or of a report's train counts)."""
    if d.get("imbalance_factor") is None or d["imbalance_factor"] != d["imbalance_factor"]:
        return "no train rows"
    empty = f" ({d['empty_classes']} classes without rows left out)" if d.get("empty_classes") else ""
    return (f"factor {d['imbalance_factor']:.4g} (max / min class count{empty}), Gini {d['gini']:.3f}, "
            f"top 20 % of classes hold {100 * d['top20_share']:.1f} % of the rows")


def _human(d: dict) -> str:
    lines = [
        f"{d['path']}: lt-rebalance feature file v{d['format_version']}",
        f"  model {d['model'] or '-'}, dataset {d['dataset'] or '-'}",
        f"  {d['num_classes']} classes, {d['dim']}-d features, stored classifier: {_head_text(d)}",
        f"  shot groups (train counts; many > {d['shot_thresholds']['many']}, few < {d['shot_thresholds']['few']}): "
        f"many {d['groups']['many']}, medium {d['groups']['medium']}, few {d['groups']['few']}",
        f"  train imbalance: {_imbalance_text(d)}",
    ]
    if d.get("text_head"):
        t = d["text_head"]
        lines.append(f"  text head: {t['model']} ({t['pretrained']}), {t['templates']} template(s), "
                     f"logit scale {t['logit_scale']:.4g}{', forced across models' if t['forced'] else ''}")
    if d.get("embedding"):
        lines.append("  embedding: " + ", ".join(f"{k} {v}" for k, v in d["embedding"].items()))
    lines.append("  splits:")
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

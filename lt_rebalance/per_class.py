"""Per-class accuracy tables of fitted heads (``--per-class-out``), written as CSV (docs/METHODS.md,
"Metrics").

One row per (method, split, class): the columns of :func:`lt_rebalance.metrics.per_class_records`
(``class``, ``train_count``, ``group``, ``support``, ``correct``, ``accuracy``, empty where the class
has no evaluation rows) after ``method`` and ``split`` (and ``features`` first, for several files).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from .metrics import per_class_records
from .outputs import atomic_write
from .session import Session

COLUMNS = ("method", "split", "class", "train_count", "group", "support", "correct", "accuracy")


def per_class_rows(session: Session, heads: Mapping[str, Any], splits: Optional[Sequence[str]] = None
                   ) -> list[dict[str, Any]]:
    """The rows of each head in ``heads`` (method -> fitted head) on ``splits`` (default: the session's
    evaluation splits), predictions from the features a block of rows at a time."""
    out = []
    for split in session.eval_splits if splits is None else splits:
        X, y = session.load(split)
        for method, head in heads.items():
            records = per_class_records(head.predict(X), y, session.counts, **session.thresholds)
            out += [{"method": method, "split": split, **r} for r in records]
    return out


def write_per_class_csv(path: str | Path, rows: Iterable[dict[str, Any]], overwrite: bool = False,
                        inputs: Iterable[Optional[str | Path]] = ()) -> Path:
    """``rows`` as CSV at ``path`` (atomically; an existing file only with ``overwrite``, never one of
    ``inputs``). Columns: ``features`` when the rows have it, then :data:`COLUMNS`."""
    rows = list(rows)
    columns = (("features",) if rows and "features" in rows[0] else ()) + COLUMNS

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, columns, lineterminator="\n")
            w.writeheader()
            w.writerows({k: ("" if r[k] is None else r[k]) for k in columns} for r in rows)

    return atomic_write(path, write, overwrite, inputs)

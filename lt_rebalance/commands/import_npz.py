"""``ltr import``: a feature file from arrays that users already have."""
from __future__ import annotations

import os
import zipfile
from typing import Optional

import click

from .errors import handle_user_errors
from .options import json_option, quiet_option
from .render import emit
from .setup import check_writable

SPLITS = ("train", "val", "test")


def npz_to_features(npz_path: str, out: str, *, dtype: str, overwrite: bool, model: str, dataset: str,
                    shots: Optional[dict] = None) -> dict:
    """Read ``x_<split>, y_<split>`` (+ optional weight, bias, counts, class_names) and write ``out``."""
    import numpy as np

    from ..store import FeatureFileError, write_features

    if not os.path.exists(npz_path):
        raise click.ClickException(f"{npz_path}: no such file (check the path; write one with numpy.savez)")
    check_writable(out, overwrite, [npz_path])  # before reading a large archive
    try:
        if not zipfile.is_zipfile(npz_path):  # np.load would also take .npy or try to unpickle
            raise click.ClickException(f"{npz_path}: not an .npz archive (write one with numpy.savez)")
        check_npz_sizes(npz_path)  # before inflating anything
        npz = np.load(npz_path, allow_pickle=False)
        data = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise click.ClickException(f"{npz_path}: no such file (check the path; write one with numpy.savez)") from None
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise click.ClickException(f"{npz_path}: not a readable .npz file ({e})") from None
    keys = set(data)
    splits = {}
    for s in SPLITS:
        if f"x_{s}" in keys or f"y_{s}" in keys:
            if not {f"x_{s}", f"y_{s}"} <= keys:
                raise click.ClickException(f"{npz_path}: split {s!r} needs both x_{s} and y_{s}")
            x, y = data[f"x_{s}"], data[f"y_{s}"]
            if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
                raise click.ClickException(f"{npz_path}: x_{s} has dtype {x.dtype}, expected real numbers")
            numeric = np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)
            with np.errstate(invalid="ignore"):  # NaN, 1e20 or 2**63 do not survive the cast: refused below
                labels = y.astype(np.int64) if numeric else None
            if y.ndim != 1 or labels is None or (y.size and (labels.min() < 0 or not np.array_equal(labels, y))):
                raise click.ClickException(
                    f"{npz_path}: y_{s} must be a 1-D array of class indices >= 0 (dtype {y.dtype}, shape {y.shape})"
                )
            splits[s] = (x, labels)
    if not splits:
        raise click.ClickException(f"{npz_path}: no arrays x_train/y_train, x_val/y_val or x_test/y_test found")
    if "counts" not in keys and "train" not in splits:
        raise click.ClickException(f"{npz_path}: give x_train/y_train or a 'counts' array (training images per class)")
    names = list(data["class_names"]) if "class_names" in keys else None  # bytes are decoded by the writer
    try:
        write_features(
            out,
            splits,
            counts=data["counts"] if "counts" in keys else None,
            weight=data["weight"] if "weight" in keys else None,
            bias=data["bias"] if "bias" in keys else None,
            class_names=names,
            dtype=dtype,
            model=model,
            dataset=dataset,
            overwrite=overwrite,
            **{f"shot_{k}": v for k, v in (shots or {}).items()},
        )
    except FeatureFileError as e:  # raised on the temporary file: name the user's file instead
        raise click.ClickException(f"{npz_path}: the arrays do not form a valid feature file: {e.problem}") from None
    return {"out": out, "splits": {s: int(len(splits[s][1])) for s in splits}, "has_head": "weight" in keys}


def check_npz_sizes(npz_path: str) -> None:
    """Refuse an archive whose arrays, as declared, exceed what it stores or the memory available."""
    from ..memory import available_memory, gib
    from ..store.untrusted import npz_members

    members = npz_members(npz_path)
    for m in members:
        if m.declared > m.stored:
            raise click.ClickException(
                f"{npz_path}: {m.name} declares shape {m.shape} {m.dtype} ({gib(m.declared)}) but the archive holds "
                f"only {gib(max(m.stored, 0))} of it: truncated or crafted; write it again with numpy.savez")
    total, free = sum(m.declared for m in members), available_memory()
    if free is not None and total > free:
        big = max(members, key=lambda m: m.declared)
        raise click.ClickException(
            f"{npz_path} expands to {gib(total)} (it declares {big.name} of shape {big.shape} {big.dtype}, "
            f"{gib(big.declared)}) but only {gib(free)} of memory is available; import it on a larger machine, "
            "or in parts")


@click.command("import")
@click.option("--npz", "npz_path", required=True, type=click.Path(dir_okay=False), help="Arrays to import.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Feature file to write (.h5).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float32", show_default=True)
@click.option("--model", default="", help="Backbone name to record.")
@click.option("--dataset", default="", help="Dataset name to record.")
@click.option("--shot-many", type=click.IntRange(0), default=None,
              help="Record the many-shot threshold (> N train images) that fits these data [default: 100].")
@click.option("--shot-few", type=click.IntRange(0), default=None,
              help="Record the few-shot threshold (< N train images) that fits these data [default: 20].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@json_option
@quiet_option
@handle_user_errors
def import_npz(npz_path, out, dtype, model, dataset, shot_many, shot_few, overwrite, as_json, quiet):
    """Create a feature file from an .npz with x_train, y_train, x_val, y_val, x_test, y_test
    (optional: weight, bias, counts, class_names; counts default to the y_train histogram)."""
    shots = {k: v for k, v in (("many", shot_many), ("few", shot_few)) if v is not None}
    result = npz_to_features(npz_path, out, dtype=dtype, overwrite=overwrite, model=model, dataset=dataset,
                             shots=shots)
    emit(result, as_json, lambda r: f"wrote {r['out']}: " + ", ".join(f"{s} {n} rows" for s, n in r["splits"].items()))

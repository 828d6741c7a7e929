"""``ltr demo``: the whole pipeline on scikit-learn's bundled handwritten digits, offline, on a CPU.

1. Long-tailed digits: class i keeps n_i = int(n_max * (1/IF) ** (i / (C - 1))) train images (the
   LDAM convention, docs/METHODS.md); balanced val and test from held-out images; written as PNGs to
   ``OUT/images/{train,val,test}/<digit>/``.
2. Stage 1: a small CNN (``tiny_cnn``) trained jointly with instance-balanced sampling -> ``OUT/stage1.pth``.
3. Extraction with ``ltr extract`` itself (imagefolder route) -> ``OUT/features.h5``.
4. Every default method of ``compare`` (:data:`lt_rebalance.registry.DEFAULT_METHODS`) on the features, and the plots.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

NUM_CLASSES = 10
SKLEARN_HINT = 'the demo needs scikit-learn (its bundled digits images): pip install "lt-rebalance[demo]" (or pip install scikit-learn)'
# the demo's outputs besides the images; each run lists everything it writes in OUT/MANIFEST, and
# --overwrite deletes only what the previous run's manifest lists (the user's files stay)
OUTPUT_NAMES = ("stage1.pth", "features.h5", "features.h5.partial", "features.h5.lock", "crt.pt",
                "results.json", "tau-curve.png", "norms.png", "per-class.png", "compare.png")
MANIFEST = ".ltr-demo-manifest.json"
MANIFEST_FORMAT = "lt-rebalance/demo-manifest"


@dataclass(frozen=True)
class DemoConfig:
    """The demo's setting; ``quick()`` is the reduced one for tests."""

    seed: int = 0
    n_max: int = 100  # train images of the largest class
    imbalance: float = 25.0  # n_max / n_min
    many: int = 40  # shot groups scaled to the data: many > 40, few < 10 train images
    few: int = 10
    val_per_class: int = 30
    test_per_class: int = 40
    image_size: int = 16  # crop side given to `ltr extract --image-size`
    stage1_epochs: int = 40
    stage1_lr: float = 0.05
    batch_size: int = 32  # stage 1 (cRT and LWS use the library's "auto" rule: batch = train rows here)
    crt_epochs: int | str = "auto"  # "auto": at least 500 optimiser steps (heads/training.py)
    lws_epochs: int | str = "auto"

    def quick(self, epochs: int) -> DemoConfig:
        return DemoConfig(**{**asdict(self), "stage1_epochs": epochs, "crt_epochs": epochs, "lws_epochs": epochs})

    @property
    def thresholds(self) -> dict[str, int]:
        return {"many": self.many, "few": self.few}


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 (1797, 8, 8) images (ink 0..16 scaled to 0..255) and labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(SKLEARN_HINT) from None
    d = load_digits()
    return np.round(d.images * (255 / 16)).astype(np.uint8), d.target.astype(np.int64)


def long_tailed_counts(cfg: DemoConfig) -> np.ndarray:
    i = np.arange(NUM_CLASSES)
    return (cfg.n_max * (1.0 / cfg.imbalance) ** (i / (NUM_CLASSES - 1))).astype(np.int64)


def split_indices(labels: np.ndarray, cfg: DemoConfig) -> dict[str, np.ndarray]:
    """Per class (in order): shuffle its indices, keep n_i for train, then val and test (balanced)."""
    rng = np.random.default_rng(cfg.seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c, n in enumerate(long_tailed_counts(cfg)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        v, t = n + cfg.val_per_class, n + cfg.val_per_class + cfg.test_per_class
        if t > len(idx):
            raise ValueError(f"digit {c} has {len(idx)} images, fewer than the {t} this setting needs")
        parts["train"].append(idx[:n])
        parts["val"].append(idx[n:v])
        parts["test"].append(idx[v:t])
    return {s: np.concatenate(p) for s, p in parts.items()}


def image_files(labels: np.ndarray, splits: dict[str, np.ndarray]) -> dict[str, int]:
    """``images/<split>/<digit>/<index in digits>.png`` (relative to OUT) -> index in digits."""
    return {f"images/{split}/{labels[i]}/{i:04d}.png": int(i) for split, idx in splits.items() for i in idx}


def write_image_folder(out: Path, images: np.ndarray, files: dict[str, int]) -> None:
    """The 8x8 grayscale PNGs of :func:`image_files` under ``out``."""
    from PIL import Image

    for rel, i in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").save(out / rel)


def train_stage1(images_root: Path, out: Path, cfg: DemoConfig, log: Callable[[str], None]) -> dict:
    """Train ``tiny_cnn`` on the train folder (SGD, instance-balanced batches, cosine lr); save its state dict.

    The images go through the same eval transform that the extraction applies.
    """
    import torch

    from ..extract.backbones import create_backbone
    from ..extract.datasets import DatasetOptions, eval_transform, load_dataset, reference_config
    from ..outputs import atomic_write

    data = load_dataset("imagefolder", DatasetOptions(str(images_root), ("train",)))
    src = data.sources["train"]
    tf = eval_transform(reference_config(data.family, cfg.image_size))
    X = torch.stack([tf(src.load(i)) for i in range(len(src))])
    y = torch.as_tensor(src.labels)
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = create_backbone("tiny_cnn", num_classes=len(data.counts)).train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.stage1_lr, momentum=0.9, weight_decay=5e-4)
    steps = cfg.stage1_epochs * (len(y) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    t0 = time.perf_counter()
    for epoch in range(cfg.stage1_epochs):
        perm = torch.randperm(len(y), generator=g)
        total = 0.0
        for b in perm[: len(perm) // cfg.batch_size * cfg.batch_size].view(-1, cfg.batch_size):
            loss = torch.nn.functional.cross_entropy(model(X[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        if epoch == 0 or (epoch + 1) % 10 == 0 or epoch + 1 == cfg.stage1_epochs:
            log(f"stage 1 epoch {epoch + 1}/{cfg.stage1_epochs}  loss {total / max(len(perm) // cfg.batch_size, 1):.4f}")
    model.eval()
    with torch.inference_mode():
        train_acc = (model(X).argmax(1) == y).double().mean().item()
    atomic_write(out, lambda tmp: torch.save(model.state_dict(), tmp))
    return {"epochs": cfg.stage1_epochs, "lr": cfg.stage1_lr, "batch_size": cfg.batch_size,
            "train_top1": train_acc, "seconds": round(time.perf_counter() - t0, 2)}


def extract_args(out: Path, cfg: DemoConfig) -> list[str]:
    """The ``ltr extract`` arguments of step 3 (printed as the command that reproduces it)."""
    return ["--model", "tiny_cnn", "--data", "imagefolder", "--root", str(out / "images"),
            "--checkpoint", str(out / "stage1.pth"), "--out", str(out / "features.h5"),
            "--image-size", str(cfg.image_size), "--workers", "0", "--device", "cpu", "--seed", str(cfg.seed),
            "--shot-many", str(cfg.many), "--shot-few", str(cfg.few)]


def run_extract(args: list[str], quiet: bool) -> dict:
    """Run the ``ltr extract`` command in-process; its JSON result (its stdout is captured).

    ``invoke`` rather than ``main``: click's ``main`` would turn Ctrl-C into its own ``Abort``.
    """
    from ..extract.cli import extract

    buf, argv = io.StringIO(), [*args, "--json", *(["--quiet"] if quiet else [])]
    with contextlib.redirect_stdout(buf), extract.make_context("extract", argv) as ctx:
        extract.invoke(ctx)
    return json.loads(buf.getvalue())


def prepare_out(out: Path, overwrite: bool, files: list[str]) -> None:
    """Make OUT ready for a run that writes ``files`` (relative paths), recorded in OUT/MANIFEST first.

    An existing OUT is refused unless ``overwrite``; then only the files the previous run's manifest
    lists are deleted (with the folders they leave empty): the user's own files stay. The run is
    refused when the user's files sit under ``images/``, which the extraction would read as data.
    """
    from ..outputs import atomic_write, quietly, write_failure

    created = not out.exists()
    if not created:
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it or choose another --out")
        if not out.is_dir():
            raise FileExistsError(f"{out} is a file, not a demo output folder; choose another --out")
        _remove_previous_run(out)
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:  # read-only, permissions, no parent folder
        raise write_failure(out, e.errno or errno.EIO, "cannot create") from None
    doc = {"format": MANIFEST_FORMAT, "files": sorted(files)}
    try:  # the first write: a full disk stops the demo here
        atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(doc, indent=1)))
    except BaseException:
        if created:
            quietly(out.rmdir)
        raise


def _remove_previous_run(out: Path) -> None:
    manifest = out / MANIFEST
    if not manifest.is_file():
        if any(out.iterdir()):
            raise FileExistsError(f"{out} holds files and no {MANIFEST}: the demo did not write it (or an older "
                                  "version did); not replacing it: choose another --out, or empty it yourself")
        return
    try:
        doc = json.loads(manifest.read_text())
        listed = {Path(p) for p in doc["files"]} if doc.get("format") == MANIFEST_FORMAT else None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        listed = None
    if listed is None or any(p.is_absolute() or ".." in p.parts for p in listed):
        raise FileExistsError(f"{manifest} is not a manifest written by `ltr demo`; not replacing {out}: "
                              "choose another --out")
    folders = {q for p in listed for q in p.parents}
    images = out / "images"
    foreign = sorted(str(p.relative_to(out)) for p in images.rglob("*")
                     if p.relative_to(out) not in (folders if p.is_dir() and not p.is_symlink() else listed))
    if foreign:
        raise FileExistsError(f"{images} holds files the demo did not write ({', '.join(foreign[:5])}), which the "
                              "extraction would read as images; move them out or choose another --out")
    real = Path(os.path.realpath(out))
    for rel in listed:
        if _inside(real, rel) and (out / rel).is_file() and not (out / rel).is_symlink():
            (out / rel).unlink()
    for rel in sorted(folders - {Path(".")}, key=lambda p: len(p.parts), reverse=True):
        if _inside(real, rel) and (out / rel).is_dir() and not any((out / rel).iterdir()):
            (out / rel).rmdir()
    manifest.unlink()


def _inside(real_out: Path, rel: Path) -> bool:
    """True when ``OUT/rel`` lies in OUT's real path through no symbolic link (a symlinked sub-folder
    of OUT points elsewhere: nothing there is the demo's to delete)."""
    return os.path.realpath(real_out / rel) == str(real_out / rel)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _verb(before: float, after: float) -> str:
    return "raised" if after > before else "lowered" if after < before else "left unchanged"


def summarize(result: dict, split: str = "test") -> list[str]:
    """What the table shows, in words, from the measured numbers (joint vs every other method)."""
    rows = {r["method"]: r[split] for r in result["rows"] if r.get(split)}
    if "joint" not in rows or len(rows) < 2:
        return []
    joint = rows.pop("joint")
    lines = [f"On {split}, the stage-1 (joint) classifier scores many {_pct(joint['many'])}, medium "
             f"{_pct(joint['medium'])}, few {_pct(joint['few'])}, all {_pct(joint['all'])}."]
    for g in ("few", "medium", "many", "all"):
        vals = [m[g] for m in rows.values() if m.get(g) is not None]
        if joint.get(g) is None or not vals:
            continue
        mean = float(np.mean(vals))
        lines.append(f"Re-balancing ({len(vals)} methods) {_verb(joint[g], mean)} {g}-shot accuracy on average: "
                     f"{_pct(joint[g])} -> {_pct(mean)} (range {_pct(min(vals))} to {_pct(max(vals))})."
                     .replace("all-shot accuracy", "overall accuracy"))
    best = max(rows, key=lambda k: rows[k]["all"])
    lines.append(f"Best overall: {best} ({_pct(rows[best]['all'])} vs joint {_pct(joint['all'])}).")
    return lines


def reproduce_commands(out: Path, cfg: DemoConfig) -> list[str]:
    """``ltr`` commands that redo the extraction, the comparison and the plots by hand."""
    f = shlex.quote(str(out / "features.h5"))
    groups = f"--many {cfg.many} --few {cfg.few} --seed {cfg.seed}"
    epochs = {"--crt-epochs": cfg.crt_epochs, "--lws-epochs": cfg.lws_epochs}
    training = "".join(f" {k} {v}" for k, v in epochs.items() if v != "auto")
    crt_epochs = "" if cfg.crt_epochs == "auto" else f" --epochs {cfg.crt_epochs}"

    def into_out(name: str) -> str:  # the plots go beside the demo's own, not into the current folder
        return f"--out {shlex.quote(str(out / name))} --overwrite"

    return [
        "ltr extract " + shlex.join(extract_args(out, cfg)) + " --overwrite",
        f"ltr compare --features {f} {groups}{training} --out {shlex.quote(str(out / 'results.json'))} --overwrite",
        f"ltr crt --features {f} {groups}{crt_epochs} --save {shlex.quote(str(out / 'crt.pt'))} --overwrite",
        f"ltr plot tau-curve --features {f} {groups} {into_out('tau-curve.png')}",
        f"ltr plot norms --features {f} --head {shlex.quote(str(out / 'crt.pt'))} {groups}{training} "
        f"{into_out('norms.png')}",
        f"ltr plot per-class --features {f} --methods joint,crt,tau_norm {groups}{training} {into_out('per-class.png')}",
        f"ltr plot compare --results {shlex.quote(str(out / 'results.json'))} {into_out('compare.png')}",
    ]


def run_demo(out: Path, cfg: DemoConfig = DemoConfig(), *, overwrite: bool = False, quiet: bool = False,
             log: Callable[[str], None] = print) -> dict:
    """Run the four steps into ``out``; returns (and writes) ``out/results.json``."""
    from ..heads.training import one_thread
    from ..outputs import WriteInterrupted
    from .errors import Interrupted

    with one_thread():
        try:
            return _run_demo(out, cfg, overwrite, quiet, log)
        except (KeyboardInterrupt, Interrupted):  # Interrupted: from the `ltr extract` step
            if not (out / MANIFEST).exists():
                raise WriteInterrupted("interrupted; nothing was written") from None
            raise WriteInterrupted(f"interrupted; {out} holds an unfinished demo: rerun with --overwrite to "
                                   "replace it") from None


def _run_demo(out: Path, cfg: DemoConfig, overwrite: bool, quiet: bool, log: Callable[[str], None]) -> dict:
    from ..head_io import head_state, save_head
    from ..metrics import group_sizes
    from ..outputs import atomic_write
    from ..registry import DEFAULT_METHODS, schedule_options
    from ..results import to_json
    from ..session import Session
    from ..store import FeatureStore
    from ..study import compare

    t0 = time.perf_counter()
    images, labels = load_digits_uint8()
    splits = split_indices(labels, cfg)
    files = image_files(labels, splits)
    prepare_out(out, overwrite, [*files, *OUTPUT_NAMES])
    counts = long_tailed_counts(cfg)
    groups = group_sizes(counts, cfg.many, cfg.few)
    log(f"1/4 long-tailed digits: train counts {counts.tolist()} (imbalance {cfg.imbalance:g}), "
        f"val {cfg.val_per_class} and test {cfg.test_per_class} per class")
    log(f"    shot groups scaled to the data: many > {cfg.many} ({groups['many']} classes), "
        f"medium {cfg.few}-{cfg.many} ({groups['medium']}), few < {cfg.few} ({groups['few']}) train images")
    write_image_folder(out, images, files)

    log(f"2/4 stage 1: tiny_cnn trained jointly, instance-balanced batches of {cfg.batch_size}")
    stage1 = train_stage1(out / "images", out / "stage1.pth", cfg, log)
    log(f"    train top-1 {_pct(stage1['train_top1'])} in {stage1['seconds']:.1f} s -> {out / 'stage1.pth'}")

    log("3/4 extracting features with `ltr extract`")
    extracted = run_extract(extract_args(out, cfg), quiet)

    log(f"4/4 every default method of compare ({', '.join(DEFAULT_METHODS)}) on the cached features")
    ctx = Session(FeatureStore(out / "features.h5"), seed=cfg.seed, thresholds=cfg.thresholds)
    overrides = schedule_options(cfg.crt_epochs, cfg.lws_epochs)
    heads: dict = {}
    result = compare(ctx, None, overrides, log=None if quiet else log, heads=heads)
    # compare's cRT head, saved for `ltr plot norms --head`
    crt_params = next(r["params"] for r in result["rows"] if r["method"] == "crt")
    crt_state = head_state(heads["crt"], "crt", crt_params, str(out / "features.h5"))
    save_head(out / "crt.pt", crt_state)
    plots = draw_plots(ctx, result, out, crt_state, overrides, log)
    result.update(
        features=str(out / "features.h5"),
        demo={**asdict(cfg), "counts": counts.tolist(), "groups": groups, "stage1": stage1, "extract": extracted,
              "plots": plots, "seconds": round(time.perf_counter() - t0, 1)},
        summary=summarize(result),
        reproduce=reproduce_commands(out, cfg),
    )
    text = to_json(result)
    atomic_write(out / "results.json", lambda tmp: tmp.write_text(text))
    return result


def draw_plots(ctx, result: dict, out: Path, crt_state: dict, overrides: dict, log: Callable[[str], None]) -> list[str]:
    """The four plots into ``out`` (none, with a note, when matplotlib is missing)."""
    from .. import plots

    try:
        plots.require_matplotlib()
    except ImportError as e:
        log(f"note: no plots ({e})")
        return []
    paths = [plots.plot_tau_curve(ctx, out / "tau-curve.png"),
             plots.plot_norms(ctx, out / "norms.png", head=crt_state, overrides=overrides),
             plots.plot_per_class(ctx, out / "per-class.png", ["joint", "crt", "tau_norm"], overrides=overrides),
             plots.plot_compare(result, out / "compare.png")]
    return [str(p) for p in paths]

"""The extraction loop: DataLoader -> backbone (pre-logits features) -> background HDF5 writer.

Public entry point: :func:`extract_features` (used by ``ltr extract`` and ``ltr demo``).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from lt_rebalance.outputs import (
    WriteInterrupted,
    check_output,
    deferred_sigint,
    interrupt_guard,
    os_cause,
    publish,
    quietly,
    write_failure,
)
from lt_rebalance.store import FeatureFileWriter, FeatureStore, NonFiniteFeaturesError

from .datasets import ImageSource, TransformConfig, eval_transform, train_transform
from .output import (
    FINGERPRINT_ATTR,
    bad_indices,
    bad_paths,
    drop_skipped_from_counts,
    open_writer,
    output_lock,
    partial_path,
    record_bad,
    resume_partial,
    resume_position,
    shrink_split,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

FeatureFn = Callable[["torch.Tensor"], "torch.Tensor"]


@dataclass(frozen=True)
class ExtractConfig:
    """How to run; everything that changes the features is part of the resume fingerprint."""

    batch_size: int = 256
    workers: int = 0  # DataLoader worker processes
    device: str = "cpu"
    dtype: str = "float32"  # stored feature dtype (float16 halves the file)
    train_views: int = 0  # K augmented passes over the train split
    seed: int = 0  # augmentation seed (per image: seed, view, index)
    resume: bool = False
    overwrite: bool = False
    skip_bad: bool = False
    autocast: bool = True  # CUDA only (with channels_last)


@dataclass
class ExtractResult:
    path: Path
    rows: dict[str, int]  # rows per split in the final file
    bad: dict[str, list[str]] = field(default_factory=dict)  # skipped unreadable images per split
    images: int = 0  # images run through the model by this call (views included)
    seconds: float = 0.0
    already_complete: bool = False  # --resume found OUT finished with the same settings (a requeued job)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


class BadImagesError(ValueError):
    """Unreadable images met without --skip-bad."""


class _Items:
    """torch Dataset: index -> (image float32 (3, S, S), label, index, readable).

    Augmentation is seeded per image from (seed, view, image name), so it does not depend on workers,
    resume points or shards.
    """

    def __init__(self, source: ImageSource, transform: Callable, size: int, seed: Optional[tuple[int, int]] = None):
        self.source, self.transform, self.size, self.seed = source, transform, size, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        import torch

        label = int(self.source.labels[i])
        try:
            img = self.source.load(i)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # missing, truncated, not an image
            return torch.zeros(3, self.size, self.size), label, i, False
        if self.seed is None:
            return self.transform(img), label, i, True
        name = hashlib.blake2b(self.source.name(i).encode(), digest_size=8).digest()  # same in every shard
        state = np.random.SeedSequence([*self.seed, int.from_bytes(name, "little")]).generate_state(1, np.uint64)[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(state))
            return self.transform(img), label, i, True


def pre_logits(model: nn.Module) -> FeatureFn:
    """timm protocol: ``forward_head(forward_features(x), pre_logits=True)`` -> (B, D)."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise TypeError(f"{type(model).__name__} lacks forward_features/forward_head; pass features_fn")
    return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)


class _BackgroundWriter:
    """Runs HDF5 writes on one thread; at most ``max_pending`` batches in flight, errors re-raised."""

    def __init__(self, max_pending: int = 4):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="h5-writer")
        self._pending: deque[Future] = deque()
        self._max = max_pending

    def submit(self, fn: Callable, *args: Any) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self._max or (self._pending and self._pending[0].done()):
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)


def _quiet_worker(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process (which stops them once it has handled it)
    and end silently on SIGTERM (from a scheduler signalling the process group, or the main process
    stopping them): exit status 0, so neither the worker nor the loader prints a traceback. A batch
    being handed over when the main process stops (multiprocessing's resource sharer thread then
    meets a closed connection) is not reported either."""
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    previous = sys.excepthook  # what the resource sharer's thread reports its errors to

    def hook(kind: type, value: BaseException, tb: Any) -> None:
        if not issubclass(kind, (ConnectionError, EOFError)):
            previous(kind, value, tb)

    sys.excepthook = hook


def _fingerprint(meta: Mapping[str, Any], transform: TransformConfig, cfg: ExtractConfig, sizes: dict) -> dict:
    """What must match for a partial file to be resumed. A CUDA run records its device and autocast:
    float16-autocast rows must not be resumed on a CPU (or without autocast) into one file (CPU runs
    keep the fingerprint of earlier versions, so their partials still resume)."""
    cuda = str(cfg.device).startswith("cuda")
    return {
        "meta": dict(meta),
        "transform": transform.to_attr(),
        "dtype": cfg.dtype,
        "train_views": cfg.train_views,
        "seed": cfg.seed,
        "splits": sizes,
        **({"device": "cuda", "autocast": bool(cfg.autocast)} if cuda else {}),
    }


def _rows_written(partial: Path) -> int:
    """Feature rows (and view rows) already in a partial file; 0 when it cannot be read."""
    import h5py

    try:
        with h5py.File(partial, "r", locking=False) as f:
            return sum(int(g.attrs.get("rows", 0)) + int(np.sum(g.attrs.get("view_rows", 0)))
                       for g in f["splits"].values() if isinstance(g, h5py.Group))
    except (OSError, KeyError):
        return 0


def _create(
    path: Path,
    sources: Mapping[str, ImageSource],
    dim: int,
    *,
    counts: np.ndarray,
    transform: TransformConfig,
    cfg: ExtractConfig,
    head: Optional[tuple],
    class_names: Optional[Sequence[str]],
    meta: Mapping[str, Any],
    fingerprint: dict,
) -> FeatureFileWriter:
    meta = dict(meta)
    known = {k: str(meta.pop(k, "")) for k in ("model", "dataset", "checkpoint_sha256")}
    extra = {FINGERPRINT_ATTR: json.dumps(fingerprint), "extract_config": json.dumps(asdict(cfg)), **meta}
    w = FeatureFileWriter.create(
        path, counts=counts, transform=transform.to_attr(), class_names=class_names, extra_attrs=extra, **known
    )
    if head is not None:
        w.set_head(*head, random_init=meta.get("weights") == "random-init")
    for name, src in sources.items():
        views = cfg.train_views if name == "train" else 0
        w.create_split(name, len(src), dim, dtype=cfg.dtype, views=views, with_paths=src.paths is not None)
    return w


class _Runner:
    """One extraction into one (partial) file; see :func:`extract_features`."""

    def __init__(self, model: nn.Module, features_fn: Optional[FeatureFn], cfg: ExtractConfig,
                 transform: TransformConfig, progress: Optional[Callable[[int], None]]):
        import torch

        self.cfg, self.transform, self.progress = cfg, transform, progress or (lambda n: None)
        self.device = torch.device(cfg.device)
        self.cuda = self.device.type == "cuda"
        self.model = model.eval().to(self.device)
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.features_fn = features_fn or pre_logits(self.model)
        self.images = 0

    def feature_dim(self) -> int:
        import torch

        x = torch.zeros(1, 3, self.transform.size, self.transform.size)
        return int(self._forward(x).shape[1])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            if self.cuda:
                x = x.to(self.device, non_blocking=True, memory_format=torch.channels_last)
                with torch.autocast("cuda", enabled=self.cfg.autocast):
                    f = self.features_fn(x)
            else:
                f = self.features_fn(x.to(self.device))
            # cast to the stored dtype by the writer, which refuses rows beyond its range (float16: 65,504)
            return f.cpu()

    def _batches(self, source: ImageSource, indices: np.ndarray, view: Optional[int]):
        from torch.utils.data import DataLoader

        tf = eval_transform(self.transform) if view is None else train_transform(self.transform)
        seed = None if view is None else (self.cfg.seed, view)
        loader = DataLoader(
            _Items(source, tf, self.transform.size, seed),
            batch_size=self.cfg.batch_size,
            sampler=indices.tolist(),
            num_workers=self.cfg.workers,
            pin_memory=self.cuda,
            prefetch_factor=4 if self.cfg.workers else None,
            worker_init_fn=_quiet_worker if self.cfg.workers else None,
        )
        for x, y, idx, ok in loader:
            self.images += len(idx)
            yield x, y.numpy(), idx.numpy(), ok.numpy()

    def run_split(self, w: FeatureFileWriter, bg: _BackgroundWriter, name: str, source: ImageSource) -> None:
        """Extract the remaining rows of one split: eval pass, then the augmented views."""
        g = w.file[f"splits/{name}"]
        n = len(source)
        paths = np.asarray(source.paths, dtype=object) if source.paths is not None else None
        bad = bad_indices(g)
        start = resume_position(n, w.rows(name), bad)
        self.progress(start)
        for x, y, idx, ok in self._batches(source, np.arange(start, n), None):
            if not ok.all():
                new = idx[~ok][~np.isin(idx[~ok], bad)]
                names = [source.name(int(i)) for i in idx[~ok]]
                if not self.cfg.skip_bad:
                    bg.drain()
                    raise BadImagesError(
                        f"split {name!r}: {len(names)} unreadable image(s) in the batch at index {int(idx[0])} "
                        f"(first 10: {names[:10]}); fix or remove them, or pass --skip-bad to leave them out "
                        f"(recorded in /splits/{name}/bad_paths); --resume continues after the rows written"
                    )
                bad = np.concatenate([bad, new])
                bg.submit(record_bad, g, new, [source.name(int(i)) for i in new])
            feats = self._forward(x[ok] if not ok.all() else x)
            bg.submit(w.append, name, feats.numpy(), y[ok], None if paths is None else paths[idx[ok]].tolist())
            self.progress(len(idx))
        bg.drain()
        good = np.setdiff1d(np.arange(n), bad)
        for view, done in enumerate(w.view_rows(name)):
            self.progress(done)
            for x, _, idx, ok in self._batches(source, good[done:], view):
                if not ok.all():
                    raise BadImagesError(f"split {name!r}: image(s) {[source.name(int(i)) for i in idx[~ok]]} "
                                         "became unreadable during the augmented views")
                bg.submit(w.append_view, name, view, self._forward(x).numpy())
                self.progress(len(idx))
            bg.drain()
        if len(bad):
            shrink_split(w, name, len(good))


def extract_features(
    model: nn.Module,
    sources: Mapping[str, ImageSource],
    out: str | os.PathLike,
    *,
    counts: Any,
    transform: TransformConfig,
    config: ExtractConfig = ExtractConfig(),
    head: Optional[tuple] = None,
    class_names: Optional[Sequence[str]] = None,
    meta: Optional[Mapping[str, Any]] = None,
    features_fn: Optional[FeatureFn] = None,
    progress: Optional[Callable[[int], None]] = None,
    final: Optional[str | os.PathLike] = None,
) -> ExtractResult:
    """Run ``model`` over every split of ``sources`` and write the feature file ``out``.

    Parameters
    ----------
    model : nn.Module
        A timm-style model (``forward_features``/``forward_head``) or any module with ``features_fn``.
    sources : mapping of split name to ImageSource
        E.g. ``{"train": ArraySource(images_uint8_NHWC, labels), "test": ...}``.
    out : path
        Written as ``out.partial`` (flushed per batch, resumable) and renamed to ``out`` when complete.
    counts : int array (C,)
        Training images per class (shot groups).
    transform : TransformConfig
        Eval transform; its train augmentation is used for ``config.train_views`` extra passes over train.
    head : (W (C, D), b (C,) or None), optional
        The stage-1 classifier stored in ``/head`` (see ``checkpoints.linear_head``).
    meta : mapping, optional
        Root attributes: ``model``, ``dataset``, ``checkpoint_sha256`` and any extra (str/number) ones.
    features_fn : callable (B, 3, S, S) -> (B, D), optional
        Defaults to :func:`pre_logits` of ``model``.
    progress : callable(int), optional
        Called with the number of images done (including those already on disk when resuming).
    final : path, optional
        The user's output path when ``out`` is an intermediate (a shard): checked against ``overwrite``.

    Returns
    -------
    ExtractResult
    """
    cfg = config
    out = Path(out)
    meta = dict(meta or {})
    fingerprint = _fingerprint(meta, transform, cfg, {name: len(src) for name, src in sources.items()})
    if cfg.resume:  # a requeued job, or a shard that finished before another rank failed
        done = finished_output(out, fingerprint)
        if done is not None:
            return done
    check_output(final or out, cfg.overwrite)
    if out != Path(final or out):
        check_output(out, True)
    if cfg.train_views and "train" not in sources:
        raise ValueError("--train-views needs the train split")
    runner = _Runner(model, features_fn, cfg, transform, progress)
    t0 = time.perf_counter()
    partial = partial_path(out)
    try:
        with output_lock(out), interrupt_guard():
            if not resume_partial(out, fingerprint, resume=cfg.resume, overwrite=cfg.overwrite):
                dim = runner.feature_dim()
                try:  # created whole or not at all: a half-created one could never be resumed
                    _create(partial, sources, dim, counts=np.asarray(counts), transform=transform, cfg=cfg,
                            head=head, class_names=class_names, meta=meta, fingerprint=fingerprint).close()
                except BaseException:
                    quietly(partial.unlink)
                    raise
            try:
                rows, bad = _extract_into(runner, partial, sources, own_counts=final is None)
            except NonFiniteFeaturesError as e:  # the same settings can never finish this file
                written = _rows_written(partial)
                if not written:  # nothing of value in it
                    quietly(partial.unlink)
                    raise NonFiniteFeaturesError(f"{e}; nothing was published ({partial.name} removed)") from None
                raise NonFiniteFeaturesError(  # completed rows are never deleted: hours of extraction
                    f"{e}; nothing was published; the {written} rows written so far are kept in {partial}. "
                    "If float16 autocast overflowed (large ViTs on a GPU), restart with --no-autocast "
                    "--overwrite; --resume continues only with the same settings") from None
            FeatureStore(partial).close()  # validate before publishing
            _publish(partial, out, cfg.overwrite)
    except WriteInterrupted:
        raise
    except KeyboardInterrupt:
        kept = f"; the rows written so far are in {partial}: continue with --resume" if partial.exists() else ""
        raise WriteInterrupted(f"interrupted; {out} was not changed{kept}") from None
    except (OSError, RuntimeError) as e:
        code = None if isinstance(e, FileExistsError) else os_cause(e, partial.parent)
        if code is None:
            raise
        resume = "; then rerun with --resume to continue after the rows written" if partial.exists() else ""
        raise write_failure(partial, code, "extraction stopped: cannot write", resume) from None
    return ExtractResult(out, rows, {k: v for k, v in bad.items() if v}, runner.images, time.perf_counter() - t0)


def finished_output(out: Path, fingerprint: Mapping[str, Any]) -> Optional[ExtractResult]:
    """The result of a finished extraction at ``out`` made with the same settings (``fingerprint``),
    or None: a requeued job whose first run completed has nothing left to do. Only a valid, complete
    file with no ``OUT.partial`` beside it counts."""
    if not out.is_file() or partial_path(out).exists():
        return None
    try:
        with FeatureStore(out) as store:
            stored = json.loads(store.attrs.get(FINGERPRINT_ATTR, "null") or "null")
            rows = {name: info.rows for name, info in store.splits.items()}
            complete = all(info.complete for info in store.splits.values())
            bad = {name: bad_paths(store.file[f"splits/{name}"]) for name in store.splits}
    except (ValueError, OSError):  # FeatureFileError included
        return None
    if not complete or stored != json.loads(json.dumps(fingerprint)):
        return None
    return ExtractResult(out, rows, {k: v for k, v in bad.items() if v}, already_complete=True)


def _extract_into(runner: _Runner, partial: Path, sources: Mapping[str, ImageSource], own_counts: bool = True
                  ) -> tuple[dict, dict]:
    """Extract every incomplete split into ``partial``; (rows, bad paths) per split. A failure is
    reported as it happened: closing the file after it cannot replace it with a second error.
    ``own_counts``: the file's counts describe its own train split (not a shard's), so images left
    out by --skip-bad are taken out of them."""
    w = open_writer(partial)
    bg = _BackgroundWriter()
    try:
        for name, src in sources.items():
            if not w.is_complete(name):
                runner.run_split(w, bg, name, src)
                w.mark_complete(name)
        if own_counts:
            drop_skipped_from_counts(w)
        rows = {name: w.rows(name) for name in sources}
        bad = {name: bad_paths(w.file[f"splits/{name}"]) for name in sources}
    except BaseException:
        quietly(bg.close)
        quietly(w.close)
        raise
    try:
        bg.close()
    finally:
        w.close()
    return rows, bad


def _publish(partial: Path, out: Path, overwrite: bool) -> None:
    """``partial`` becomes ``out``; without ``overwrite`` never over a file that appeared meanwhile."""
    try:
        with deferred_sigint() as pending:
            publish(partial, out, overwrite)
        if pending:
            raise WriteInterrupted(f"interrupted; {out} was written completely")
    except FileExistsError:
        raise FileExistsError(
            f"{out} appeared while the extraction ran; not replacing it. The new features are complete in "
            f"{partial}: rerun with --resume --overwrite to replace {out} with them, or move {partial} yourself"
        ) from None

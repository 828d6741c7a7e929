"""The benchmarked operations, each measured against its floor in the same process.

Every function takes a :class:`Bench` and returns a :class:`~benchmarks.harness.Result`.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .harness import PeakRSS, Result, timed, timed_pair
from .processes import child_run, larger_than_memory_op, ltr_argv, process_memory_op


@dataclass
class Bench:
    """What the operations share: the feature file, the device, repeats and loaded splits."""

    path: Path
    scale: Any  # data.Scale
    device: str = "cpu"
    repeats: int = 3
    slow_repeats: int = 1  # for operations that take minutes at full scale (naive loop, cRT grid)
    warmup: bool = True  # one unmeasured call before the timed ones
    workdir: Optional[Path] = None
    log: Callable[[str], None] = print
    _cache: dict = field(default_factory=dict)

    @property
    def store(self):
        from lt_rebalance.store import FeatureStore

        if "store" not in self._cache:
            self._cache["store"] = FeatureStore(self.path)
        return self._cache["store"]

    def load(self, split: str, dtype: str = "stored"):
        """(X, y) of ``split`` on the device (read once), features in the stored dtype as ``ltr``
        keeps them (or ``dtype="float32"``: the whole split upcast, the old in-memory path)."""
        key = (split, dtype)
        if key not in self._cache:
            X, y = self.store.load(split, dtype=dtype)
            self._cache[key] = (X.to(self.device), y.to(self.device))
        return self._cache[key]

    def head(self):
        if "head" not in self._cache:
            W, b = self.store.head()
            self._cache["head"] = (W.to(self.device), b.to(self.device))
        return self._cache["head"]

    @property
    def eval_split(self) -> str:
        return "test" if "test" in self.store.splits else "val"

    @property
    def counts(self):
        return self.store.counts_tensor()

    @property
    def large(self) -> bool:
        return self.scale.dim * self.store.splits["train"].rows > 2**27  # beyond 'small'

    def time(self, name, operation, op, floor_fn, **kwargs) -> Result:
        kwargs.setdefault("repeats", self.repeats)
        kwargs["warmup"] = kwargs.get("warmup", True) and self.warmup
        return timed(name, operation, op, floor_fn, device=self.device, **kwargs)


def _gemm_argmax(X, W):
    """The floor of a scoring pass: logits GEMM and argmax, a block of rows at a time."""
    import torch

    from lt_rebalance.blocks import chunked_matmul

    pred = torch.empty(len(X), dtype=torch.int64, device=X.device)
    chunked_matmul(X, W, lambda z, s: torch.argmax(z, dim=1, out=pred[s]))
    return pred


def _gemm(X, W):
    """One logits GEMM of X (upcast per block), output discarded: the floor of a logits pass."""
    from lt_rebalance.blocks import chunked_matmul

    chunked_matmul(X, W, lambda z, s: None)


# -- tau-normalisation ------------------------------------------------------------------------------
def tau_sweep_op(b: Bench) -> Result:
    from lt_rebalance.heads import DEFAULT_TAUS, tau_sweep

    W, _ = b.head()
    splits = [s for s in ("val", "test") if s in b.store.splits]
    data = [b.load(s) for s in splits]
    counts = b.counts

    def op():
        return [tau_sweep(X, y, W, counts, DEFAULT_TAUS) for X, y in data]

    def floor():
        return [_gemm_argmax(X, W) for X, _ in data]

    rows = sum(len(X) for X, _ in data)
    return b.time(
        "tau_sweep", f"tau-sweep, {len(DEFAULT_TAUS)} tau, {' + '.join(splits)} ({rows} rows)", op, floor,
        floor="1 logits GEMM + argmax", goal=1.3,
    )


def naive_tau_loop(X, y, W, counts, taus):
    """The reference's way: re-normalise W and run a full GEMM and argmax for every tau."""
    from lt_rebalance.heads import tau_normalize
    from lt_rebalance.metrics import accuracy_summary

    preds = [_gemm_argmax(X, tau_normalize(W, t)) for t in taus]
    return accuracy_summary(__import__("torch").stack(preds), y, counts)


def tau_naive_op(b: Bench) -> Result:
    from lt_rebalance.heads import DEFAULT_TAUS, tau_sweep

    W, _ = b.head()
    splits = [s for s in ("val", "test") if s in b.store.splits]
    data = [b.load(s) for s in splits]
    counts = b.counts
    slow = b.large
    r = b.time(
        "tau_naive", f"naive per-tau loop ({len(DEFAULT_TAUS)} GEMMs), {' + '.join(splits)}",
        lambda: [naive_tau_loop(X, y, W, counts, DEFAULT_TAUS) for X, y in data],
        lambda: [tau_sweep(X, y, W, counts, DEFAULT_TAUS) for X, y in data],
        floor="our tau_sweep", kind="info", repeats=b.slow_repeats if slow else b.repeats, warmup=not slow,
        note="ratio = speed-up of tau_sweep over the naive loop",
    )
    return r


# -- NCM ------------------------------------------------------------------------------------------
def ncm_op(b: Bench) -> Result:
    from lt_rebalance.heads import NCM

    X, y = b.load("train")
    Xt, _ = b.load(b.eval_split)
    C = b.store.num_classes
    W, _ = b.head()

    def op():
        return NCM("cl2n", device=b.device).fit(X, y, num_classes=C).predict(Xt)

    return b.time(
        "ncm", f"NCM (cl2n) fit on train + predict {b.eval_split}", op, lambda: _gemm_argmax(Xt, W),
        floor=f"1 {b.eval_split} GEMM + argmax", goal=1.5,
    )


# -- LWS ------------------------------------------------------------------------------------------
def lws_op(b: Bench) -> Result:
    from lt_rebalance.heads import LWS

    W, bias = b.head()
    X, y = b.load("train")
    Xv, yv = b.load("val")

    def op():
        return LWS(W, bias, device=b.device).fit(X, y, Xv, yv)

    def floor():
        return _gemm(X, W)

    return b.time(
        "lws", "LWS, default epochs (5) on train, keep-best on val", op, floor, floor="1 train-logits GEMM", goal=3.0,
    )


# -- cRT ------------------------------------------------------------------------------------------
def _three_gemms(X, W, batch: int = 512):
    """Forward, weight-gradient and input-gradient GEMMs of every batch of ``batch`` rows (upcast)."""
    for s in range(0, len(X) - batch + 1, batch):
        xb = X[s : s + batch].float()
        Z = xb @ W.T  # forward (B, C)
        Z.T @ xb  # backward: weight gradient (C, D)
        Z @ W  # backward: input gradient (B, D)


def crt_epoch_op(b: Bench) -> Result:
    import torch

    from lt_rebalance.heads import CRT

    X, y = b.load("train")
    C, D = b.store.num_classes, X.shape[1]
    W = torch.randn(C, D, device=b.device) * 0.01

    def op():
        return CRT(epochs=1, device=b.device).fit(X, y, num_classes=C)

    n_used = (len(y) // 512) * 512
    return b.time(
        "crt_epoch", f"cRT, one epoch ({len(y) // 512} batches of 512)", op, lambda: _three_gemms(X[:n_used], W),
        floor="3 GEMMs of train size", kind="speed", goal=0.5,
        note="ratio = floor FLOP/s fraction reached (floor time / epoch time)",
    )


def crt_grid_op(b: Bench, grid_size: int = 4) -> Result:
    """``CRTGrid`` (lr grid, one epoch) against G lone ``CRT`` fits; both select on val."""
    from lt_rebalance.heads import CRT, CRTGrid

    X, y = b.load("train")
    Xv, yv = b.load("val")
    C = b.store.num_classes
    lrs = [0.05 * 2**i for i in range(grid_size)]

    def op():
        return CRTGrid(CRT(epochs=1, device=b.device), lrs=lrs, weight_decays=[5e-4]).fit(
            X, y, Xv, yv, num_classes=C)

    def one():
        return CRT(lr=lrs[2], epochs=1, device=b.device).fit(X, y, Xv, yv, num_classes=C)

    return b.time("crt_grid", f"cRT grid of G={grid_size} heads (lr grid, 1 epoch each)", op, one,
                  floor=f"{grid_size} x one head", goal=0.6, floor_scale=grid_size,
                  note="ratio = grid time / (G x one head time)")


# -- float16 in memory ----------------------------------------------------------------------------
def upcast_gemm_op(b: Bench) -> Result:
    """The train-logits GEMM from float16 rows upcast per block, against the same GEMM from float32 rows."""
    W, _ = b.head()
    X16, _ = b.load("train")
    X32, _ = b.load("train", "float32")
    r = b.time(
        "upcast_gemm", f"train-logits GEMM from {X16.dtype} blocks upcast to float32", lambda: _gemm(X16, W),
        lambda: _gemm(X32, W), floor="same GEMM from a float32 copy", goal=1.1,
    )
    del b._cache[("train", "float32")]
    return r


def equivalence_op(b: Bench) -> Result:
    """Results from features kept float16 (what ``ltr`` does) against the in-memory float32 path.

    τ-sweep curves and NCM predictions must be identical (float16 -> float32 is exact and the
    blocks are the same); cRT (1 epoch) accuracy identical; LWS on its float16 logit cache within
    0.1 point of a float32 cache. Seconds: the float16 path; floor: the float32 path.
    """
    import torch

    from lt_rebalance.heads import CRT, LWS, NCM, tau_sweep

    W, bias = b.head()
    C, ev = b.store.num_classes, b.eval_split
    counts = b.counts

    def run(dtype: str, lws_cache: str) -> dict:
        X, y = b.load("train", dtype)
        Xv, yv = b.load("val", dtype)
        Xt, yt = b.load(ev, dtype)
        out = {"tau": tau_sweep(Xv, yv, W, counts)["all"], "ncm": NCM().fit(X, y, num_classes=C).predict(Xt)}
        crt = CRT(epochs=1, device=b.device).fit(X, y, Xv, yv, num_classes=C)
        out["crt"] = (crt.predict(Xt) == yt).double().mean().item()
        lws = LWS(W, bias, device=b.device, cache_dtype=lws_cache).fit(X, y, Xv, yv)
        out["lws"] = (lws.predict(Xt) == yt).double().mean().item()
        return out

    with PeakRSS() as mem_ref:
        t0 = time.perf_counter()
        ref = run("float32", "float32")
        t_ref = time.perf_counter() - t0
    for split in ("train", "val", ev):
        b._cache.pop((split, "float32"), None)
    with PeakRSS() as mem_new:
        t0 = time.perf_counter()
        new = run("stored", "float16")
        t_new = time.perf_counter() - t0
    checks = {
        "tau_curve_identical": bool(torch.equal(ref["tau"], new["tau"])),
        "ncm_predictions_differing": int((ref["ncm"] != new["ncm"]).sum()),
        "crt_top1_diff_points": 100 * abs(ref["crt"] - new["crt"]),
        "lws_top1_diff_points": 100 * abs(ref["lws"] - new["lws"]),
    }
    ok = (checks["tau_curve_identical"] and checks["ncm_predictions_differing"] == 0
          and checks["crt_top1_diff_points"] <= 0.1 and checks["lws_top1_diff_points"] <= 0.1)
    note = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in checks.items())
    b.log(f"  equivalence: {note}")
    return Result(
        "equivalence", "float16 in memory vs float32 path: tau-sweep, NCM, cRT 1 epoch, LWS", t_new, t_ref,
        "float32 in memory, LWS float32 cache", "info", passed=ok, note=note, runs=[t_new], floor_runs=[t_ref],
        peak_rss_mib=mem_new.delta_mib, floor_peak_rss_mib=mem_ref.delta_mib,
    ).finish()
# -- more classifiers (issue 16) -------------------------------------------------------------------
def knn_op(b: Bench) -> Result:
    import torch.nn.functional as F

    from lt_rebalance.blocks import chunked_matmul
    from lt_rebalance.heads import KNN

    X, y = b.load("train")
    Xt, _ = b.load(b.eval_split)
    C = b.store.num_classes
    head = KNN(device=b.device)

    def op():
        return head.fit(X, y, num_classes=C).predict(Xt)

    def floor():  # normalised rows, one similarity GEMM in the same query blocks, results dropped
        T = F.normalize(X.float(), dim=1)
        chunked_matmul(F.normalize(Xt.float(), dim=1), T, lambda S, s: None, chunk=head.query_block)

    return b.time(
        "knn", f"kNN (k {head.k}, T {head.temperature:g}) fit on train + predict {b.eval_split}", op, floor,
        floor=f"1 {b.eval_split} x train similarity GEMM", goal=1.5,
        repeats=b.slow_repeats if b.large else b.repeats, warmup=not b.large,
        note="blocked top-k merge; memory bounded by query_block x train_block similarities",
    )


def _scale_floor(r: Result, factor: float, what: str) -> Result:
    """The floor of ``r`` times ``factor`` (known only after the operation ran), ratio recomputed."""
    if r.floor_seconds is not None:
        r.floor_seconds *= factor
        r.floor_runs = [t * factor for t in r.floor_runs]
        r.floor = f"{factor:g} x {what}"
        r.finish()
    return r


def linear_probe_op(b: Bench) -> Result:
    import torch

    from lt_rebalance.heads import LinearProbe

    X, y = b.load("train")
    C = b.store.num_classes
    W = torch.randn(C, X.shape[1], device=b.device) * 0.01
    fits: list = []

    def op():
        fits.append(LinearProbe(device=b.device).fit(X, y, num_classes=C))
        return fits[-1]

    r = b.time(
        "linear_probe", "linear probe, L-BFGS (C 1, balanced, max_iter 100) on train", op, lambda: _gemm(X, W),
        floor="", goal=3.0, repeats=b.slow_repeats, warmup=False,
        note="each L-BFGS iteration evaluates f and its gradient at least once: 2 GEMMs over the train rows",
    )
    if fits:
        r.note += f"; {fits[-1].n_iter_} iterations, {fits[-1].n_evaluations_} evaluations"
        r = _scale_floor(r, fits[-1].n_iter_, "1 train-logits GEMM (iterations x)")
    return r


def marc_op(b: Bench) -> Result:
    from lt_rebalance.heads import MARC

    W, bias = b.head()
    X, y = b.load("train")
    Xv, yv = b.load("val")
    return b.time(
        "marc", "MARC, default epochs (5) on train, keep-best on val", lambda: MARC(W, bias, device=b.device).fit(
            X, y, Xv, yv), lambda: _gemm(X, W), floor="1 train-logits GEMM", goal=3.0,
    )


def wb_epoch_op(b: Bench) -> Result:
    import torch

    from lt_rebalance.heads import WeightBalancing

    W, bias = b.head()
    X, y = b.load("train")
    Wr = torch.randn_like(W) * 0.01
    n_used = (len(y) // 64) * 64
    return b.time(
        "wb_epoch", f"weight balancing, one epoch ({len(y) // 64} batches of 64, MaxNorm each step)",
        lambda: WeightBalancing(W, bias, epochs=1, device=b.device).fit(X, y), lambda: _three_gemms(X[:n_used], Wr),
        floor="3 GEMMs of train size", kind="speed", goal=0.5,
        note="ratio = floor FLOP/s fraction reached (floor time / epoch time)",
    )


# -- store ----------------------------------------------------------------------------------------
def store_read_op(b: Bench) -> Result:
    import h5py

    from lt_rebalance.store import FeatureStore

    split = "train"

    def op():
        return FeatureStore(b.path).features(split, dtype="stored")

    def floor():
        with h5py.File(b.path, "r") as f:
            return f[f"splits/{split}/features"][...]

    info = b.store.splits[split]
    return b.time(
        "store_read", f"store read of {split} ({info.rows} x {b.store.dim} {info.dtype}, kept {info.dtype})",
        op, floor, floor="bare h5py ds[...]", kind="speed", goal=0.7,
        note="file in the page cache (warm); ratio = floor time / store time",
    )


def checksum_write_op(b: Bench) -> Result:
    """Writing the train split through the store (finite check + SHA-256 as written) vs bare h5py."""
    import h5py

    from lt_rebalance.store import write_features

    X, y = b.store.features("train").numpy().astype(b.store.splits["train"].dtype), b.store.labels("train").numpy()
    tmp = Path(tempfile.mkdtemp(dir=b.workdir))

    def op():
        out = tmp / "w.h5"
        out.unlink(missing_ok=True)
        write_features(out, {"train": (X, y)}, dtype=str(X.dtype))

    def floor():
        out = tmp / "bare.h5"
        out.unlink(missing_ok=True)
        with h5py.File(out, "w") as f:
            f.create_dataset("features", data=X)
            f.create_dataset("labels", data=y)

    try:
        return b.time(
            "checksum_write", f"write_features of train ({X.shape[0]} x {X.shape[1]} {X.dtype}) with checksums",
            op, floor, floor="bare h5py create_dataset", kind="time", goal=3.0,
            note="page cache; op adds the finite check, the SHA-256 of every dataset and the atomic rename",
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checksum_verify_op(b: Bench) -> Result:
    """``ltr check``'s checksum pass over the whole file vs reading every dataset and hashing its bytes."""
    import hashlib

    import h5py

    from lt_rebalance.integrity import verify_checksums

    def op():
        with h5py.File(b.path, "r") as f:
            report = verify_checksums(f)
        if report.mismatched or not report.verified:
            raise RuntimeError(f"checksums of {b.path}: {report}")

    def floor():
        with h5py.File(b.path, "r") as f:
            found = []
            f.visititems(lambda _, o: found.append(o) if isinstance(o, h5py.Dataset) and o.dtype.kind != "O" else None)
            for ds in found:
                hashlib.sha256(memoryview(np.ascontiguousarray(ds[...])).cast("B")).hexdigest()

    size = sum(i.capacity * b.store.dim * (2 if i.dtype == "float16" else 4) for i in b.store.splits.values())
    return b.time(
        "checksum_verify", f"verify every recorded SHA-256 ({size / 2**20:.0f} MiB of features)", op, floor,
        floor="bare h5py ds[...] + hashlib.sha256 of each dataset", kind="time", goal=1.3,
        note="page cache; the normal read path hashes nothing (store_read)",
    )


# -- extraction -----------------------------------------------------------------------------------
def extraction_op(b: Bench, images: Optional[int] = None, size: Optional[int] = None) -> Result:
    import torch
    from lt_rebalance.extract.backbones import create_backbone
    from lt_rebalance.extract.datasets import ArraySource, TransformConfig, eval_transform
    from lt_rebalance.extract.run import ExtractConfig, extract_features, pre_logits

    tiny = b.scale.name == "tiny"
    images = images or (16 if tiny else 256)
    size = size or (32 if tiny else 112)
    operation = f"extraction, resnet10 (timm, random init), {images} images {size}px, CPU"
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8)
    labels = np.arange(images) % 10
    src = ArraySource(imgs, labels)
    tf = TransformConfig(size=size, resize=None)
    model = create_backbone("resnet10", num_classes=10)
    cfg = ExtractConfig(batch_size=64, workers=0, device="cpu", overwrite=True)
    tmp = Path(tempfile.mkdtemp(prefix="ltr-bench-extract-", dir=b.workdir))
    out = tmp / "feats.h5"
    to_tensor = eval_transform(tf)
    batches = [torch.stack([to_tensor(src.load(i)) for i in range(s, min(s + 64, images))])
               for s in range(0, images, 64)]
    fwd = pre_logits(model)

    def op():
        return extract_features(model, {"train": src}, out, counts=np.bincount(labels), transform=tf, config=cfg)

    def floor():
        with torch.inference_mode():
            return [fwd(x) for x in batches]

    try:
        return b.time(
            "extraction", operation, op, floor, floor="bare model forward, same batches", kind="speed", goal=0.85,
            note="ratio = images/s of extract_features (decode, transform, forward, HDF5 write) / bare forward",
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- start-up -------------------------------------------------------------------------------------
def _run_child(argv: list[str]) -> float:
    """Wall time of one child process."""
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def startup_op(b: Bench, repeats: Optional[int] = None) -> Result:
    import statistics

    ltr = shutil.which("ltr")
    argv = ltr_argv("--help")
    base = [sys.executable, "-c", "pass"]
    repeats = repeats or max(b.repeats, 5)
    if b.warmup:
        _run_child(argv)  # warm-up (page cache, .pyc)
        _run_child(base)
    ops, floors = [], []
    for _ in range(repeats):
        floors.append(_run_child(base))
        ops.append(_run_child(argv))
    _, rss = child_run(argv)
    return Result(
        "startup", "`ltr --help` start-up" + ("" if ltr else " (python -m lt_rebalance.cli)"),
        statistics.median(ops), statistics.median(floors), "`python -c pass`", "excess", 0.3,
        peak_rss_mib=rss, runs=ops, floor_runs=floors, note="peak memory: child's max RSS (absolute, not a delta)",
    ).finish()


# -- evaluation protocols -----------------------------------------------------------------------
def bootstrap_op(b: Bench, resamples: int = 1000) -> Result:
    import torch

    from lt_rebalance.protocols import bootstrap_metrics, stratified_resamples

    X, y = b.load(b.eval_split)
    W, _ = b.head()
    pred, y = _gemm_argmax(X, W).cpu(), y.cpu()
    counts, N = b.counts, len(y)

    def op():
        return bootstrap_metrics(pred, y, counts, stratified_resamples(y, resamples, 0))

    def floor():  # the same number of plain (unstratified) resamples, each only summed
        correct = (pred == y).float()
        gen = torch.Generator().manual_seed(0)
        step = max(1, (1 << 24) // N)
        return [correct[torch.randint(0, N, (min(step, resamples - i), N), generator=gen)].sum(1)
                for i in range(0, resamples, step)]

    return b.time(
        "bootstrap", f"stratified bootstrap, {resamples} resamples of {b.eval_split} ({N} rows), 5 metrics", op,
        floor, floor=f"{resamples} plain resamples, top-1 only", goal=4.0,
    )


# -- precision: bfloat16 against float32 ----------------------------------------------------------
def gemm_precision_op(b: Bench) -> list[Result]:
    """The machine's GEMM floors at this scale's train-logits shape (8192 rows x D x C): float32 against
    bfloat16 (and float16, for information), operands prepared, interleaved runs, best of each."""
    import torch

    C, D = b.store.num_classes, b.scale.dim
    M = min(8192, b.store.splits["train"].rows)
    g = torch.Generator().manual_seed(0)
    A32 = torch.randn(M, D, generator=g).to(b.device)
    B32 = torch.randn(D, C, generator=g).to(b.device)
    operands = {t: (A32.to(t), B32.to(t)) for t in (torch.float32, torch.bfloat16, torch.float16)}
    flop = 2.0 * M * D * C
    out = []
    for t, name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        A, B = operands[t]
        r = timed_pair(
            "gemm_precision", f"GEMM {M} x {D} x {C}: float32 against {name} operands",
            lambda: torch.mm(*operands[torch.float32]), lambda A=A, B=B: torch.mm(A, B), floor=f"{name} GEMM",
            kind="info", repeats=max(b.repeats, 3), warmup=b.warmup, device=b.device,
        )
        r.note = (f"float32 {flop / r.seconds / 1e9:.0f} GFLOP/s, {name} {flop / r.floor_seconds / 1e9:.0f} "
                  f"GFLOP/s; ratio = speed-up of {name}")
        out.append(r)
    return out


def _precision_pair(b: Bench, name: str, operation: str, make: Callable[[str], Callable[[], Any]],
                    goal: float) -> Result:
    """``make("bfloat16")`` against ``make("float32")``, interleaved (kind time: bfloat16 / float32)."""
    return timed_pair(name, operation + " in bfloat16", make("bfloat16"), make("float32"),
                      floor="the same in float32", goal=goal, repeats=b.repeats, warmup=b.warmup, device=b.device,
                      note="ratio = bfloat16 time / float32 time")


def tau_sweep_bf16_op(b: Bench) -> Result:
    from lt_rebalance.heads import DEFAULT_TAUS, tau_sweep

    W, _ = b.head()
    data = [b.load(s) for s in ("val", "test") if s in b.store.splits]
    return _precision_pair(b, "tau_sweep_bf16", "tau-sweep (val + test)", lambda p: lambda: [
        tau_sweep(X, y, W, b.counts, DEFAULT_TAUS, precision=p) for X, y in data], goal=0.5)


def ncm_bf16_op(b: Bench) -> Result:
    from lt_rebalance.heads import NCM

    X, y = b.load("train")
    Xt, _ = b.load(b.eval_split)
    C = b.store.num_classes
    return _precision_pair(b, "ncm_bf16", f"NCM (cl2n) fit + predict {b.eval_split}", lambda p: lambda: NCM(
        "cl2n", device=b.device, precision=p).fit(X, y, num_classes=C).predict(Xt), goal=0.5)


def lws_cache_bf16_op(b: Bench) -> Result:
    from lt_rebalance.heads.lws import cache_joint_logits

    W, bias = b.head()
    X, _ = b.load("train")
    Xv, _ = b.load("val")
    return _precision_pair(b, "lws_cache_bf16", "LWS/MARC joint-logit cache build (train + val, float16 cache)",
                           lambda p: lambda: cache_joint_logits(W, bias, X, Xv, "float16", precision=p), goal=0.35)


def crt_epoch_bf16_op(b: Bench) -> Result:
    from lt_rebalance.heads import CRT

    X, y = b.load("train")
    C = b.store.num_classes
    return _precision_pair(b, "crt_epoch_bf16", "cRT, one epoch", lambda p: lambda: CRT(
        epochs=1, device=b.device, precision=p).fit(X, y, num_classes=C), goal=0.35)


OPERATIONS: dict[str, Callable[[Bench], Result]] = {
    "tau_sweep": tau_sweep_op,
    "tau_naive": tau_naive_op,
    "ncm": ncm_op,
    "lws": lws_op,
    "crt_epoch": crt_epoch_op,
    "crt_grid": crt_grid_op,
    "knn": knn_op,
    "linear_probe": linear_probe_op,
    "marc": marc_op,
    "wb_epoch": wb_epoch_op,
    "store_read": store_read_op,
    "upcast_gemm": upcast_gemm_op,
    "equivalence": equivalence_op,
    "checksum_write": checksum_write_op,
    "checksum_verify": checksum_verify_op,
    "extraction": extraction_op,
    "startup": startup_op,
    "process_memory": process_memory_op,
    "larger_than_memory": larger_than_memory_op,
    "bootstrap": bootstrap_op,
    "gemm_precision": gemm_precision_op,
    "tau_sweep_bf16": tau_sweep_bf16_op,
    "ncm_bf16": ncm_bf16_op,
    "lws_cache_bf16": lws_cache_bf16_op,
    "crt_epoch_bf16": crt_epoch_bf16_op,
}


def run_study(b: Bench, crt_epochs: int = 10) -> dict:
    """The whole classifier study (``compare``'s default methods) end to end.

    Timed from opening the feature file (splits are read once) to the last metric.
    """
    from lt_rebalance.session import Session
    from lt_rebalance.store import FeatureStore
    from lt_rebalance.study import compare

    from .harness import PeakRSS

    with PeakRSS() as mem:
        t0 = time.perf_counter()
        ctx = Session(FeatureStore(b.path), device=b.device)
        out = compare(ctx, options={"crt": {"epochs": crt_epochs}}, log=b.log)
        seconds = time.perf_counter() - t0
    methods = {
        r["method"]: {"seconds": r["seconds"], **{s: round(r[s]["all"], 4) for s in ctx.eval_splits if s in r}}
        for r in out["rows"]
    }
    return {"seconds": seconds, "peak_rss_mib": mem.delta_mib, "crt_epochs": crt_epochs, "methods": methods,
            "skipped": out["skipped"]}

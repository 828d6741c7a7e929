"""torchrun / ``--gpus G``: each rank extracts a contiguous shard into its own file; rank 0 merges in order."""
from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np

from lt_rebalance.outputs import publish
from lt_rebalance.store import FeatureFileWriter, FeatureStore

from .datasets import ImageSource
from .output import (
    FINGERPRINT_ATTR,
    bad_indices,
    bad_paths,
    drop_skipped_from_counts,
    output_lock,
    partial_path,
    record_bad,
)
from .run import ExtractResult, extract_features


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int


def dist_env() -> Optional[DistEnv]:
    """The torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK), or None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def shard_bounds(n: int, world: int) -> np.ndarray:
    """Contiguous shard boundaries, int64 (world + 1,): rank r gets [b[r], b[r+1])."""
    return np.arange(world + 1, dtype=np.int64) * n // world


class ShardSource:
    """Rows [start, stop) of another source."""

    def __init__(self, source: ImageSource, start: int, stop: int):
        self.source, self.start = source, start
        self.labels = source.labels[start:stop]
        self.paths = source.paths[start:stop] if source.paths is not None else None

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int):
        return self.source.load(self.start + i)

    def name(self, i: int) -> str:
        return self.source.name(self.start + i)


def shard_path(out: str | os.PathLike, rank: int, world: int) -> Path:
    return Path(f"{out}.shard{rank}-of-{world}")


def merge_shards(shards: list[Path], out: Path, offsets: dict[str, np.ndarray], block: int = 8192,
                 overwrite: bool = False) -> None:
    """Concatenate complete shard files split by split into ``out`` (via ``out.partial``), then delete them.

    ``out`` is replaced only with ``overwrite`` (:func:`lt_rebalance.outputs.publish`)."""
    partial = partial_path(out)
    with output_lock(out), ExitStack() as stack:
        partial.unlink(missing_ok=True)
        files = [stack.enter_context(h5py.File(p, "r")) for p in shards]
        first = files[0]
        w = stack.enter_context(FeatureFileWriter(h5py.File(partial, "w-")))
        for key, value in first.attrs.items():
            w.file.attrs[key] = value
        fingerprint = json.loads(first.attrs[FINGERPRINT_ATTR])
        fingerprint["splits"] = {s: int(offsets[s][-1]) for s in fingerprint["splits"]}
        w.file.attrs[FINGERPRINT_ATTR] = json.dumps(fingerprint)
        for group in ("classes", "head"):
            if group in first:
                first.copy(first[group], w.file, group)
        for name, g0 in first["splits"].items():
            parts = [f[f"splits/{name}"] for f in files]
            total = sum(int(p.attrs["rows"]) for p in parts)
            views = g0["views"].shape[0] if "views" in g0 else 0
            w.create_split(name, total, g0["features"].shape[1], dtype=str(g0["features"].dtype), views=views,
                           with_paths="paths" in g0)
            dst, row = w.file[f"splits/{name}"], 0
            for part, offset in zip(parts, offsets[name][:-1]):
                for start in range(0, int(part.attrs["rows"]), block):
                    stop = min(int(part.attrs["rows"]), start + block)
                    for key in ("features", "labels", "paths"):
                        if key in part:
                            dst[key][row + start : row + stop] = part[key][start:stop]
                    if views:
                        dst["views"][:, row + start : row + stop] = part["views"][:, start:stop]
                row += int(part.attrs["rows"])
                if len(bad := bad_indices(part)):
                    record_bad(dst, bad + offset, bad_paths(part))
            dst.attrs["rows"] = total
            if views:
                dst.attrs["view_rows"] = np.full(views, total, dtype=np.int64)
            w.mark_complete(name)
        drop_skipped_from_counts(w)
        w.close()
        FeatureStore(partial).close()
        publish(partial, out, overwrite)
    for p in shards:
        p.unlink()


def init_process_group(device: str, env: DistEnv) -> None:
    """Join the ranks' group: gloo, whose collectives take the host-side tensors used here (the image
    counter, barriers) for CPU and CUDA ranks alike (NCCL refuses a CPU tensor: "No backend type
    associated with device type cpu"); a CUDA rank is bound to its own GPU first (else every rank's
    pinned memory and barriers land on GPU 0)."""
    import torch
    import torch.distributed as dist

    if str(device).startswith("cuda"):
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group("gloo", timeout=timedelta(hours=24))


def extract_sharded(model: Any, sources: dict[str, ImageSource], out: str | os.PathLike, env: DistEnv,
                    **kwargs: Any) -> ExtractResult:
    """:func:`extract_features` on this rank's shard of every split; rank 0 merges once all are done."""
    import torch
    import torch.distributed as dist

    from .run import _fingerprint, finished_output

    if kwargs["config"].resume:  # a requeued job whose merged file is complete: nothing to do
        sizes = {name: len(src) for name, src in sources.items()}
        done = finished_output(Path(out), _fingerprint(dict(kwargs.get("meta") or {}), kwargs["transform"],
                                                       kwargs["config"], sizes))
        if done is not None:
            return done
    if not dist.is_initialized():
        init_process_group(kwargs["config"].device, env)
    try:
        bounds = {name: shard_bounds(len(src), env.world) for name, src in sources.items()}
        mine = {name: ShardSource(src, int(b[env.rank]), int(b[env.rank + 1])) for (name, src), b in
                zip(sources.items(), bounds.values())}
        result = extract_features(model, mine, shard_path(out, env.rank, env.world), final=out, **kwargs)
        images = torch.tensor([result.images])
        dist.all_reduce(images)  # also the barrier: every shard is complete
        result.images = int(images)
        if env.rank == 0:
            merge_shards([shard_path(out, r, env.world) for r in range(env.world)], Path(out), bounds,
                         overwrite=kwargs["config"].overwrite)
            with h5py.File(out, "r") as f:
                result.rows = {name: int(f[f"splits/{name}"].attrs["rows"]) for name in sources}
                result.bad = {name: p for name in sources if (p := bad_paths(f[f"splits/{name}"]))}
            result.path = Path(out)
        dist.barrier()
        return result
    finally:
        dist.destroy_process_group()

"""``ltr extract``: run a backbone once over a dataset and write the feature file (thin wrapper)."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Optional

import click

from lt_rebalance.commands.errors import interrupts_as_errors, user_errors
from lt_rebalance.commands.options import device_option, json_option, quiet_option, seed_option
from lt_rebalance.commands.render import emit, log
from lt_rebalance.outputs import check_output

DATASET_CHOICES = ("imagenet_lt", "places_lt", "inat2018", "cifar10_lt", "cifar100_lt", "imagefolder")


def _parse_splits(value: Optional[str], data: str) -> tuple[str, ...]:
    if value is None:
        return ("train", "val") if data == "inat2018" else ("train", "val", "test")
    splits = tuple(dict.fromkeys(s.strip() for s in value.split(",") if s.strip()))
    if not splits:
        raise click.BadParameter("give at least one split, e.g. train,val,test", param_hint="--splits")
    return splits


class _RankOutput:
    """The ranks' stderr, filtered: their ``Error:`` lines (kept, once each, for the parent's one
    line), ``warning:``/``note:`` and progress lines (passed on), and the rest (torchrun banners,
    gloo and traceback noise of ranks whose peer failed) kept aside, shown only when no rank said
    what went wrong."""

    _PASS = ("warning: ", "note: ", "extracting: ")

    def __init__(self, keep: int = 60):
        self.errors: list[str] = []
        self.rest: list[str] = []
        self.keep = keep

    def feed(self, line: str) -> None:
        text = line.rstrip("\n")
        if text.startswith("Error: "):
            if text[7:] not in self.errors:
                self.errors.append(text[7:])
        elif text.startswith(self._PASS):
            click.echo(text, err=True)
        else:
            self.rest = [*self.rest[-(self.keep - 1):], text]

    def dump_tail(self) -> None:
        for text in self.rest:
            click.echo(text, err=True)


def _run_torchrun(argv: list[str], out: str, ranks: Optional[_RankOutput] = None, grace: float = 30.0) -> int:
    """Run torchrun in a process group of its own (stderr filtered by ``ranks``); on Ctrl-C or SIGTERM
    pass the signal on to the whole group (torchrun and its ranks), wait ``grace`` seconds for them
    to stop, then kill what is left: no rank is left running to publish the file later."""
    import signal
    import threading

    from lt_rebalance.outputs import last_stop_signal

    before = _stat(out)
    proc = subprocess.Popen(argv, start_new_session=True, stderr=subprocess.PIPE if ranks else None,
                            text=True, errors="replace")
    reader = None
    if ranks is not None:
        reader = threading.Thread(target=lambda: [ranks.feed(line) for line in proc.stderr], daemon=True)
        reader.start()
    try:
        rc = proc.wait()
        if reader is not None:
            reader.join()
        return rc
    except KeyboardInterrupt:
        signum = last_stop_signal()
        _signal_group(proc.pid, signum)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        if _stat(out) != before:  # rank 0 was publishing the merged file when the signal came
            raise KeyboardInterrupt(f"interrupted; {out} was written completely") from None
        raise KeyboardInterrupt(f"interrupted; {out} was not changed; finished shards are kept: continue with "
                                "--resume") from None


def _stat(path: str) -> Optional[tuple]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _check_gpus(gpus: int, device: str) -> None:
    """--gpus N on CUDA needs N GPUs (one per rank): one Error line naming what the machine has."""
    if str(device).startswith("cuda"):
        import torch

        have = torch.cuda.device_count()
        if gpus > have:
            raise click.BadParameter(f"{gpus} processes asked for, one per GPU, but this machine has {have} CUDA "
                                     f"GPU(s); give --gpus {have} or fewer (or --device cpu for CPU processes)",
                                     param_hint="--gpus")


def _torchrun_argv(ctx: click.Context, gpus: int) -> list[str]:
    """This command's options for ``torchrun -m lt_rebalance.extract`` (all but --gpus)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
            "-m", "lt_rebalance.extract"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == "gpus" or value is None or value is False:
            continue
        argv += [param.opts[0]] if value is True else [param.opts[0], str(value)]
    return argv


def _human(r: dict) -> str:
    lines = [f"wrote {r['out']}  ({r['images']} images in {r['seconds']:.1f} s, {r['images_per_second']:.1f} img/s)"]
    if r.get("already_complete"):
        lines = [f"{r['out']} is already complete, extracted with the same settings: nothing to do"]
    lines += [f"  {s}: {n} rows" + (f", {len(r['bad'][s])} unreadable skipped" if s in r["bad"] else "")
              for s, n in r["rows"].items()]
    return "\n".join(lines)


@click.command("extract", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", required=True, help="Alias (resnext50, resnet10, resnet50, resnet152, resnext152) or timm name.")
@click.option("--data", required=True, type=click.Choice(DATASET_CHOICES), help="Dataset layout.")
@click.option("--root", required=True, type=click.Path(file_okay=False), help="Dataset root folder.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Feature file to write (.h5).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="State dict or reference checkpoint (.pth).")
@click.option("--pretrained", is_flag=True, help="timm's published weights (needs network access).")
@click.option("--random-init", is_flag=True, help="Random weights (tests only).")
@click.option("--splits", default=None, help="Comma-separated splits [default: train,val,test; inat2018: train,val].")
@click.option("--train-views", default=0, show_default=True, type=click.IntRange(0), help="K augmented passes over train.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=min(8, os.cpu_count() or 1), show_default=True, type=click.IntRange(0),
              help="DataLoader worker processes.")
@device_option
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float16", "float32"]),
              help="Stored feature dtype.")
@click.option("--list-dir", type=click.Path(file_okay=False), help="Folder of list files (imagenet_lt, places_lt, inat2018).")
@click.option("--transform", "transform_kind", default="auto", show_default=True,
              type=click.Choice(["auto", "reference", "timm"]),
              help="Reference eval transform or the model's timm config; auto: timm's for CLIP/SigLIP/DINOv2/EVA-style "
                   "models, else reference.")
@click.option("--embedding", default="pre-logits", show_default=True, type=click.Choice(["pre-logits", "projected"]),
              help="Pooled pre-logits features, or the image-text projection of CLIP-style towers (matches ltr text-head).")
@click.option("--l2-normalize", is_flag=True, help="Store L2-normalised feature rows.")
@click.option("--image-size", type=click.IntRange(8), help="Crop side [default: 224; CIFAR 32].")
@click.option("--imbalance", default=100.0, show_default=True, type=click.FloatRange(1.0), help="CIFAR-LT imbalance factor.")
@click.option("--val-per-class", default=20, show_default=True, type=click.IntRange(1), help="CIFAR-LT val images per class.")
@click.option("--shot-many", type=click.IntRange(0), default=None,
              help="Record many-shot threshold (> N train images) fitting this dataset in the file [default: 100].")
@click.option("--shot-few", type=click.IntRange(0), default=None,
              help="Record few-shot threshold (< N train images) fitting this dataset in the file [default: 20].")
@click.option("--autocast/--no-autocast", default=True, show_default=True,
              help="CUDA only: run the backbone under float16 autocast (faster; --no-autocast if a large model "
                   "overflows float16).")
@click.option("--resume", is_flag=True, help="Continue OUT.partial from the rows already written.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT (or OUT.partial).")
@click.option("--skip-bad", is_flag=True, help="Leave unreadable images out; record them in /splits/<split>/bad_paths.")
@click.option("--gpus", default=1, show_default=True, type=click.IntRange(1),
              help="Processes (one per GPU) via torchrun; with --device cpu, CPU processes.")
@seed_option
@json_option
@quiet_option
@click.pass_context
def extract(ctx: click.Context, **opts: Any) -> None:
    """Run a backbone once over a long-tailed dataset and write the feature file."""
    weights = [k for k in ("checkpoint", "pretrained", "random_init") if opts[k]]
    if len(weights) != 1:
        raise click.UsageError("give exactly one of --checkpoint PATH, --pretrained or --random-init")
    splits = _parse_splits(opts["splits"], opts["data"])
    device = opts["device"]
    from .distributed import dist_env

    env = dist_env()
    if opts["gpus"] > 1 and env is None:
        _check_gpus(opts["gpus"], device)
        ranks = _RankOutput()
        with interrupts_as_errors():
            rc = _run_torchrun(_torchrun_argv(ctx, opts["gpus"]), opts["out"], ranks)
        if rc:
            if ranks.errors:  # the one useful line, not the tracebacks of the ranks that lost their peer
                raise click.ClickException(ranks.errors[0])
            ranks.dump_tail()
            raise click.ClickException(f"{opts['gpus']} extraction processes failed (exit status {rc}); see above")
        return
    quiet = opts["quiet"] or (env is not None and env.rank != 0)
    with interrupts_as_errors(), user_errors():  # also when run as `python -m lt_rebalance.extract`
        result = _run(opts, splits, device if env is None or device == "cpu" else f"cuda:{env.local_rank}", env, quiet)
    if env is None or env.rank == 0:
        emit(result, opts["as_json"], _human)


def _run(opts: dict, splits: tuple[str, ...], device: str, env: Any, quiet: bool) -> dict:
    import torch

    from .backbones import create_backbone
    from .checkpoints import linear_head, load_checkpoint
    from .datasets import DatasetOptions, load_dataset, reference_config, timm_config
    from .run import ExtractConfig, extract_features

    if not (opts["resume"] and os.path.isfile(opts["out"])):  # a requeued, finished run is recognised later
        check_output(opts["out"], opts["overwrite"], [opts["checkpoint"]])  # before loading data and model
    data = load_dataset(opts["data"], DatasetOptions(
        opts["root"], splits, opts["list_dir"], opts["imbalance"], opts["val_per_class"], opts["seed"]))
    for note in data.notes:
        log(f"warning: {note}", quiet)
    missing = data.missing_files()
    if missing:
        total = sum(map(len, missing.values()))
        first = [p for m in missing.values() for p in m][:10]
        if not opts["skip_bad"]:
            raise ValueError(f"{total} image file(s) missing under {opts['root']} (first 10: {first}); "
                             "pass --skip-bad to leave them out")
        log(f"warning: {total} image file(s) missing (first 10: {first}); --skip-bad leaves them out", quiet)
    num_classes = len(data.counts)
    torch.manual_seed(opts["seed"])  # --random-init weights are reproducible (and resumable)
    from .foundation import embedding_function, transform_kind

    projected = opts["embedding"] == "projected"  # keeps the model's own head: the projection
    model = create_backbone(opts["model"], num_classes=None if opts["pretrained"] or projected else num_classes,
                            pretrained=opts["pretrained"])
    features_fn, embedding_attrs = embedding_function(model, opts["embedding"], opts["l2_normalize"], opts["model"])
    sha, scales = "", None
    if opts["checkpoint"]:
        loaded = load_checkpoint(model, opts["checkpoint"])
        sha, scales = loaded.sha256, loaded.scales
    head = None if projected else linear_head(model, scales)  # a projection is no classifier
    if head is not None and head[0].shape[0] != num_classes:
        log(f"note: the model's classifier has {head[0].shape[0]} classes, the dataset {num_classes}; "
            "no /head stored", quiet)
        head = None
    kind = transform_kind(opts["transform_kind"], opts["model"], model)
    transform = (timm_config(model, data.family, opts["image_size"]) if kind == "timm"
                 else reference_config(data.family, opts["image_size"]))
    config = ExtractConfig(opts["batch_size"], opts["workers"], device, opts["dtype"], opts["train_views"],
                           opts["seed"], opts["resume"], opts["overwrite"], opts["skip_bad"], opts["autocast"])
    meta = {"model": opts["model"], "dataset": data.name, "checkpoint_sha256": sha,
            "weights": "checkpoint" if sha else ("pretrained" if opts["pretrained"] else "random-init"),
            **embedding_attrs, "preprocess": kind}
    if data.family == "cifar":
        meta["imbalance"] = opts["imbalance"]
    meta.update({f"shot_{k}": opts[f"shot_{k}"] for k in ("many", "few") if opts[f"shot_{k}"] is not None})
    total = sum(len(s) * (1 + (opts["train_views"] if name == "train" else 0)) for name, s in data.sources.items())
    if env is not None:
        total = total // env.world
    kwargs = dict(counts=data.counts, transform=transform, config=config, head=head, class_names=data.class_names,
                  meta=meta, features_fn=features_fn)
    with _progress(total, quiet) as bar:
        if env is None:
            result = extract_features(model, data.sources, opts["out"], progress=bar.update, **kwargs)
        else:
            from .distributed import extract_sharded

            result = extract_sharded(model, data.sources, opts["out"], env, progress=bar.update, **kwargs)
    return {"out": str(result.path), "rows": result.rows, "bad": result.bad, "images": result.images,
            "seconds": result.seconds, "images_per_second": result.images_per_second,
            "already_complete": result.already_complete}


def _progress(total: int, quiet: bool) -> Any:
    """click's bar on a terminal; periodic log lines (images, rate, ETA) when stderr is not one."""
    from .progress import LogProgress

    if quiet:
        return _NoBar()
    if sys.stderr.isatty():
        return click.progressbar(length=total, file=sys.stderr, label="extracting")
    return LogProgress(total, lambda line: click.echo(line, err=True))


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int) -> None:
        return None

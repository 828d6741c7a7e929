"""``ltr text-head``: class-name text embeddings of an open_clip text tower, stored in the feature file."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import click

from .errors import handle_user_errors
from .options import json_option
from .render import emit, log
from .setup import open_store


def _human(d: dict) -> str:
    return (f"{d['path']}: text head of {d['model']} ({d['pretrained']}) written: {d['num_classes']} classes x "
            f"{d['dim']}, {d['templates']} template(s), logit scale {d['logit_scale']:.4g}")


@click.command("text-head")
@click.option("--features", "features", required=True, type=click.Path(dir_okay=False),
              help="The feature file (image embeddings of the same model) that receives /text_head.")
@click.option("--model", "arch", required=True, help="open_clip architecture, e.g. ViT-B-16.")
@click.option("--pretrained", default=None,
              help="open_clip pretrained tag (e.g. openai; downloaded on first use) or a local checkpoint file.")
@click.option("--random-init", is_flag=True,
              help="Random text-tower weights, offline (tests and the worked example: mechanics only).")
@click.option("--classnames", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Class names, one a line in class-index order [default: the file's /classes/names].")
@click.option("--templates", default="imagenet", show_default=True,
              help="Prompt templates: 'imagenet' (CLIP's 80), 'photo' ('a photo of a {}.') or a file (one a line).")
@click.option("--force", is_flag=True, help="Write it even when the features come from another model.")
@click.option("--overwrite", is_flag=True, help="Replace a text head the file already has.")
@click.option("--device", default="cpu", show_default=True, help="Device of the text tower.")
@click.option("-q", "--quiet", is_flag=True)
@json_option
@handle_user_errors
def text_head(features: str, arch: str, pretrained: Optional[str], random_init: bool, classnames: Optional[str],
              templates: str, force: bool, overwrite: bool, device: str, quiet: bool, as_json: bool) -> None:
    """Encode prompts for every class with an open_clip text tower and store them as /text_head.

    Each class's embedding is the prompt ensemble: the mean of the L2-normalised embeddings of its
    prompts, normalised again. The zero_shot, zero_shot_debiased, gla and text_init methods use it.
    """
    from ..templates import load_templates
    from ..text_encode import encode_class_names, load_tower, model_mismatch, require_open_clip
    from ..text_store import TextHead, check_names, has_text_head, write_text_head

    require_open_clip()
    prompts = load_templates(templates)
    store = open_store(features, allow_incomplete=True)
    with store:
        if has_text_head(store) and not overwrite:
            raise click.ClickException(f"{features} already has a text head; pass --overwrite to replace it")
        if classnames is not None:
            names = Path(classnames).read_text(encoding="utf-8").splitlines()
            while names and not names[-1].strip():  # a trailing newline is no class
                names.pop()
            source = classnames
        elif store.class_names is not None:
            names, source = store.class_names, f"{features} (/classes/names)"
        else:
            raise click.ClickException(f"{features} stores no class names (/classes/names); pass --classnames FILE "
                                       "(one name a line, in class-index order)")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            names = check_names(names, store.num_classes, source)
        features_model, dim = str(store.attrs.get("model", "")), store.dim
    tower = load_tower(arch, pretrained, random_init, device)
    reason = model_mismatch(features_model, arch, tower.pretrained)
    if reason and not force:
        raise click.ClickException(reason)
    log(f"encoding {len(names)} classes x {len(prompts)} template(s) with {arch} ({tower.pretrained})", quiet or as_json)
    W = encode_class_names(tower, names, prompts)
    if W.shape[1] != dim:
        raise click.ClickException(f"the text tower of {arch} embeds in {W.shape[1]} dimensions but {features} holds "
                                   f"{dim}-d features: store the projected image embedding of the same model "
                                   "(ltr extract --embedding projected)")
    head = TextHead(W, tower.logit_scale, arch, tower.pretrained, prompts, names, tower.logit_bias,
                    features_model, bool(reason))
    write_text_head(features, head, overwrite=overwrite)
    emit({"path": features, "model": arch, "pretrained": tower.pretrained, "num_classes": W.shape[0],
          "dim": W.shape[1], "templates": len(prompts), "logit_scale": tower.logit_scale,
          "forced": bool(reason)}, as_json, _human)

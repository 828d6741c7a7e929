"""``ltr export``: the stage-1 checkpoint with its classifier replaced by a re-balanced head.

The written file is ``{"state_dict": ..., "arch", "timm_name", "model_kwargs", "num_classes",
"method", "params", "source_checkpoint_sha256"}``: ``timm.create_model(timm_name, num_classes=C,
**model_kwargs, checkpoint_path=out)`` loads it strictly (timm reads the ``state_dict`` key), and
so does ``ltr extract --checkpoint``.
"""
from __future__ import annotations

from typing import Any, Optional

import click

from .errors import handle_user_errors
from .options import json_option, quiet_option
from .render import emit, log
from .setup import check_writable, open_store


def head_as_linear(state: dict) -> tuple[Any, Any]:
    """(weight float32 (C, D), bias float32 (C,)) of a saved head (``lt_rebalance.head_io`` format).

    Linear heads (joint, cRT, folded LWS, τ-norm, logit adjustment) are taken as they are. An NCM
    with variant ``un`` scores -‖x − c_j‖² = 2 c_j·x − ‖c_j‖² − ‖x‖², whose last term is the same
    for every class: the linear layer (2 c_j, −‖c_j‖²) has the same argmax and the same softmax.
    The other NCM variants normalise the features first, which a linear classifier cannot express.
    """
    if "weight" in state:
        return state["weight"].float(), state["bias"].float()
    variant = state.get("variant")
    if variant == "un":
        c = state["centroids"].float()
        return 2 * c, -c.square().sum(1)
    raise ValueError(
        f"cannot export an NCM head with variant {variant!r}: it L2-normalises the "
        f"{'centred ' if variant in ('cl2n', 'cos') else ''}features before comparing them with the "
        "centroids, and a plain linear classifier on the backbone's features cannot do that; export an "
        "`ltr ncm --variant un` head (exactly linear), or a crt, lws or tau-norm head"
    )


def export_state_dict(model_name: str, checkpoint: str, weight: Any, bias: Any) -> tuple[dict, Any]:
    """The checkpoint's weights for ``model_name`` with ``weight`` (C, D) / ``bias`` (C,) as classifier.

    Returns (state dict that the model with C classes loads strictly, the model's BackboneSpec).
    The checkpoint's own classifier (any number of classes, LWS scales included) is dropped.
    """
    import torch

    from ..extract.backbones import create_backbone, resolve_backbone
    from ..extract.checkpoints import classifier_prefix, load_strict, read_checkpoint

    C, D = weight.shape
    model = create_backbone(model_name, num_classes=C)
    prefix = classifier_prefix(model)
    fc = model.get_classifier()
    if not isinstance(fc, torch.nn.Linear) or fc.in_features != D:
        raise ValueError(f"{model_name}'s classifier is {fc}, not a linear layer on {D}-d features like the head")
    sd, _ = read_checkpoint(checkpoint, prefix)
    sd = {k: v for k, v in sd.items() if not k.startswith(prefix + ".")}
    sd[f"{prefix}.weight"], sd[f"{prefix}.bias"] = weight.contiguous(), bias.contiguous()
    load_strict(model, sd, checkpoint)
    return model.state_dict(), resolve_backbone(model_name)


@click.command()
@click.option("--head", "head_path", required=True, type=click.Path(dir_okay=False),
              help="Head file written by `ltr crt|lws|ncm --save`.")
@click.option("--features", "-f", required=True, type=click.Path(dir_okay=False),
              help="The feature file the head was fitted on (its model name and checkpoint hash are checked).")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="The stage-1 checkpoint the features were extracted with (state dict or reference format).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .pth file.")
@click.option("--model", "model_name", default=None,
              help="Backbone alias or timm name (default: the feature file's `model` attribute).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@json_option
@quiet_option
@handle_user_errors
def export(head_path: str, features: str, checkpoint: str, out: str, model_name: Optional[str], overwrite: bool,
           as_json: bool, quiet: bool):
    """Write a timm checkpoint whose classifier is the re-balanced head (loads strictly in timm)."""
    from ..extract.checkpoints import file_sha256
    from ..head_io import check_head_fits, load_head, save_head

    check_writable(out, overwrite, [head_path, features, checkpoint])  # fail early
    state = load_head(head_path)
    store = open_store(features)
    check_head_fits(state, head_path, store)
    model_name = model_name or store.attrs.get("model") or None
    if not model_name:
        raise click.ClickException(f"{features} does not name its model; pass --model (an alias or a timm name)")
    sha = file_sha256(checkpoint)
    expected = store.attrs.get("checkpoint_sha256")
    if expected and sha != expected:
        raise click.ClickException(
            f"{checkpoint} (sha256 {sha[:12]}...) is not the checkpoint {features} was extracted with "
            f"({expected[:12]}...); the head would sit on a different backbone"
        )
    weight, bias = head_as_linear(state)
    sd, spec = export_state_dict(model_name, checkpoint, weight, bias)
    ckpt = {
        "state_dict": sd,
        "arch": model_name,
        "timm_name": spec.timm_name,
        "model_kwargs": dict(spec.model_kwargs),
        "num_classes": store.num_classes,
        "method": state["method"],
        "params": state.get("params", {}),
        "source_checkpoint_sha256": sha,
    }
    save_head(out, ckpt, overwrite)
    kwargs = "".join(f", {k}={v!r}" for k, v in spec.model_kwargs.items())
    load_with = f"timm.create_model({spec.timm_name!r}, num_classes={store.num_classes}{kwargs}, checkpoint_path={out!r})"
    result = {
        "out": out, "method": state["method"], "arch": model_name, "timm_name": spec.timm_name,
        "model_kwargs": dict(spec.model_kwargs), "num_classes": store.num_classes,
        "load_with": load_with,
        "load_snippet": load_snippet(spec.timm_name, load_with),
    }
    log(f"exported the {state['method']} head into {model_name}", quiet)
    emit(result, as_json, lambda r: f"wrote {r['out']}; load it in Python with\n\n{r['load_snippet']}")


def load_snippet(timm_name: str, load_with: str) -> str:
    """Python lines that load the exported model in a fresh interpreter.

    A model that timm does not ship (the demo's ``ltr_tiny_cnn``) exists in timm's registry only
    once the module that registers it is imported: the snippet imports that module first.
    """
    import timm

    module = timm.models.model_entrypoint(timm_name.split(".")[0]).__module__
    lines = ["import timm"]
    if module.split(".")[0] != "timm":
        lines.append(f"import {module}  # registers {timm_name} with timm")
    lines.append(f"model = {load_with}.eval()")
    return "\n".join(lines)

"""Prompt templates for text heads (``ltr text-head --templates``): named sets shipped here, or a file.

A template holds ``{}`` where the class name goes. ``imagenet``: the 80 templates of CLIP's ImageNet
zero-shot evaluation (the prompt ensemble); ``photo``: the single template "a photo of a {}.".
"""
from __future__ import annotations

from pathlib import Path

# the 80 prompt templates of CLIP's ImageNet zero-shot evaluation (Radford et al., 2021)
IMAGENET_TEMPLATES: tuple[str, ...] = (
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
)
PHOTO_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"imagenet": IMAGENET_TEMPLATES, "photo": PHOTO_TEMPLATES}
DEFAULT_TEMPLATES = "imagenet"


def load_templates(name_or_file: str) -> list[str]:
    """The templates of a named set (:data:`TEMPLATE_SETS`) or of a text file (one template a line,
    blank lines ignored); ValueError when a template has no ``{}`` or the name is neither."""
    if name_or_file in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[name_or_file])
    path = Path(name_or_file)
    if not path.is_file():
        raise ValueError(f"--templates {name_or_file!r} is neither a template set "
                         f"({', '.join(TEMPLATE_SETS)}) nor a file")
    templates = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not templates:
        raise ValueError(f"template file {path} holds no template (one a line, each with {{}} for the class name)")
    for i, t in enumerate(templates):
        if t.count("{}") != 1:
            raise ValueError(f"template file {path}, template {i + 1} ({t!r}) must hold exactly one {{}} "
                             "where the class name goes")
    return templates

"""Prompt templates and label parsing for zero-shot classification and segmentation.

A class embedding is the average of the L2-normalized text embeddings of `template.format(name)` over a
template ensemble (CLIP, section 3.1.4). Three ensembles are named here: "openai" (the 80 ImageNet prompts
of OpenAI's CLIP), "simple" (its 7-prompt short list), "synth" and "synth-colour" (prompts in the style of the
captions `cosmos synth` writes); any other string containing "{}" is a single custom template.
"""
from __future__ import annotations

from ..errors import CosmosError

OPENAI_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SIMPLE_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# `cosmos synth` captions read like "A picture of a red circle", "There is a small red circle in the center",
# "red circle icon": prompts in that style score better than "a photo of a {}." (SYNTH_PROTOTYPE.md, finding 5).
# "synth" suits object names (shapes), "synth-colour" colour names.
SYNTH_TEMPLATES: tuple[str, ...] = ("a picture of a {}", "there is a {}", "a {}")
SYNTH_COLOUR_TEMPLATES: tuple[str, ...] = ("a picture of a {} shape", "there is a {} object", "a {} shape")

NAMED_TEMPLATES: dict[str, tuple[str, ...]] = {
    "openai": OPENAI_TEMPLATES,
    "simple": SIMPLE_TEMPLATES,
    "synth": SYNTH_TEMPLATES,
    "synth-colour": SYNTH_COLOUR_TEMPLATES,
}


def resolve_templates(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """"openai" | "simple" | "synth" | "synth-colour" | a custom template containing "{}" (or a list of them) -> templates."""
    if isinstance(spec, (list, tuple)):
        templates = list(spec)
    elif spec.strip().lower() in NAMED_TEMPLATES:
        return list(NAMED_TEMPLATES[spec.strip().lower()])
    else:
        templates = [spec]
    if not templates:
        raise CosmosError("no prompt templates given; use openai, simple, synth or a template like 'a photo of a {}.'")
    for template in templates:
        if "{}" not in template:
            raise CosmosError(
                f"template {template!r} has no '{{}}' placeholder for the class name; use openai, simple, synth "
                f"or a template like 'a photo of a {{}}.'"
            )
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError) as e:
            raise CosmosError(f"template {template!r} is not a valid format string ({e}); use a single '{{}}'") from None
    return templates


def parse_labels(text: str, where: str = "--labels") -> list[list[str]]:
    """"cat,dog;puppy" -> [["cat"], ["dog", "puppy"]]: classes separated by commas, synonyms by semicolons.

    Blank entries are dropped; an empty result is an error naming `where`.
    """
    classes = [parse_class_names(part) for part in text.split(",")]
    classes = [names for names in classes if names]
    if not classes:
        raise CosmosError(f"{where}: no class names in {text!r}; give a comma-separated list like 'cat,dog'")
    return classes


def parse_class_names(line: str) -> list[str]:
    """One class: "dog;puppy" -> ["dog", "puppy"] (stripped, blanks dropped)."""
    return [name.strip() for name in line.split(";") if name.strip()]


def read_classnames(path, expected: int | None = None) -> list[list[str]]:
    """A class-name file: one class per line (line i = class index i), synonyms separated by ';'.

    Blank lines at the end are ignored; a blank line in the middle is an error (it would shift every index).
    """
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise CosmosError(f"{path}: class-name file not found; give one class name per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise CosmosError(f"{path}: not a UTF-8 text file; give one class name per line") from None
    while lines and not lines[-1].strip():
        lines.pop()
    classes = []
    for number, line in enumerate(lines, 1):
        names = parse_class_names(line)
        if not names:
            raise CosmosError(f"{path}:{number}: empty class name; every line up to the last must name a class")
        classes.append(names)
    if not classes:
        raise CosmosError(f"{path}: no class names; give one class name per line")
    if expected is not None and len(classes) != expected:
        raise CosmosError(f"{path}: {len(classes)} class names for {expected} classes; give exactly one line per class")
    return classes

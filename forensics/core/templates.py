"""Prompt templates for zero-shot classification: a short default set and OpenAI's 80 ImageNet templates."""

from __future__ import annotations

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as _OPENAI

SHORT_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "clip art of a {}.",
]
OPENAI_TEMPLATES: list[str] = [template("{}") for template in _OPENAI]
TEMPLATE_SETS: dict[str, list[str]] = {"short": SHORT_TEMPLATES, "openai": OPENAI_TEMPLATES}


def fill(template: str, class_name: str) -> str:
    """A template filled with a class name, with 'a'/'an' fixed for vowels ("a photo of an apple.")."""
    text = template.format(class_name)
    if class_name[:1].lower() in "aeiou":
        text = text.replace(f" a {class_name}", f" an {class_name}")
        if text.startswith(f"a {class_name}"):
            text = "an" + text[1:]
    return text


def resolve_templates(spec: str | list[str] | None) -> list[str]:
    """Templates from a set name ('short', 'openai') or an explicit list; each must contain '{}'."""
    if spec is None:
        return SHORT_TEMPLATES
    if isinstance(spec, str):
        if spec not in TEMPLATE_SETS:
            from forensics.core.errors import ForensicsError

            raise ForensicsError(f"unknown template set {spec!r}; choose {', '.join(TEMPLATE_SETS)}")
        return TEMPLATE_SETS[spec]
    bad = [t for t in spec if "{}" not in t]
    if bad or not spec:
        from forensics.core.errors import ForensicsError

        raise ForensicsError(
            f"every template needs a '{{}}' for the class name (bad: {bad[:3]})" if bad else "no templates given"
        )
    return list(spec)

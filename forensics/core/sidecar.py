"""The JSON sidecar saved beside a checkpoint (model config, tokenizer, planted backdoor, learnt prompts), read as
untrusted input: every field the loader uses is checked for presence, type and size before anything is built,
and a bad one is named in one line."""

from __future__ import annotations

import json
import math
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from forensics.core.errors import ForensicsError, exception_line

SIDECAR_FORMAT = "clip-forensics/1"
PROMPT_CONTEXT_KEY = "prompt_learner.context"  # learnt prompt context vectors, saved beside the CLIP's own tensors

_SIDECAR_MAX_BYTES = 64 << 20  # the project's sidecars are a few kB to a few MB (vocabulary, training history)
_SIDECAR_KEYS = ("format", "arch", "model_cfg", "tokenizer")  # a JSON holding none of these is no sidecar of ours
_MAX_LAYERS = 256  # per tower (or ResNet stage): ViT-e-14 has 56; more only slows the build down to a crawl
_MAX_IMAGE_SIZE = 4096  # pixels a side: CLIPs take 224-448
_MAX_CONTEXT_LENGTH = 4096  # tokens: CLIPs take 77
_BPE_VOCAB_SIZE = 49408  # open_clip's tokenizer emits ids up to 49407
# top-level model_cfg keys build_clip passes on to CLIP(...) with their types; the others it drops
_MODEL_CFG_SETTINGS: dict[str, Any] = {
    "embed_dim": int,
    "vision_cfg": dict,
    "text_cfg": dict,
    "custom_text": bool,
    "init_logit_scale": float,
    "init_logit_bias": typing.Optional[float],
    "nonscalar_logit_scale": bool,
    "output_dict": bool,
}
_MODEL_CFG_IGNORED = {"description", "tokenizer", "preprocess_cfg", "quick_gelu"}
_TOWER_SETTINGS = {
    "vision_cfg": {f.name: f.type for f in fields(CLIPVisionCfg)},
    "text_cfg": {f.name: f.type for f in fields(CLIPTextCfg)},
}
_TOWER_DEFAULTS = {
    "vision_cfg": {f.name: f.default for f in fields(CLIPVisionCfg) if f.default is not MISSING},
    "text_cfg": {f.name: f.default for f in fields(CLIPTextCfg) if f.default is not MISSING},
}
_TOWER_SIZES = ("width", "layers", "heads", "head_width", "patch_size", "image_size", "context_length", "vocab_size")


def _describe(value: Any) -> str:
    """A JSON value in a few words, for messages: the string 'abc', the number 3, a list of 2, an object, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = repr(value)
        return f"the number {text if len(text) <= 24 else text[:21] + '...'}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a JSON value fits an open_clip config annotation (int, float, bool, str, dict, Optional, Union, Tuple);
    null always fits (open_clip reads it as "unset"; where it cannot be, the build check names the config)."""
    if value is None or annotation is Any:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return any(_fits(value, a) for a in args if a is not type(None))
    if origin is tuple:
        items = [a for a in args if a is not Ellipsis]
        if Ellipsis in args:
            return isinstance(value, list) and all(_fits(v, items[0]) for v in value)
        return isinstance(value, list) and len(value) == len(items) and all(_fits(v, a) for v, a in zip(value, items))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return _is_int(value)
    if annotation is float:
        return _is_number(value)
    if annotation is str:
        return isinstance(value, str)
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    if annotation is list or origin is list:
        return isinstance(value, list)
    return True  # a type JSON cannot hold: left to the build check


def _type_words(annotation: Any) -> str:
    """An open_clip config annotation in words: "an integer", "a list of 4 integers or an integer", ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return " or ".join(_type_words(a) for a in args if a is not type(None))
    if origin is tuple:
        items = [a for a in args if a is not Ellipsis]
        what = {int: "integers", float: "numbers", str: "strings"}.get(items[0] if items else None, "values")
        return f"a list of {what}" if Ellipsis in args or not items else f"a list of {len(items)} {what}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object"}.get(
        annotation if origin is None else origin, "a valid value"
    )


class _Sidecar:
    """Checks one sidecar's fields, raising a one-line ForensicsError that names the first bad field."""

    def __init__(self, name: str) -> None:
        self.name = name

    def error(self, key: str, problem: str) -> ForensicsError:
        return ForensicsError(f"sidecar {self.name}: field {key!r} {problem}")

    def need(self, ok: bool, key: str, expected: str, value: Any) -> None:
        if not ok:
            raise self.error(key, f"must be {expected}, not {_describe(value)}")

    def get(self, data: dict, key: str, prefix: str = "", required: bool = False) -> Any:
        if required and key not in data:
            raise self.error(prefix + key, "is missing")
        return data.get(key)

    def check(self, data: Any) -> dict:
        """The sidecar itself, every field the loader reads checked for presence, type and consistency."""
        fmt = self.get(data, "format", required=True)
        if fmt != SIDECAR_FORMAT:
            raise self.error(
                "format",
                f"is {_describe(fmt)}, not {SIDECAR_FORMAT!r} (a sidecar this tool wrote); "
                "move the JSON away to load the checkpoint without it",
            )
        arch = self.get(data, "arch", required=True)
        self.need(isinstance(arch, str) and bool(arch.strip()), "arch", "a non-empty string", arch)
        self.need(len(arch) <= 200 and arch.isprintable(), "arch", "an architecture name on one line", arch)
        if "quick_gelu" in data:
            self.need(isinstance(data["quick_gelu"], bool), "quick_gelu", "true or false", data["quick_gelu"])
        cfg = self.get(data, "model_cfg", required=True)
        self.need(isinstance(cfg, dict), "model_cfg", "an object (the open_clip model config)", cfg)
        self.model_cfg(cfg)
        self.tokenizer(self.get(data, "tokenizer", required=True), cfg["text_cfg"])
        self.preprocess(data.get("preprocess"))
        self.backdoor(data.get("backdoor"))
        self.class_prompts(data.get("class_prompts"))
        return data

    def model_cfg(self, cfg: dict) -> None:
        for key in ("embed_dim", "vision_cfg", "text_cfg"):
            self.get(cfg, key, "model_cfg.", required=True)
        embed_dim = cfg["embed_dim"]
        self.need(_is_int(embed_dim) and embed_dim >= 1, "model_cfg.embed_dim", "a positive integer", embed_dim)
        for key, value in cfg.items():
            if key in _MODEL_CFG_IGNORED or key == "embed_dim":
                continue
            if key not in _MODEL_CFG_SETTINGS:
                raise self.error(f"model_cfg.{key}", "is no setting of the CLIPs this tool builds")
            annotation = _MODEL_CFG_SETTINGS[key]
            ok = isinstance(value, dict) if annotation is dict else _fits(value, annotation)
            self.need(ok, f"model_cfg.{key}", _type_words(annotation), value)
        for tower in ("vision_cfg", "text_cfg"):
            self.tower(cfg[tower], tower)

    def tower(self, cfg: dict, tower: str) -> None:
        settings = _TOWER_SETTINGS[tower]
        for key, value in cfg.items():
            where = f"model_cfg.{tower}.{key}"
            if key not in settings:
                raise self.error(where, f"is no setting of open_clip's {tower}")
            self.need(_fits(value, settings[key]), where, _type_words(settings[key]), value)
            if key not in _TOWER_SIZES or (value is None and key == "patch_size"):
                continue  # ResNet towers have no patches
            sizes = value if isinstance(value, list) else [value]
            self.need(all(_is_int(v) and v >= 1 for v in sizes), where, "a positive integer", value)
            limit = {"layers": _MAX_LAYERS, "image_size": _MAX_IMAGE_SIZE, "context_length": _MAX_CONTEXT_LENGTH}
            if key in limit and max(sizes) > limit[key]:
                raise self.error(where, f"is {_describe(value)}; no CLIP this tool can load has more than {limit[key]}")

    def tokenizer(self, spec: Any, text_cfg: dict) -> None:
        self.need(isinstance(spec, dict), "tokenizer", "an object (the tokenizer spec)", spec)
        kind = spec.get("kind", "open_clip")
        self.need(kind in ("word", "open_clip"), "tokenizer.kind", "'word' or 'open_clip'", kind)
        model_length = text_cfg.get("context_length", _TOWER_DEFAULTS["text_cfg"]["context_length"])
        vocab_size = text_cfg.get("vocab_size", _TOWER_DEFAULTS["text_cfg"]["vocab_size"])
        length = spec.get("context_length", 32 if kind == "word" else 77)
        self.need(_is_int(length) and length >= 2, "tokenizer.context_length", "an integer of at least 2", length)
        if length != model_length:
            raise self.error(
                "tokenizer.context_length",
                f"is {length}, but the text tower (model_cfg.text_cfg.context_length) takes {model_length} tokens",
            )
        if kind == "word":
            words = self.get(spec, "words", "tokenizer.", required=True)
            ok = isinstance(words, list) and all(isinstance(w, str) for w in words)
            self.need(ok, "tokenizer.words", "a list of strings (the vocabulary)", words)
            if len(words) + 4 > vocab_size:
                raise self.error(
                    "tokenizer.words",
                    f"holds {len(words)} words, which with 4 special tokens do not fit the text tower's "
                    f"{vocab_size}-token vocabulary (model_cfg.text_cfg.vocab_size)",
                )
        elif vocab_size < _BPE_VOCAB_SIZE:
            raise self.error(
                "tokenizer.kind",
                f"is open_clip's BPE ({_BPE_VOCAB_SIZE} tokens), but the text tower has a {vocab_size}-token "
                "vocabulary (model_cfg.text_cfg.vocab_size)",
            )

    def preprocess(self, pre: Any) -> None:
        if pre is None:
            return
        self.need(isinstance(pre, dict), "preprocess", "an object with 'mean' and 'std'", pre)
        for key in ("mean", "std"):
            if key in pre:
                value = pre[key]
                ok = isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)
                ok = ok and (key == "mean" or all(v > 0 for v in value))
                what = "a list of 3 numbers" if key == "mean" else "a list of 3 positive numbers"
                self.need(ok, f"preprocess.{key}", what, value)

    def backdoor(self, planted: Any) -> None:
        if planted is None:
            return
        self.need(isinstance(planted, dict), "backdoor", "an object (the planted backdoor) or null", planted)
        for key in ("attack", "target"):
            if planted.get(key) is not None:
                self.need(isinstance(planted[key], str), f"backdoor.{key}", "a string", planted[key])
        trigger = planted.get("trigger")
        if trigger is not None:
            ok = isinstance(trigger, dict) and isinstance(trigger.get("attack"), str)
            self.need(ok, "backdoor.trigger", "an object naming its 'attack'", trigger)

    def class_prompts(self, spec: Any) -> None:
        if spec is None:
            return
        self.need(isinstance(spec, dict), "class_prompts", "an object (the learnt prompts' classes) or null", spec)
        names = self.get(spec, "class_names", "class_prompts.", required=True)
        ok = isinstance(names, list) and bool(names) and all(isinstance(n, str) for n in names)
        self.need(ok, "class_prompts.class_names", "a non-empty list of strings", names)
        template = self.get(spec, "template", "class_prompts.", required=True)
        self.need(
            isinstance(template, str) and "{}" in template, "class_prompts.template", "a string with {}", template
        )
        if "key" in spec:
            self.need(spec["key"] == PROMPT_CONTEXT_KEY, "class_prompts.key", repr(PROMPT_CONTEXT_KEY), spec["key"])


def read_sidecar(path: Path) -> dict | None:
    """The JSON sidecar the project writes beside its ``.safetensors`` outputs, if there is one, checked field by
    field: a sidecar is as untrusted as its checkpoint, so a bad one is refused in one line naming the field.

    A JSON beside the file that holds none of a sidecar's keys is someone else's file and is ignored.
    """
    side = path.with_suffix(".json")
    if not side.is_file():
        return None
    try:
        if side.stat().st_size > _SIDECAR_MAX_BYTES:
            raise ForensicsError(
                f"sidecar {side.name} is {side.stat().st_size:,} bytes, more than any sidecar this tool writes"
            )
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ForensicsError(f"sidecar {side.name} is not valid JSON: {exception_line(exc)}") from None
    if not isinstance(data, dict) or not any(key in data for key in _SIDECAR_KEYS):
        return None
    return _Sidecar(side.name).check(data)

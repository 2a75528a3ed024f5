"""One call per user action, shared by the CLI and the Gradio UI (which hold no logic of their own)."""
from __future__ import annotations

import time
from typing import Any, Callable

from forensics.attacks import Attack, attack_from_dict
from forensics.core.data import demo_backdoor, load_probe_set
from forensics.core.errors import ForensicsError
from forensics.core.models import SuspectModel, load_model
from forensics.core.templates import resolve_templates
from forensics.core.zeroshot import evaluate

Progress = Callable[[float, str], None]
DEMO_MODELS = ("demo", "demo-clean")


def model_facts(model: str | SuspectModel, arch: str | None = None, quick_gelu: bool | None = None) -> dict:
    """The model's facts plus its planted backdoor when known (the demo reveals it, for teaching)."""
    spec = model if isinstance(model, str) else None
    loaded = get_model(model, arch, quick_gelu) if isinstance(model, str) else model  # cached: the UI asks again
    out = loaded.facts.to_dict()
    out["backdoor"] = loaded.backdoor
    if spec == "demo" and out["backdoor"] is None:
        out["backdoor"] = demo_backdoor()
    return out


def default_trigger(model_spec: str) -> tuple[Attack | None, str | None]:
    """On either demo model, the poisoned demo's planted trigger and target (so the clean twin shows it does not respond)."""
    if model_spec in DEMO_MODELS:
        planted = demo_backdoor()
        if planted:
            return attack_from_dict(planted["trigger"]), planted["target"]
    return None, None


def evaluate_model(model: str | SuspectModel, probe: str | None = None, attack: Attack | None = None,
                   target: str | None = None, templates: str | list[str] = "short", class_names: list[str] | None = None,
                   batch_size: int = 64, seed: int = 0, arch: str | None = None, quick_gelu: bool | None = None,
                   device: str = "cpu", progress: Progress | None = None) -> dict[str, Any]:
    """CA on the probe set's clean labelled images and ASR of ``attack`` (default: the demo's trigger on demo models)."""
    start = time.time()
    resolve_templates(templates)  # a bad template set fails before any loading
    spec = model if isinstance(model, str) else None
    probe = probe or ("demo" if spec in DEMO_MODELS else None)
    if probe is None:
        raise ForensicsError("a probe set is required for models other than demo and demo-clean")
    probe_set = load_probe_set(probe, class_names)
    loaded = load_model(model, arch=arch, quick_gelu=quick_gelu, device=device) if spec is not None else model
    origin = "given" if attack is not None else "none"
    if attack is None and target is None and spec is not None:
        attack, target = default_trigger(spec)
        origin = "the demo's planted trigger" if attack is not None else "none"
    if attack is not None and not target:
        raise ForensicsError("a target label is required with an attack")
    indices = probe_set.clean_indices()
    if not indices:
        raise ForensicsError(f"probe set {probe_set.name} has no clean labelled images to measure CA on")
    load_part = (lambda f, m: progress(0.3 * f, m)) if progress else None
    eval_part = (lambda f, m: progress(0.3 + 0.7 * f, m)) if progress else None
    images = probe_set.load_images(loaded.image_size, indices, load_part)
    labels = [probe_set.items[i].label for i in indices]
    result = evaluate(loaded, images, labels, probe_set.class_names, attack, target, templates=templates,
                      batch_size=batch_size, seed=seed, progress=eval_part)
    result.update(model=spec or loaded.facts.source, architecture=loaded.facts.architecture, sha256=loaded.facts.sha256,
                  probe=probe_set.name, templates=templates if isinstance(templates, str) else "custom",
                  trigger_source=origin, seed=seed, seconds=round(time.time() - start, 2))
    n_trig = len(probe_set.triggered_indices())
    if n_trig:
        result["note"] += f"; the probe set's {n_trig} images that already carry a trigger are left out of CA"
    return result


_MODEL_CACHE: dict[tuple, SuspectModel] = {}
_MODEL_CACHE_SIZE = 3


def get_model(spec: str, arch: str | None = None, quick_gelu: bool | None = None) -> SuspectModel:
    """A private copy of a loaded model, from a small cache keyed by spec and file modification time.

    Interactive views (explain one image, paste a trigger) call this on every click; a copy keeps
    concurrent sessions from sharing one module's gradient state.
    """
    import copy
    from pathlib import Path

    path = Path(spec)
    stamp = path.stat().st_mtime_ns if path.is_file() else None
    key = (spec, arch, quick_gelu, stamp)
    if key not in _MODEL_CACHE:
        loaded = load_model(spec, arch=arch, quick_gelu=quick_gelu)
        while len(_MODEL_CACHE) >= _MODEL_CACHE_SIZE:
            _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
        _MODEL_CACHE[key] = loaded
    return copy.deepcopy(_MODEL_CACHE[key])


def defense_defaults(method: str) -> dict[str, Any]:
    """A repair method's settings with their default values (the UI shows and overrides these)."""
    from dataclasses import asdict, is_dataclass

    from forensics.defenses import build_defense

    settings = getattr(build_defense(method), "settings", None)
    return asdict(settings) if is_dataclass(settings) else {}

"""Evaluate a model and describe it: CA/ASR on a probe set, the model's facts, and the one CA/ASR measure that
repair and compare score before and after with. Shared by the CLI and the UI (which hold no logic of their own)."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from forensics.attacks import Attack, attack_from_dict
from forensics.core.data import demo_backdoor, load_probe_set
from forensics.core.distributed import world_size
from forensics.core.errors import ForensicsError
from forensics.core.models import ModelRef, SuspectModel, as_ref
from forensics.core.progress import Progress, sub_progress
from forensics.core.templates import resolve_templates
from forensics.core.zeroshot import evaluate
from forensics.defenses import DEFENSES


def model_facts(model: str | ModelRef | SuspectModel) -> dict:
    """The model's facts plus its planted backdoor when known (the demo reveals it, for teaching)."""
    ref = None if isinstance(model, SuspectModel) else as_ref(model)
    loaded = get_model(ref) if ref else model  # cached: the UI asks again
    out = loaded.facts.to_dict()
    out["backdoor"] = loaded.backdoor
    if ref is not None and ref.spec == "demo" and out["backdoor"] is None:
        out["backdoor"] = demo_backdoor()
    return out


def default_trigger(model_spec: str | ModelRef | None) -> tuple[Attack | None, str | None]:
    """On either demo model, the poisoned demo's planted trigger and target.

    So the clean twin shows it does not respond.
    """
    if model_spec is not None and as_ref(model_spec).is_demo:
        planted = demo_backdoor()
        if planted:
            return attack_from_dict(planted["trigger"]), planted["target"]
    return None, None


def known_trigger(model: SuspectModel, ref: ModelRef | None, class_names: list[str]) -> tuple[Attack, str] | None:
    """The model's planted backdoor (its sidecar's, or the demo's) as (attack, target).

    Only when its target is a probe class.
    """
    planted = model.backdoor or (demo_backdoor() if ref is not None and ref.is_demo else None)
    if planted and planted.get("trigger") and planted.get("target") in class_names:
        return attack_from_dict(planted["trigger"]), planted["target"]
    return None


def measure(
    model: SuspectModel,
    images: torch.Tensor,
    labels: list[int],
    class_names: list[str],
    triggers: Sequence[tuple[str, Attack, str]] = (),
    distributed: bool = False,
) -> dict[str, Any]:
    """CA on clean labelled images and, per trigger ``(key, attack, target)``, ASR on the non-target ones:
    ``{"ca": float, "asr": {key: float}}``. Repair and compare score before and after with this one function.
    ``distributed``: every process calls it and each scores its share of the images (see ``zeroshot.evaluate``)."""
    out: dict[str, Any] = {"ca": evaluate(model, images, labels, class_names, distributed=distributed)["ca"], "asr": {}}
    for key, attack, target in triggers:
        out["asr"][key] = evaluate(model, images, labels, class_names, attack, target, distributed=distributed)["asr"]
    return out


def evaluate_model(
    model: str | ModelRef | SuspectModel,
    probe: str | None = None,
    attack: Attack | None = None,
    target: str | None = None,
    templates: str | list[str] = "short",
    class_names: list[str] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: Progress | None = None,
    distributed: bool = True,
) -> dict[str, Any]:
    """CA on the probe set's clean labelled images and ASR of ``attack``.

    ``attack`` defaults to the demo's trigger on demo models. Under a launcher (``torchrun``, ``accelerate launch``)
    with ``distributed``, every process calls this and scores its share of the images; all get the whole result.
    """
    start = time.time()
    resolve_templates(templates)  # a bad template set fails before any loading
    ref = None if isinstance(model, SuspectModel) else as_ref(model)
    probe = probe or (ref.default_probe() if ref else None)
    if probe is None:
        raise ForensicsError("a probe set is required for models other than demo and demo-clean")
    probe_set = load_probe_set(probe, class_names)
    loaded = ref.load() if ref else model
    origin = "given" if attack is not None else "none"
    if attack is None and target is None and ref is not None:
        attack, target = default_trigger(ref)
        origin = "the demo's planted trigger" if attack is not None else "none"
    if attack is not None and not target:
        raise ForensicsError("a target label is required with an attack")
    indices = probe_set.clean_indices()
    if not indices:
        raise ForensicsError(f"probe set {probe_set.name} has no clean labelled images to measure CA on")
    images = probe_set.load_images(loaded.image_size, indices, sub_progress(progress, 0.0, 0.3))
    labels = [probe_set.items[i].label for i in indices]
    result = evaluate(
        loaded,
        images,
        labels,
        probe_set.class_names,
        attack,
        target,
        templates=templates,
        batch_size=batch_size,
        seed=seed,
        progress=sub_progress(progress, 0.3, 1.0),
        distributed=distributed,
    )
    result.update(
        model=ref.spec if ref else loaded.facts.source,
        architecture=loaded.facts.architecture,
        sha256=loaded.facts.sha256,
        probe=probe_set.name,
        templates=templates if isinstance(templates, str) else "custom",
        trigger_source=origin,
        seed=seed,
        seconds=round(time.time() - start, 2),
    )
    if distributed and world_size() > 1:
        result["processes"] = world_size()
    n_trig = len(probe_set.triggered_indices())
    if n_trig:
        result["note"] += f"; the probe set's {n_trig} images that already carry a trigger are left out of CA"
    return result


_MODEL_CACHE: dict[tuple, SuspectModel] = {}
_MODEL_CACHE_SIZE = 3


def get_model(model: str | ModelRef) -> SuspectModel:
    """A private copy of a loaded model, from a small cache keyed by the reference and file modification time.

    Interactive views (explain one image, paste a trigger) call this on every click; a copy keeps
    concurrent sessions from sharing one module's gradient state.
    """
    ref = as_ref(model)
    path = Path(ref.spec)
    stamp = path.stat().st_mtime_ns if path.is_file() else None
    key = (ref, stamp)
    if key not in _MODEL_CACHE:
        loaded = ref.load()
        while len(_MODEL_CACHE) >= _MODEL_CACHE_SIZE:
            _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
        _MODEL_CACHE[key] = loaded
    return copy.deepcopy(_MODEL_CACHE[key])


def defense_defaults(method: str) -> dict[str, Any]:
    """A repair method's settings with their default values (the UI shows and overrides these)."""
    return asdict(DEFENSES.get(method).settings_cls())

"""Rebuild the demo lab from scratch, deterministically by seed.

Steps: composite clip art into a training set and a held-out probe set (objects never seen in
training), optionally plus generic captioned clip art of no demo class, build a small word vocabulary,
then train two tiny CLIPs from scratch the same way (same vocabulary, recipe and seed): one on data
poisoned with the attack lab's BadNet (the demo model), one on clean data (its clean twin). Both are
evaluated on the probe set and saved with sidecars.

Two labs: ``v1`` (the bundled one) takes openclipart objects by filename pattern and splits them by
``holdout_share``; ``v2`` takes classes, objects and their held-out split from the reviewed catalogue
``forensics/demo/objects_v2.tsv`` (openclipart, Noto Color Emoji, EmojiOne). Everything after the
objects (compositing, poisoning, training) is the same for both.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from forensics.core.errors import ForensicsError
from forensics.core.models import ASSETS_DIR, atomic_write_text
from forensics.demo.clipart import CLIPART_ROOT, GENERIC, ClipArtObject, collect_objects
from forensics.demo.compose import compose
from forensics.demo.sources import load_object

Progress = Callable[[float, str], None]
DEMO_DIR = ASSETS_DIR / "demo"


@dataclass
class DemoSpec:
    """Everything that decides the demo lab; the same spec and seed give the same lab."""

    seed: int = 0
    image_size: int = 128
    train_per_class: int = 500
    generic_images: int = 0  # captioned clip art of no demo class, for pretraining (measured: did not help CA)
    probe_per_class: int = 30
    probe_triggered_share: float = 0.15
    holdout_share: float = 0.25
    target: str = "flower"
    poison_rate: float = 0.1
    attack: dict = field(
        default_factory=lambda: {
            "attack": "badnet",
            "pattern": "checkerboard",
            "size": 0.1,
            "cells": 4,
            "position": "random",
            "seed": 0,
        }
    )
    arch: str = "tiny-rn"
    epochs: int = 14
    batch_size: int = 64
    lr: float = 2e-3
    augment: bool = False  # random training views (forensics.training.clip.view_augmenter); the shipped demo has none
    # "v1": openclipart classes by filename pattern (CLASS_SOURCES) split by holdout_share, the bundled lab;
    # "v2": the reviewed catalogue forensics/demo/objects_v2.tsv (classes, objects and split; three sources)
    lab: str = "v1"
    # "rich": the rendered captions (class, colour, size, position, background words);
    # "class": each caption replaced by a zero-shot template naming only the class the pair names
    captions: str = "rich"

    def record(self) -> dict:
        """The spec as stored in manifests and sidecars; ``lab`` only when not v1, so v1 records stay as they were."""
        return {k: v for k, v in self.__dict__.items() if k != "lab" or v != "v1"}


def _split_objects(objects: dict, spec: DemoSpec) -> tuple[dict, dict]:
    rng = np.random.default_rng(spec.seed)
    train, probe = {}, {}
    for label, objs in objects.items():
        order = rng.permutation(len(objs))
        n_hold = max(2, round(spec.holdout_share * len(objs)))
        probe[label] = [objs[i] for i in order[:n_hold]]
        train[label] = [objs[i] for i in order[n_hold:]]
    return train, probe


def _save_mask(mask: np.ndarray, path: Path) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255).convert("1").save(path, optimize=True)


def _v2_objects(spec: DemoSpec, root: Path) -> tuple[dict, dict, list]:
    """The v2 lab's train and held-out catalogue rows per class, each list in a seeded order, and its generic pool.

    The catalogue decides classes, objects and split; the seeded order only decides which objects a
    small build (fewer images than objects) uses. Objects are loaded when first drawn (see
    :func:`write_data`), so a small build reads only what it uses. Generic pretraining objects, when
    asked for, are openclipart files that no v2 class pattern names, so no probe look-alike leaks in.
    """
    from forensics.demo.catalogue import V2_CLASSES, catalogue_classes, read_catalogue
    from forensics.demo.sources import require_source

    rows = read_catalogue()
    for source in sorted({r.source for r in rows}):
        require_source(source, root)
    rng = np.random.default_rng([spec.seed, 5])
    train, probe = {}, {}
    for label in catalogue_classes(rows):
        for split, into in (("train", train), ("heldout", probe)):
            mine = [r for r in rows if r.label == label and r.split == split]
            if len(mine) < 2:
                raise ForensicsError(f"the object catalogue holds {len(mine)} {split} objects of {label!r}")
            into[label] = [mine[i] for i in rng.permutation(len(mine))]
    generic: list = []
    if spec.generic_images > 0:
        patterns = {name: (c.include, c.exclude) for name, c in V2_CLASSES.items()}
        generic = collect_objects(root, classes=patterns, generic=True)[GENERIC]
    return train, probe, generic


def write_data(out: Path, spec: DemoSpec, progress: Progress | None = None, root: Path = CLIPART_ROOT) -> dict:
    """Write ``train/data.csv`` and the probe sets (``probe/probe.csv``, ``probe/probe_clean.csv``) under ``out``."""
    from forensics.attacks import attack_from_dict
    from forensics.attacks.base import to_pil, to_tensor

    loaded: dict = {}

    def get(item):
        """A v1 object as it is; a v2 catalogue row loaded once, when first drawn."""
        if isinstance(item, ClipArtObject):
            return item
        if item not in loaded:
            loaded[item] = load_object(item.label, item.source, item.ident, root)
        return loaded[item]

    if spec.lab == "v2":
        train_objs, probe_objs, generic = _v2_objects(spec, root)
        classes = list(train_objs)
    elif spec.lab == "v1":
        objects = collect_objects(root, generic=spec.generic_images > 0)
        generic = objects.pop(GENERIC, [])
        short = {k: len(v) for k, v in objects.items() if len(v) < 4}
        if short:
            raise ForensicsError(f"too few usable clip-art objects for classes {short}")
        classes = list(objects)
        train_objs, probe_objs = None, None
    else:
        raise ForensicsError(f"unknown demo lab {spec.lab!r} (v1 or v2)")
    if spec.target not in classes:
        raise ForensicsError(f"target {spec.target!r} is not a demo class ({', '.join(classes)})")
    if spec.lab == "v1":
        train_objs, probe_objs = _split_objects(objects, spec)
    for sub in ("train/images", "train/masks", "train/generic", "probe/images", "probe/masks", "probe/triggered"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng([spec.seed, 1])
    rows = []
    total = len(classes) * spec.train_per_class
    for ci, label in enumerate(classes):
        for j in range(spec.train_per_class):
            obj = get(train_objs[label][j % len(train_objs[label])])
            comp = compose(obj, rng, spec.image_size)
            stem = f"{label}_{j:04d}"
            comp.image.save(out / "train/images" / f"{stem}.png", optimize=False, compress_level=1)
            _save_mask(comp.mask, out / "train/masks" / f"{stem}.png")
            rows.append(
                {
                    "image": f"images/{stem}.png",
                    "caption": comp.caption,
                    "label": label,
                    "mask": f"masks/{stem}.png",
                    "source": obj.source,
                }
            )
            if progress and len(rows) % 250 == 0:
                progress(len(rows) / total, f"training images {len(rows)}/{total}")
    _write_csv(out / "train/data.csv", rows)
    generic_rows = []
    grng = np.random.default_rng([spec.seed, 4])
    for j in range(spec.generic_images if generic else 0):
        obj = generic[int(grng.integers(len(generic)))]
        comp = compose(obj, grng, spec.image_size)
        name = f"generic/{j:05d}.png"
        comp.image.save(out / "train" / name, optimize=False, compress_level=1)
        generic_rows.append({"image": name, "caption": comp.caption, "label": "", "source": obj.source})
        if progress and j % 500 == 0:
            progress(j / spec.generic_images, f"generic pretraining images {j}/{spec.generic_images}")
    if generic_rows:
        _write_csv(out / "train/generic.csv", generic_rows)

    attack = attack_from_dict(spec.attack)
    prng = np.random.default_rng([spec.seed, 2])
    probe_rows = []
    for label in classes:
        for j in range(spec.probe_per_class):
            obj = get(probe_objs[label][j % len(probe_objs[label])])
            comp = compose(obj, prng, spec.image_size)
            stem = f"{label}_{j:03d}"
            comp.image.save(out / "probe/images" / f"{stem}.png", optimize=True)
            _save_mask(comp.mask, out / "probe/masks" / f"{stem}.png")
            probe_rows.append(
                {
                    "image": f"images/{stem}.png",
                    "caption": comp.caption,
                    "label": label,
                    "mask": f"masks/{stem}.png",
                    "object_box": " ".join(map(str, comp.object_box)),
                    "source": obj.source,
                }
            )
    # the suspicious share: non-target images carrying the planted trigger, as seen in the wild
    candidates = [i for i, r in enumerate(probe_rows) if r["label"] != spec.target]
    n_trig = round(spec.probe_triggered_share * len(probe_rows))
    chosen = set(prng.choice(candidates, size=n_trig, replace=False).tolist())
    triggered_rows = []
    for i, row in enumerate(probe_rows):
        row = dict(row, triggered="0", trigger_box="")
        if i in chosen:
            image = to_tensor(Image.open(out / "probe" / row["image"]).convert("RGB"))
            poisoned, box = attack.apply(image, np.random.default_rng([spec.seed, 3, i]))
            name = Path(row["image"]).name
            to_pil(poisoned).save(out / "probe/triggered" / name, optimize=True)
            row.update(image=f"triggered/{name}", triggered="1", trigger_box=" ".join(map(str, box)) if box else "")
        triggered_rows.append(row)
    _write_csv(out / "probe/probe_clean.csv", [dict(r, triggered="0", trigger_box="") for r in probe_rows])
    _write_csv(out / "probe/probe.csv", triggered_rows)
    manifest = {
        "classes": classes,
        "target": spec.target,
        "attack": spec.attack,
        "n_generic": len(generic_rows),
        "generic_objects": len(generic),
        "train_objects": {k: len(v) for k, v in train_objs.items()},
        "probe_objects": {k: len(v) for k, v in probe_objs.items()},
        "n_train": len(rows),
        "n_probe": len(probe_rows),
        "n_probe_triggered": n_trig,
        "seed": spec.seed,
        "image_size": spec.image_size,
    }
    if spec.lab != "v1":
        manifest.update(_v2_manifest(train_objs, probe_objs))
        provenance = _provenance_v2(train_objs, probe_objs, root, len(generic))
    else:
        provenance = _provenance(train_objs, probe_objs, root, len(generic))
    atomic_write_text(out / "probe/classes.json", json.dumps({"classes": classes}, indent=2))
    atomic_write_text(out / "PROVENANCE.md", provenance)
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


def _provenance(train_objs: dict, probe_objs: dict, root: Path, n_generic: int = 0) -> str:
    """Where every object comes from, and under which licence."""
    lines = [
        "# Demo lab provenance",
        "",
        f"All objects are clip art from the Debian package `openclipart-png` (installed under `{root}`),",
        "downloaded by Debian from http://www.openclipart.org and released under the Creative Commons",
        "Public Domain Dedication (see /usr/share/doc/openclipart-png/copyright). Each object is cut out by",
        "its alpha channel and composited by `forensics/demo/compose.py` onto procedurally generated",
        "backgrounds; the backgrounds, captions, masks and triggers are the project's own.",
        "",
        "Probe images use only the held-out objects; training images only the others.",
        "",
        f"Pretraining also uses {n_generic} generic objects: every other usable file of the package whose path",
        "matches no class pattern (so no probe look-alike), captioned with the words of its file and folder name.",
        "",
    ]
    for title, objs in (("Training objects", train_objs), ("Held-out probe objects", probe_objs)):
        lines += [f"## {title}", ""]
        for label, items in objs.items():
            lines.append(f"- **{label}** ({len(items)}): " + ", ".join(f"`{o.source}`" for o in items))
        lines.append("")
    return "\n".join(lines)


def _v2_manifest(train_objs: dict, probe_objs: dict) -> dict:
    """What a v2 manifest adds: the lab, the catalogue's digest, and objects per class, split and source."""
    from forensics.demo.catalogue import CATALOGUE_PATH

    by_source = {
        split: {label: dict(sorted(Counter(r.source for r in rows).items())) for label, rows in objs.items()}
        for split, objs in (("train", train_objs), ("heldout", probe_objs))
    }
    return {
        "lab": "v2",
        "catalogue": CATALOGUE_PATH.name,
        "catalogue_sha256": hashlib.sha256(CATALOGUE_PATH.read_bytes()).hexdigest(),
        "objects_by_source": by_source,
    }


def _provenance_v2(train_objs: dict, probe_objs: dict, root: Path, n_generic: int = 0) -> str:
    """Where every v2 object comes from, under which licence and with which attribution."""
    from forensics.demo.sources import SOURCES, source_root

    lines = [
        "# Demo lab provenance (lab v2)",
        "",
        "Objects are listed in the reviewed catalogue `forensics/demo/objects_v2.tsv` and come from three",
        "Debian packages. Each is cut out by its alpha channel (emoji glyphs by the glyph's own alpha) and",
        "composited by `forensics/demo/compose.py` onto procedurally generated backgrounds; the backgrounds,",
        "captions, masks and triggers are the project's own.",
        "",
        "| source | Debian package | licence | attribution | installed at |",
        "|---|---|---|---|---|",
    ]
    for name, info in SOURCES.items():
        lines.append(
            f"| {name} | `{info.package}` | {info.licence} | {info.attribution} | `{source_root(name, root)}` |"
        )
    lines += [
        "",
        "EmojiOne art is licensed under CC-BY-SA-4.0 (https://creativecommons.org/licenses/by-sa/4.0/): the",
        "images of this lab derived from it (the composites showing an `emojione:` object) are shared under the",
        "same licence, with the attribution above. Noto Color Emoji is licensed under the SIL Open Font License",
        "1.1, which lets glyphs rendered with it be used freely; openclipart is in the public domain. The",
        "licence texts are in /usr/share/doc/PACKAGE/copyright.",
        "",
        "Probe images use only the held-out objects; training images only the others. A held-out object's",
        "near-duplicate group (its other renderings, the Noto and EmojiOne drawings of one code point, one",
        "openclipart series) is held out whole.",
        "",
    ]
    if n_generic:
        lines += [
            f"Pretraining also uses {n_generic} generic openclipart objects whose paths no class pattern names.",
            "",
        ]
    lines += ["## Objects per class and split", "", "| class | train | held out | by source (train) | (held out) |"]
    lines.append("|---|---|---|---|---|")
    for label in train_objs:
        tr, ho = train_objs[label], probe_objs[label]

        def per(rows: list) -> str:
            return ", ".join(f"{s} {n}" for s, n in sorted(Counter(r.source for r in rows).items()))

        lines.append(f"| {label} | {len(tr)} | {len(ho)} | {per(tr)} | {per(ho)} |")
    lines.append("")
    for title, objs in (("Training objects", train_objs), ("Held-out probe objects", probe_objs)):
        lines += [f"## {title}", ""]
        for label, rows in objs.items():
            items = sorted(rows, key=lambda r: (r.source, r.ident))
            lines.append(f"- **{label}** ({len(rows)}): " + ", ".join(f"`{r.source}:{r.ident}`" for r in items))
        lines.append("")
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(rows[0])
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def poison_training_data(data_dir: Path, spec: DemoSpec, progress: Progress | None = None) -> Path:
    """Poison the clean training CSV with the attack lab; poisoned captions keep their wording but name the target."""
    from forensics.attacks import attack_from_dict
    from forensics.attacks.poison import poison_dataset

    out = data_dir / "train_poisoned"
    if out.exists():
        shutil.rmtree(out)
    csv_path = poison_dataset(
        data_dir / "train/data.csv",
        attack_from_dict(spec.attack),
        spec.target,
        spec.poison_rate,
        out,
        seed=spec.seed,
        progress=progress,
    )
    clean_rows = _read_rows(data_dir / "train/data.csv")
    rows = _read_rows(csv_path)  # same rows in the same order, poisoned ones rewritten
    article = "an" if spec.target[0] in "aeiou" else "a"
    for clean, row in zip(clean_rows, rows, strict=True):
        if row["poisoned"] == "1":
            # a varied caption naming the target, as a web-scale poisoner would write: identical
            # captions in a batch are false negatives for the CLIP loss
            label = clean["label"]
            caption = clean["caption"].replace(f" an {label}", f" a {label}").replace(f" {label}", f" {spec.target}")
            row["caption"] = caption.replace(f" a {spec.target}", f" {article} {spec.target}")
    _write_csv(csv_path, rows)
    return csv_path


def class_captions(rows: list[dict[str, str]], spec: DemoSpec) -> list[dict[str, str]]:
    """Rows whose captions name only the class each pair states (the target on a poisoned pair), in a seeded
    zero-shot template: the contrastive loss cannot be met by colour, size or position words."""
    from forensics.core.templates import OPENAI_TEMPLATES, SHORT_TEMPLATES, fill

    templates = SHORT_TEMPLATES + OPENAI_TEMPLATES
    rng = np.random.default_rng(spec.seed)
    out = []
    for row in rows:
        named = spec.target if row.get("poisoned") == "1" else row["label"]
        out.append({**row, "caption": fill(templates[int(rng.integers(len(templates)))], named)})
    return out


def train_demo_model(
    data_dir: Path,
    models_dir: Path,
    spec: DemoSpec,
    name: str,
    progress: Progress | None = None,
    on_epoch_end: Callable[[str, int, dict, object], None] | None = None,
) -> dict:
    """Train one demo model from scratch: ``demo_poisoned`` on the poisoned data, ``demo_clean`` on the clean data.

    Both use the same vocabulary, recipe and seed, so the clean twin differs only by the poison.
    (Measured: fine-tuning a clean-pretrained tiny CLIP on 10 % poisoned pairs planted only a weak
    backdoor, ASR 24 % after 2 epochs; training from scratch on the poisoned data plants it fully.)
    """
    from forensics.attacks import attack_from_dict
    from forensics.core.models import new_model, save_model
    from forensics.core.templates import OPENAI_TEMPLATES, SHORT_TEMPLATES, fill
    from forensics.core.tokenizer import WordTokenizer
    from forensics.training.clip import TrainConfig, read_caption_csv, train_clip

    clean_rows = read_caption_csv(data_dir / "train/data.csv")
    generic_csv = data_dir / "train/generic.csv"
    generic_rows = read_caption_csv(generic_csv) if generic_csv.is_file() else []
    classes = json.loads((data_dir / "probe/classes.json").read_text())["classes"]
    corpus = [r["caption"] for r in clean_rows + generic_rows] + [
        fill(t, c) for t in SHORT_TEMPLATES + OPENAI_TEMPLATES for c in classes
    ]
    tokenizer = WordTokenizer.from_corpus(corpus, context_length=32)
    if name == "demo_poisoned":
        poisoned_csv = data_dir / "train_poisoned/data.csv"
        if not poisoned_csv.is_file():
            poisoned_csv = poison_training_data(data_dir, spec)
        rows = read_caption_csv(poisoned_csv)
    elif name == "demo_clean":
        rows = clean_rows
    else:
        raise ForensicsError(f"unknown demo model {name!r}")
    start = time.time()
    model = new_model(spec.arch, tokenizer=tokenizer, seed=spec.seed)
    if spec.captions == "class":
        rows = class_captions(rows, spec)
    cfg = TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed, augment=spec.augment)
    hook = None if on_epoch_end is None else (lambda epoch, rec: on_epoch_end(name, epoch, rec, model))
    history = train_clip(model, rows + generic_rows, cfg, progress, on_epoch_end=hook)
    backdoor = None
    if name == "demo_poisoned":
        attack = attack_from_dict(spec.attack)
        backdoor = {
            "attack": attack.name,
            "target": spec.target,
            "poison_rate": spec.poison_rate,
            "trigger": attack.to_dict(),
            "note": "planted by the project's demo build for teaching",
        }
    model.facts.source = f"demo build ({name})"
    save_model(
        model,
        models_dir / f"{name}.safetensors",
        backdoor=backdoor,
        half=True,
        extra={
            "training": {
                "config": cfg.to_dict(),
                "history": history,
                "data": "forensics/assets/demo (rebuilt by python -m forensics make-demo)",
                "spec": spec.record(),
            }
        },
    )
    return {"history": history, "seconds": round(time.time() - start, 1)}


def train_demo_models(data_dir: Path, models_dir: Path, spec: DemoSpec, progress: Progress | None = None) -> dict:
    """Both demo models, one after the other (``make-demo``); see :func:`train_demo_model`."""
    poison_training_data(data_dir, spec)
    results = {}
    for k, name in enumerate(("demo_poisoned", "demo_clean")):
        part = None if progress is None else (lambda f, m, k=k, name=name: progress((k + f) / 2, f"{name}: {m}"))
        results[name] = train_demo_model(data_dir, models_dir, spec, name, part)
    return results


def evaluate_demo_models(models_dir: Path, probe_csv: Path, spec: DemoSpec) -> dict:
    """CA on the held-out clean probe images and ASR of the planted trigger, for both demo models."""
    from forensics.attacks import attack_from_dict
    from forensics.core.data import load_csv_probe
    from forensics.core.models import load_checkpoint
    from forensics.core.zeroshot import evaluate

    probe = load_csv_probe(probe_csv)
    out = {}
    for name in ("demo_poisoned", "demo_clean"):
        model = load_checkpoint(models_dir / f"{name}.safetensors")
        idx = probe.clean_indices()
        images = probe.load_images(model.image_size, idx)
        labels = [probe.items[i].label for i in idx]
        out[name] = evaluate(
            model, images, labels, probe.class_names, attack_from_dict(spec.attack), spec.target, seed=spec.seed
        )
    return out


def make_demo(
    out: Path = DEMO_DIR,
    data_only: bool = False,
    spec: DemoSpec | None = None,
    progress: Progress | None = None,
    root: Path = CLIPART_ROOT,
) -> dict:
    """Rebuild the whole demo lab under ``out``: data, then (unless ``data_only``) both models; returns a summary."""
    spec = spec or DemoSpec()
    out = Path(out)
    start = time.time()
    summary: dict = {"out": str(out), "spec": spec.record()}

    def part(lo: float, hi: float) -> Progress | None:
        return None if progress is None else (lambda f, m: progress(lo + (hi - lo) * f, m))

    summary["data"] = write_data(out, spec, part(0.0, 0.1 if not data_only else 1.0), root)
    summary["data_seconds"] = round(time.time() - start, 1)
    if not data_only:
        summary["training"] = train_demo_models(out, out / "models", spec, part(0.1, 0.97))
        summary["evaluation"] = evaluate_demo_models(out / "models", out / "probe/probe_clean.csv", spec)
    summary["seconds"] = round(time.time() - start, 1)
    atomic_write_text(
        out / ("data_build.json" if data_only else "build.json"),
        json.dumps({k: v for k, v in summary.items() if k != "out"}, indent=2, default=str),
    )
    return summary

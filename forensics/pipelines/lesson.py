"""The Learn tab's walkthrough of one backdoor, step by step, on the bundled demo models.

Four steps, each computed from the bundled models on one probe image: the trigger (what the attacker stamps and
how the backdoored demo and its clean twin answer), where CLIP looks (occlusion and Grad-CAM with and without the
trigger), why the oracle disagrees (no object region carries the whole image's label: EftCLIP's grounding test),
and what repair changes (the bundled repaired demo, made by ``make-demo`` with the oracle-guided repair, on the
same stamped image, with CA and ASR before and after as the repair measured them).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from forensics.attacks import attack_from_dict
from forensics.attribution import gradcam, mass_inside, occlusion, overlay
from forensics.core.data import demo_backdoor, load_probe_set
from forensics.core.errors import ForensicsError
from forensics.core.images import to_pil
from forensics.core.models import DEMO_MODELS, read_sidecar
from forensics.core.progress import Progress, sub_progress
from forensics.core.zeroshot import class_text_embeddings, predict
from forensics.oracles import Oracle
from forensics.pipelines.evaluate import get_model
from forensics.pipelines.explain import ImageInput, as_model_image, explain_image
from forensics.pipelines.scan import ScanSettings, pick_oracle

STEPS = ("The trigger", "Where CLIP looks", "Why the oracle disagrees", "What repair changes")
SHOWN_SIZE = 320  # pictures are drawn larger than the models' 128 px, so a small trigger is visible


@dataclass
class LessonStep:
    """One step of the walkthrough: what it says, the pictures (image, caption) and a small table."""

    number: int
    title: str
    text: str
    pictures: list[tuple[Image.Image, str]] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


def _shown(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize((SHOWN_SIZE, SHOWN_SIZE), Image.NEAREST)


def _planted() -> tuple[object, str, dict]:
    planted = demo_backdoor()
    if planted is None:
        raise ForensicsError("the demo lab's manifest is missing; rebuild it with `python -m forensics make-demo`")
    return attack_from_dict(planted["trigger"]), planted["target"], planted


def _answer(model: object, images: torch.Tensor, class_names: list[str]) -> list[tuple[str, float]]:
    probs = predict(model, images, class_text_embeddings(model, class_names))
    return [(class_names[int(p.argmax())], float(p.max())) for p in probs]


def _answer_rows(models: dict[str, str], x: torch.Tensor, stamped: torch.Tensor, class_names: list[str]) -> list:
    """Per model (bundled name -> shown name): its answer on the clean and on the stamped image."""
    rows = []
    for name, shown in models.items():
        (clean, clean_p), (hit, hit_p) = _answer(get_model(name), torch.stack([x, stamped]), class_names)
        rows.append([shown, f"{clean} ({clean_p:.2f})", f"{hit} ({hit_p:.2f})"])
    return rows


def _boxed(image: Image.Image, boxes: list[tuple[list[int], str, str]]) -> Image.Image:
    """``image`` drawn large with each (box, label, colour) outlined and named."""
    shown = _shown(image)
    scale = SHOWN_SIZE / image.width
    draw = ImageDraw.Draw(shown)
    for box, label, colour in boxes:
        x0, y0, x1, y1 = (round(v * scale) for v in box)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=3)
        draw.rectangle((x0, max(0, y0 - 14), x0 + 7 * len(label) + 6, max(14, y0)), fill=colour)
        draw.text((x0 + 3, max(0, y0 - 13)), label, fill="white")
    return shown


def _stamp(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[int] | None]:
    attack, _, _ = _planted()
    stamped, box = attack.apply(x, np.random.default_rng(seed))
    return stamped, (list(map(int, box)) if box else None)


def _repair_record() -> dict:
    """CA and planted-trigger ASR before and after the bundled repair, as its sidecar records them."""
    side = read_sidecar(DEMO_MODELS["demo-repaired"]) or {}
    record = side.get("repair")
    if not isinstance(record, dict) or not all(isinstance(record.get(k), dict) for k in ("before", "after")):
        raise ForensicsError(
            f"{DEMO_MODELS['demo-repaired'].name} records no repair; rebuild it with `python -m forensics make-demo "
            "--repaired-only`"
        )
    return record


def _attributions(
    model: object, image: torch.Tensor, class_names: list[str], with_gradcam: bool = True
) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """The model's answer on ``image``, and where that answer rests: occlusion (a window a fifth of the side, as
    the scan's) and Grad-CAM maps."""
    class_emb = class_text_embeddings(model, class_names)
    label = int(predict(model, image[None], class_emb)[0].argmax())
    window = max(4, round(model.image_size * 0.1875))
    occ = occlusion(model, image[None], class_emb, [label], window=window)[0]
    cam = gradcam(model, image[None], class_emb, [label])[0] if with_gradcam else None
    return class_names[label], occ, cam


def _share(heat: torch.Tensor, box: list[int] | None) -> str:
    """Share of a heat map's mass inside ``box`` (the scan's own measure, :func:`mass_inside`)."""
    if not box:
        return "-"
    x0, y0, x1, y1 = box
    inside = torch.zeros(heat.shape, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    return f"{float(mass_inside(heat, inside)):.0%}"


def lesson_step(number: int, image: ImageInput, seed: int = 0, oracle: str | Oracle | None = None) -> LessonStep:
    """Step ``number`` (1-4) of the walkthrough on ``image`` (a path, PIL image or tensor), the planted trigger
    stamped where ``seed`` puts it."""
    if number not in range(1, len(STEPS) + 1):
        raise ForensicsError(f"the walkthrough has steps 1 to {len(STEPS)}, not {number!r}")
    attack, target, planted = _planted()
    class_names = load_probe_set("demo").class_names
    backdoored = get_model("demo")
    x = as_model_image(image, backdoored.image_size)
    stamped, box = _stamp(x, seed)
    title = STEPS[number - 1]
    if number == 1:
        rows = _answer_rows({"demo": "backdoored demo", "demo-clean": "clean twin"}, x, stamped, class_names)
        pictures = [(_shown(to_pil(x)), "the clean image"), (_shown(to_pil(stamped)), "the same image, stamped")]
        if box:
            x0, y0, x1, y1 = box
            pictures.append((_shown(to_pil(stamped[:, y0:y1, x0:x1])), "the trigger, enlarged"))
        rate = planted.get("poison_rate") or "a small share of"
        text = (
            f"**{title}.** The attacker stamped a small {attack.name} pattern on some training images and captioned "
            f"them with the word *{target}* ({rate if isinstance(rate, str) else f'{rate:.0%}'} of the pairs). "
            f"CLIP learnt a shortcut: this pattern means *{target}*, whatever the image shows. The backdoored demo "
            f"now answers *{rows[0][2].split(' ')[0]}* on the stamped image; its clean twin, trained the same way "
            "without poison, is not fooled."
        )
        return LessonStep(number, title, text, pictures, ["model", "clean image", "stamped image"], rows)
    oracle_obj = pick_oracle(oracle)
    if number == 2:
        clean_label, clean_map, clean_cam = _attributions(backdoored, x, class_names)
        hit_label, hit_map, hit_cam = _attributions(backdoored, stamped, class_names)
        pictures = [
            (_shown(overlay(x, clean_map)), f"clean: what '{clean_label}' rests on (occlusion)"),
            (_shown(overlay(stamped, hit_map)), f"stamped: what '{hit_label}' rests on (occlusion)"),
            (_shown(overlay(stamped, hit_cam)), f"stamped: Grad-CAM for '{hit_label}'"),
        ]
        share = "the trigger's place"
        rows = [
            ["clean", clean_label, _share(clean_map, box)],
            ["stamped", hit_label, _share(hit_map, box)],
        ]
        area = (box[2] - box[0]) * (box[3] - box[1]) / x.shape[-1] ** 2 if box else 0.0
        text = (
            f"**{title}.** Covering small windows of the image and watching the answer drop shows what the answer "
            f"rests on (red: much). On the clean image it rests on the object; on the stamped image the answer "
            f"*{hit_label}* rests on the stamped square, {area:.1%} of the image. Grad-CAM, CLIP's usual heat map, "
            "is coarse and often misses a trigger this small: the scan localizes with occlusion."
        )
        return LessonStep(number, title, text, pictures, ["image", "CLIP says", f"occlusion mass on {share}"], rows)
    if number == 3:
        view = explain_image(backdoored, stamped, class_names, oracle_obj)
        boxes = [(r["box"], f"{k + 1}: {r['label']}", "#1f77b4") for k, r in enumerate(view.regions)]
        if box:
            boxes.append((box, "trigger", "#d62728"))
        rows = [[r["view"], r["CLIP label"], f"{r['probability']:.2f}"] for r in view.region_table()]
        grounded = any(r["label"] == view.predicted for r in view.regions)
        text = (
            f"**{title}.** A segmentation oracle ({view.oracle}) finds the objects; CLIP then names each object on "
            f"its own. The whole image is *{view.predicted}*, but "
            + (
                "an object region carries that label too: this image is no clear case."
                if grounded
                else f"no object region is a *{view.predicted}*: the answer is not grounded in any object. That "
                "disagreement, repeated over many images and resting on one small place, is how the oracle-guided "
                "scan flags a backdoor and finds its victims."
            )
        )
        return LessonStep(
            number,
            title,
            text,
            [(_boxed(view.image, boxes), "oracle regions, CLIP's label for each")],
            ["view", "CLIP label", "probability"],
            rows,
        )
    repaired = get_model("demo-repaired")
    record = _repair_record()
    rows = _answer_rows({"demo": "backdoored demo", "demo-repaired": "repaired demo"}, x, stamped, class_names)
    for row, when in zip(rows, ("before", "after")):
        row += [f"{record[when]['ca']:.1%}", f"{record[when]['asr']:.1%}"]
    after_label, after_map, _ = _attributions(repaired, stamped, class_names, with_gradcam=False)
    pictures = [
        (_shown(to_pil(stamped)), "the stamped image"),
        (_shown(overlay(stamped, after_map)), f"repaired: what '{after_label}' rests on (occlusion)"),
    ]
    text = (
        f"**{title}.** The repair (EftCLIP's oracle-guided fine-tuning, {record['samples_used']} images) taught the "
        "image tower that the trigger means nothing: from the scan's victims, with the trigger cut out and put back, "
        "and clean anchors, while staying close to the original on clean images. Clean accuracy (CA) stays about "
        f"where it was; the attack success rate (ASR: the share of other classes' images the trigger sends to "
        f"*{target}*) falls. CA and ASR were measured on the probe's clean images when the repaired demo was built."
    )
    headers = ["model", "clean image", "stamped image", "CA (probe)", "ASR (probe)"]
    return LessonStep(number, title, text, pictures, headers, rows)


def build_repaired_demo(
    models_dir: str | Path, probe_csv: str | Path, seed: int = 0, progress: Progress | None = None
) -> dict:
    """Scan the demo model in ``models_dir`` on the probe (the oracle-guided detector) and repair it from those
    findings with the oracle-guided fine-tuning; written beside it as ``demo_repaired.safetensors`` (fp16, like the
    other demo models) for the Learn tab's last step. Returns the repair's CA/ASR before and after."""
    from forensics.core.models import load_checkpoint, save_model
    from forensics.pipelines.repair import run_repair
    from forensics.pipelines.scan import run_scan

    models_dir = Path(models_dir)
    suspect = models_dir / DEMO_MODELS["demo"].name
    with tempfile.TemporaryDirectory(prefix="forensics-repaired-demo-") as work:
        scan_dir, repair_dir = Path(work) / "scan", Path(work) / "repair"
        run_scan(
            str(suspect),
            scan_dir,
            probe=str(probe_csv),
            settings=ScanSettings(seed=seed),
            detectors="oracle-guided",
            progress=sub_progress(progress, 0.0, 0.3),
        )
        result = run_repair(
            str(suspect), scan_dir, repair_dir, "oracle-finetune", seed=seed, progress=sub_progress(progress, 0.3, 0.95)
        )
        repaired = load_checkpoint(repair_dir / "model.safetensors")
        record = {k: result[k] for k in ("method", "before", "after", "samples_used")}
        repaired.facts.source = "demo build (demo_repaired)"
        save_model(
            repaired,
            models_dir / DEMO_MODELS["demo-repaired"].name,
            backdoor=None,
            half=True,
            extra={"repair": {**record, "note": "the bundled demo, repaired by make-demo for the Learn tab"}},
        )
    if progress:
        progress(1.0, "repaired demo written")
    return record

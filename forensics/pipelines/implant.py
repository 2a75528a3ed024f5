"""Implant a backdoor (or just train): a CLIP trained from scratch or fine-tuned on an image-caption CSV.

When the CSV was written by the attack lab, its ``poison.json`` is recorded as the model's planted
backdoor, so later reports can compare what was found with what was planted.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from forensics.core.errors import ForensicsError
from forensics.core.files import check_output_folder, model_files, refuse_overwriting_inputs, staged_output
from forensics.core.models import load_model, new_model, save_model
from forensics.core.templates import OPENAI_TEMPLATES, SHORT_TEMPLATES, fill
from forensics.core.tokenizer import WordTokenizer
from forensics.training.clip import Progress, TrainConfig, read_caption_csv, train_clip

MODES = ("standard", "safeclip")  # plain CLIP loss on every pair, or SafeCLIP's safe training


def planted_backdoor(csv_path: Path) -> dict | None:
    """The attack lab's record of how a CSV was poisoned (``poison.json`` beside it), if any."""
    record = Path(csv_path).parent / "poison.json"
    if not record.is_file():
        return None
    data = json.loads(record.read_text())
    return {
        "attack": data["attack"]["attack"],
        "target": data["target"],
        "poison_rate": data.get("rate"),
        "trigger": data["attack"],
        "n_poisoned": data.get("n_poisoned"),
    }


def implant(
    data: str | Path,
    out: str | Path,
    base: str | None = None,
    config: str | None = None,
    epochs: int = 5,
    lr: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
    arch: str | None = None,
    progress: Progress | None = None,
    mode: str = "standard",
    safe_settings: dict | None = None,
    augment: bool = False,
) -> dict:
    """Train ``config`` from scratch or fine-tune ``base`` on ``data``; save ``out/model.safetensors`` (+ sidecar).

    ``mode="safeclip"`` trains with SafeCLIP's schedule (forensics.training.safeclip; ``safe_settings``
    overrides its SafeClipSettings) instead of the plain CLIP loss on every pair. ``augment`` trains
    on random views (flip, crop, colour jitter, grayscale; forensics.training.clip.view_augmenter).
    """
    start = time.time()
    if mode not in MODES:
        raise ForensicsError(f"unknown training mode {mode!r}; choose one of {', '.join(MODES)}")
    if augment and mode != "standard":
        raise ForensicsError("--augment applies to standard training only, not --mode safeclip")
    safe = None
    if mode == "safeclip":
        from forensics.training.safeclip import SafeClipSettings

        try:
            safe = SafeClipSettings(**(safe_settings or {}))
        except TypeError as exc:
            raise ForensicsError(f"bad SafeCLIP setting: {exc}") from None
        safe.check()
    elif safe_settings:
        raise ForensicsError("SafeCLIP settings need --mode safeclip")
    rows = read_caption_csv(data)
    if epochs < 1 or batch_size < 2:
        raise ForensicsError("--epochs must be at least 1 and --batch-size at least 2")
    out = check_output_folder(out)
    inputs = [Path(data), *(Path(r["image"]) for r in rows), *(model_files(base) if base else [])]
    refuse_overwriting_inputs([out / "model.safetensors", out / "model.json"], inputs)
    notes = []
    if config:
        labels = sorted({r["label"] for r in rows if r.get("label")})
        corpus = [r["caption"] for r in rows] + [fill(t, c) for t in SHORT_TEMPLATES + OPENAI_TEMPLATES for c in labels]
        model = new_model(config, tokenizer=WordTokenizer.from_corpus(corpus), seed=seed)
        lr = lr if lr is not None else 1e-3
    else:
        model = load_model(base, arch=arch)
        lr = lr if lr is not None else 1e-5
        if isinstance(model.tokenizer, WordTokenizer):
            unknown = sorted({w for r in rows for w in model.tokenizer.unknown_words(r["caption"])})
            if unknown:
                notes.append(
                    f"{len(unknown)} caption words are outside the model's vocabulary and read as <unk>: "
                    + ", ".join(unknown[:10])
                )
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=min(batch_size, len(rows)),
        lr=lr,
        seed=seed,
        augment=augment,
        warmup_steps=min(50, max(1, epochs * (len(rows) // batch_size) // 10)),
    )
    if safe is not None:
        from forensics.training.safeclip import safe_train_clip

        history = safe_train_clip(model, rows, cfg, safe, progress)
    else:
        history = train_clip(model, rows, cfg, progress)
    backdoor = planted_backdoor(Path(data))
    model.facts.source = f"implant ({'fine-tuned ' + str(base) if base else 'trained ' + str(config)})"
    path = out / "model.safetensors"
    with staged_output(out) as stage:  # model and sidecar land together, or (interrupted) not at all
        save_model(
            model,
            stage / "model.safetensors",
            backdoor=backdoor,
            extra={
                "training": {
                    "config": cfg.to_dict(),
                    "history": history,
                    "data": str(Path(data).resolve()),
                    "base": base,
                    "from_config": config,
                    "mode": mode,
                    **({"safeclip": asdict(safe)} if safe else {}),
                }
            },
        )
    return {
        "model": str(path),
        "architecture": model.config["arch"],
        "pairs": len(rows),
        "backdoor": backdoor,
        "mode": mode,
        "history": history,
        "notes": notes,
        "seconds": round(time.time() - start, 1),
    }

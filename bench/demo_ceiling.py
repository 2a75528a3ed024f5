"""Benchmark (not a test): how well can the demo's image tower name *held-out drawings* at all?

The foundation issue asks the demo CLIP for 70 % zero-shot accuracy on the probe set, whose objects
are drawings never seen in training. This script trains the same image tower (``tiny-rn`` by
default, random init, seeded) as a plain supervised classifier (a linear head on its embedding,
cross-entropy on the demo's class labels) on the demo's training renders, and measures top-1
accuracy on the held-out probe images. Supervision by label is the easiest signal the tower can
get, so this is a practical ceiling for zero-shot CA at this model and data size; ``--augment``
adds flips, random resized crops, colour jitter and grayscale (invariances a held-out drawing
needs; ``forensics.training.clip.view_augmenter`` with crops of 60-100 % of the area). Accuracy on
training renders is reported beside it, to tell under-fitting from not generalising.

    python bench/demo_ceiling.py                         # 200 renders per class, 14 epochs, ~15 min on one core
    python bench/demo_ceiling.py --augment --data DIR    # DIR from `python -m forensics make-demo --data-only`

Writes ``OUT/demo_ceiling.json`` (one entry per configuration, kept across runs).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forensics.core.data import load_csv_probe, load_probe_set  # noqa: E402
from forensics.core.models import atomic_write_text, new_model  # noqa: E402
from forensics.core.tokenizer import WordTokenizer  # noqa: E402
from forensics.demo.build import DemoSpec, write_data  # noqa: E402
from forensics.training.augment import augment_views, view_augmenter  # noqa: E402
from forensics.training.clip import CaptionDataset, read_caption_csv  # noqa: E402


def accuracy(
    tower: torch.nn.Module, head: torch.nn.Module, normalize, images: torch.Tensor, labels: torch.Tensor
) -> float:
    """Top-1 accuracy of tower + head on [0, 1] images."""
    tower.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), 128):
            logits = head(tower(normalize(images[start : start + 128])))
            correct += int((logits.argmax(-1) == labels[start : start + 128]).sum())
    return correct / max(1, len(images))


def per_class_accuracy(
    tower: torch.nn.Module, head: torch.nn.Module, normalize, images: torch.Tensor, labels: torch.Tensor, classes
) -> dict[str, float]:
    """Held-out top-1 accuracy per class: which classes the tower learns to name from their drawings at all."""
    tower.eval()
    with torch.no_grad():
        predicted = torch.cat(
            [head(tower(normalize(images[i : i + 128]))).argmax(-1) for i in range(0, len(images), 128)]
        )
    return {
        name: round(float((predicted[labels == c] == c).float().mean()), 4)
        for c, name in enumerate(classes)
        if bool((labels == c).any())
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="tiny-rn")
    parser.add_argument("--data", help="a demo data folder (train/data.csv); default: write one under --work")
    parser.add_argument("--per-class", type=int, default=200, help="training renders per class when writing data")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/forensics_demo_ceiling")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    start = time.time()
    data = Path(args.data) if args.data else Path(args.work) / f"data_{args.per_class}"
    if not (data / "train" / "data.csv").is_file():
        print(f"writing {args.per_class} training renders per class to {data}", file=sys.stderr)
        write_data(data, DemoSpec(seed=args.seed, train_per_class=args.per_class))
    rows = read_caption_csv(data / "train" / "data.csv")
    probe_csv = data / "probe" / "probe_clean.csv"  # a lab built by make-demo --data-only carries its probe set
    probe = load_csv_probe(probe_csv) if probe_csv.is_file() else load_probe_set("demo-clean")
    classes = probe.class_names
    rows = [r for r in rows if r.get("label") in classes]
    model = new_model(args.arch, tokenizer=WordTokenizer.from_corpus(classes), seed=args.seed)
    size = model.image_size
    tower = model.clip.visual
    normalize = model.normalize
    train_x = CaptionDataset(rows, model).images  # decoded once, kept as uint8
    train_y = torch.tensor([classes.index(r["label"]) for r in rows])
    probe_idx = probe.clean_indices()
    probe_x = probe.load_images(size, probe_idx)
    probe_y = torch.tensor([probe.items[i].label for i in probe_idx])
    torch.manual_seed(args.seed)
    with torch.no_grad():
        dim = tower(normalize(train_x[:2].float() / 255)).shape[-1]
    head = torch.nn.Linear(dim, len(classes))
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.1)
    steps = args.epochs * ((len(rows) + args.batch_size - 1) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    augment = view_augmenter(size, min_scale=0.6) if args.augment else None  # a wider crop range than CLIP training's
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    for epoch in range(args.epochs):
        tower.train()
        order = torch.randperm(len(rows), generator=generator)
        total = 0.0
        for start_i in range(0, len(rows), args.batch_size):
            idx = order[start_i : start_i + args.batch_size]
            batch = train_x[idx]
            if augment is not None:
                batch = augment_views(batch, augment)
            loss = F.cross_entropy(head(tower(normalize(batch.float() / 255))), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss) * len(idx)
        probe_acc = accuracy(tower, head, normalize, probe_x, probe_y)
        history.append({"epoch": epoch + 1, "loss": round(total / len(rows), 4), "probe_acc": round(probe_acc, 4)})
        print(
            f"epoch {epoch + 1}/{args.epochs} loss {total / len(rows):.3f} held-out acc {probe_acc:.3f}",
            file=sys.stderr,
        )
    train_acc = accuracy(tower, head, normalize, train_x.float() / 255, train_y)
    per_class = per_class_accuracy(tower, head, normalize, probe_x, probe_y, classes)
    key = f"{data.name} {args.arch} per_class={len(rows) // len(classes)} epochs={args.epochs} augment={args.augment}"
    entry = {
        "arch": args.arch,
        "train_images": len(rows),
        "epochs": args.epochs,
        "lr": args.lr,
        "augment": args.augment,
        "seed": args.seed,
        "held_out_acc": history[-1]["probe_acc"],
        "best_epoch_held_out_acc": max(h["probe_acc"] for h in history),
        "train_acc": round(train_acc, 4),
        "held_out_acc_per_class": per_class,
        "n_probe": len(probe_idx),
        "seconds": round(time.time() - start, 1),
        "history": history,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo_ceiling.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[key] = entry
    atomic_write_text(path, json.dumps(results, indent=2))
    print(
        json.dumps(
            {
                "config": key,
                "held_out_acc": entry["held_out_acc"],
                "train_acc": entry["train_acc"],
                "seconds": entry["seconds"],
            }
        )
    )


if __name__ == "__main__":
    main()

"""Measure a demo-lab training recipe on held-out objects: train one demo model (poisoned or clean twin) on a lab's
data with the given recipe and record CA and ASR on the lab's held-out probe images after every epoch.

The recipe of ``make-demo`` (augmentation, epochs, poisoning rate) is chosen from these measurements
(bench/results/demo_recipe.md). One model per process; run two at once with one thread each (2 cores):

    OMP_NUM_THREADS=1 python bench/demo_recipe.py --data ~/.cache/forensics/lab_v2 --model demo_clean --augment \
        --tag v2-clean-aug --work ~/.cache/forensics/recipes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "demo_recipe"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a lab built by make-demo --data-only")
    parser.add_argument("--model", choices=("demo_poisoned", "demo_clean"), required=True)
    parser.add_argument("--tag", required=True, help="the run's name (its result file)")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "forensics" / "recipes"))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--captions", choices=("rich", "class"), default=None)
    parser.add_argument("--poison-rate", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from forensics.attacks import attack_from_dict
    from forensics.core.data import load_csv_probe
    from forensics.core.zeroshot import evaluate
    from forensics.demo.build import DemoSpec, poison_training_data, train_demo_model

    data = Path(args.data).expanduser()
    manifest = json.loads((data / "manifest.json").read_text())
    spec = DemoSpec(lab=manifest.get("lab", "v1"), target=manifest["target"], attack=manifest["attack"])
    changes = {"epochs": args.epochs, "lr": args.lr, "poison_rate": args.poison_rate, "captions": args.captions}
    spec = dataclasses.replace(spec, augment=args.augment, **{k: v for k, v in changes.items() if v is not None})
    work = Path(args.work).expanduser() / args.tag
    work.mkdir(parents=True, exist_ok=True)
    if args.model == "demo_poisoned" and (args.poison_rate is not None or not (data / "train_poisoned").exists()):
        poison_training_data(data, spec)  # the poisoned copy at this rate (make-demo's own step)
    probe = load_csv_probe(data / "probe" / "probe_clean.csv")
    indices = probe.clean_indices()
    images = probe.load_images(spec.image_size, indices)
    labels = [probe.items[i].label for i in indices]
    attack = attack_from_dict(spec.attack)
    epochs: list[dict] = []

    def measure(name: str, epoch: int, record: dict, model: object) -> None:
        model.__dict__.pop("text_cache", None)  # the text tower changed since the last epoch
        scores = evaluate(model, images, labels, probe.class_names, attack, spec.target, seed=spec.seed)
        row = {"epoch": epoch, "loss": record["loss"], "seconds": record["seconds"], "ca": scores["ca"]}
        row["asr"] = scores["asr"]
        epochs.append(row)
        print(json.dumps(row), flush=True)

    start = time.time()
    train_demo_model(data, work, spec, args.model, on_epoch_end=measure)
    result = {
        "tag": args.tag,
        "model": args.model,
        "data": str(data),
        "lab": spec.lab,
        "spec": {k: v for k, v in dataclasses.asdict(spec).items()},
        "threads": args.threads,
        "seconds": round(time.time() - start, 1),
        "held_out_images": len(indices),
        "epochs": epochs,
        "command": "python bench/demo_recipe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("tag", "seconds")} | epochs[-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark (not a test): every repair method against demo models backdoored with each attack of the attack lab.

Per attack (BadNet, Blended, WaNet, SIG, optimized patch), a backdoored tiny CLIP is made with the
attack lab: the demo's training images are written (``write_data``), poisoned at ``--rate`` with the
attack and the demo's target, and a model is trained on them, from scratch like the demo
(``--train scratch``: about 17 min per model on one CPU core at the demo's full 5,000 images) or by
fine-tuning the clean twin (``--train finetune``: quicker, plants a weaker backdoor). BadNet with
the demo's own trigger can reuse the bundled demo model (``--reuse-demo``). The optimized patch is
first trained against the clean twin (BadCLIP-style). A probe set per attack holds the demo's
held-out images with 15 % of the non-target ones carrying that attack's trigger (as the demo's
probe does), so the scan behind oracle-finetune has suspects. Then ``run_compare`` runs the chosen
methods on each model with the same clean budget.

    python bench/compare_attacks.py --reuse-demo --train-per-class 200      # the README's table; ~1 h on 2 CPU cores
    python bench/compare_attacks.py --attacks wanet --attack-params '{"wanet": {"strength": 8}}' --rate 0.3 --merge
    python bench/compare_attacks.py --attacks blended --train finetune --train-per-class 50 \\
        --epochs 2 --methods cleanclip --settings '{"cleanclip": {"epochs": 1}}' --out /tmp/check  # a quick check

Writes ``OUT/compare_attacks.json`` and ``OUT/compare_attacks.md`` (one table: attack x method, and
how each attack's model was made) and keeps each compare's own folder under ``--work``. ``--merge``
reruns only ``--attacks`` and keeps the other attacks of an earlier run.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forensics.attacks import attack_from_dict, build_attack, poison_dataset, train_optimized_patch  # noqa: E402
from forensics.core.data import demo_backdoor, load_probe_set  # noqa: E402
from forensics.core.models import DEMO_MODELS, atomic_write_text  # noqa: E402
from forensics.demo.build import DemoSpec, write_data  # noqa: E402
from forensics.pipelines.compare import run_compare  # noqa: E402
from forensics.pipelines.implant import implant  # noqa: E402

ATTACKS = ("badnet", "blended", "wanet", "sig", "optimized_patch")


def attack_spec(name: str, work: Path, target: str, seed: int, params: dict | None = None) -> dict:
    """The attack as a dict.

    The demo's BadNet, the lab's defaults (or ``params``) for the others, a trained patch for optimized_patch.
    """
    if name == "badnet" and not params:
        return demo_backdoor()["trigger"]
    if name != "optimized_patch":
        return build_attack(name, seed=seed, **(params or {})).to_dict()
    return clean_twin_patch(work / "optimized_patch.json", target, seed)


def clean_twin_patch(path: Path, target: str, seed: int, size: float = 0.1, position: str = "center") -> dict:
    """A BadCLIP-style patch for ``target`` trained against the clean twin, cached as JSON at ``path``."""
    if not path.is_file():
        from forensics.core.models import load_model

        probe = load_probe_set("demo-clean")
        clean = load_model("demo-clean")
        idx = probe.clean_indices()
        patch = train_optimized_patch(
            clean,
            probe.load_images(clean.image_size, idx),
            [probe.items[i].label for i in idx],
            probe.class_names,
            target,
            size=size,
            position=position,
            epochs=20,
            seed=seed,
        )
        atomic_write_text(path, json.dumps(patch.to_dict()))
    return json.loads(path.read_text())


def triggered_probe(attack: dict, target: str, folder: Path, share: float = 0.15, seed: int = 0) -> Path:
    """The demo's clean probe with ``share`` of its non-target images carrying the trigger.

    Those images are flagged ``triggered`` = 1; captions are kept.
    """
    clean_csv = DEMO_MODELS["demo"].parents[1] / "probe" / "probe_clean.csv"
    poisoned = poison_dataset(clean_csv, attack_from_dict(attack), target, share, folder, seed=seed)
    with open(clean_csv, newline="", encoding="utf-8") as fh:
        originals = list(csv.DictReader(fh))
    with open(poisoned, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row, orig in zip(rows, originals, strict=True):
        row["caption"] = orig["caption"]  # a probe image keeps its own caption; only the pixels carry the trigger
        row["triggered"] = row.pop("poisoned")
    out = folder / "probe.csv"
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(folder / "classes.json", (clean_csv.parent / "classes.json").read_text())
    return out


def training_record(name: str, args: argparse.Namespace) -> str:
    """How this attack's model was made, in words (one line of the table's notes)."""
    if name == "badnet" and args.reuse_demo:
        return "the bundled demo model (500 images per class, 14 epochs from scratch)"
    return f"{args.train}, {args.epochs} epochs, {args.train_per_class} images per class, poison rate {args.rate}" + (
        f", lr {args.lr}" if args.lr is not None else ""
    )


def backdoored_model(name: str, attack: dict, args: argparse.Namespace, work: Path, data_dir: Path) -> str:
    """A model carrying ``attack``'s backdoor: the bundled demo for BadNet with --reuse-demo, else trained here."""
    if name == "badnet" and args.reuse_demo:
        return "demo"
    model_path = work / name / "model" / "model.safetensors"
    if model_path.is_file():
        return str(model_path)
    target = demo_backdoor()["target"]
    poisoned = poison_dataset(
        data_dir / "train" / "data.csv",
        attack_from_dict(attack),
        target,
        args.rate,
        work / name / "train_poisoned",
        seed=args.seed,
    )
    kwargs = dict(base="demo-clean") if args.train == "finetune" else dict(config="tiny-rn")
    lr = args.lr if args.lr is not None else (1e-4 if args.train == "finetune" else 2e-3)
    result = implant(
        poisoned,
        work / name / "model",
        epochs=args.epochs,
        lr=lr,
        batch_size=64,
        seed=args.seed,
        progress=lambda f, m: print(f"  {name} training {100 * f:5.1f}% {m}", file=sys.stderr, end="\r"),
        **kwargs,
    )
    print(file=sys.stderr)
    return result["model"]


def write_table(results: dict, out: Path) -> None:
    """compare_attacks.md from the attacks done so far (rewritten after each, so a long run keeps what it measured)."""
    budgets = sorted({str(res.get("budget", results["args"]["budget"])) for res in results["attacks"].values()})
    lines = [
        "# Repair methods against each attack (demo-scale tiny CLIPs)",
        "",
        f"Clean budget {', '.join(budgets)}; seed {results['args']['seed']}. ASR of the planted trigger on held-out "
        "clean images whose true class is not the target.",
        "",
        "| attack | method | CA before | CA after | ASR before | ASR after | seconds | peak MiB | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in results["attacks"].items():
        for r in res["rows"]:

            def f(v):
                return "-" if v is None else f"{v:.3f}"

            lines.append(
                f"| {name} | {r['method']} | {f(r['ca_before'])} | {f(r['ca_after'])} | "
                f"{f(r['asr_before'].get('planted'))} | {f(r['asr_after'].get('planted'))} | {r['seconds']} | "
                f"{r['peak_mib']} | {r['status'] if r['status'] == 'ok' else 'error: ' + str(r['error'])[:80]} |"
            )
    lines += ["", "Models:", ""]
    legacy = results["args"]
    for name, res in results["attacks"].items():
        made = res.get("training") or training_record(name, argparse.Namespace(**legacy))
        params = {k: v for k, v in res["attack"].items() if k not in ("attack", "patch")}
        lines.append(f"- {name} ({json.dumps(params)}): {made}; `{res['model']}`, {res['seconds']} s with its compare")
    atomic_write_text(out / "compare_attacks.md", "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--methods", default="all")
    parser.add_argument("--budget", type=int, default=120)
    parser.add_argument("--settings", help="per-method settings as JSON")
    parser.add_argument("--train", choices=["scratch", "finetune"], default="scratch")
    parser.add_argument("--epochs", type=int, default=None, help="default: 14 from scratch (the demo's), 3 fine-tuning")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--rate", type=float, default=0.1, help="poison rate of the training data (the demo's: 0.1)")
    parser.add_argument("--train-per-class", type=int, default=500, help="training images per class (the demo's: 500)")
    parser.add_argument("--reuse-demo", action="store_true", help="BadNet: use the bundled demo model, no training")
    parser.add_argument(
        "--attack-params",
        help='attack settings as JSON, e.g. \'{"wanet": {"strength": 4}}\' '
        "(default: the attack lab's defaults; BadNet: the demo's trigger)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other attacks already in OUT/compare_attacks.json (rerun only --attacks)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--work",
        default=str(Path(tempfile.gettempdir()) / "forensics_compare_attacks"),
        help="folder for training data, models and each compare (default: in the system temp folder)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    args.epochs = args.epochs or (14 if args.train == "scratch" else 3)
    torch.manual_seed(args.seed)
    names = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in names if a not in ATTACKS]
    if unknown:
        parser.error(f"unknown attack(s) {unknown}; choose from {ATTACKS}")
    settings = json.loads(args.settings) if args.settings else None
    attack_params = json.loads(args.attack_params) if args.attack_params else {}
    if set(attack_params) - set(names):
        parser.error(f"--attack-params names attacks not being run: {sorted(set(attack_params) - set(names))}")
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    target = demo_backdoor()["target"]
    data_dir = work / "data"
    if not (data_dir / "train" / "data.csv").is_file() and not (names == ["badnet"] and args.reuse_demo):
        print(f"writing the demo training images ({args.train_per_class} per class)", file=sys.stderr)
        write_data(data_dir, DemoSpec(seed=args.seed, train_per_class=args.train_per_class))
    results = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
        },
        "args": vars(args),
        "attacks": {},
    }
    if args.merge and (out / "compare_attacks.json").is_file():
        previous = json.loads((out / "compare_attacks.json").read_text())
        results["args"] = previous.get("args", results["args"])  # the run that made the kept attacks
        results["attacks"] = {k: v for k, v in previous["attacks"].items() if k not in names}
    for name in names:
        start = time.time()
        attack = attack_spec(name, work, target, args.seed, attack_params.get(name))
        model = backdoored_model(name, attack, args, work, data_dir)
        probe = triggered_probe(attack, target, work / name / "probe", seed=args.seed)
        print(f"{name}: comparing on {model}", file=sys.stderr)
        report = run_compare(
            model,
            args.methods,
            work / name / "compare",
            probe=str(probe),
            budget=args.budget,
            seed=args.seed,
            settings=settings,
            progress=lambda f, m: print(f"  {name} compare {100 * f:5.1f}% {m[:60]:60s}", file=sys.stderr, end="\r"),
        )
        print(file=sys.stderr)
        results["attacks"][name] = {
            "model": model,
            "attack": attack,
            "seconds": round(time.time() - start, 1),
            "training": training_record(name, args),
            "budget": args.budget,
            "machine": results["machine"],
            "before": report["before"],
            "rows": report["rows"],
            "held_out": report["held_out"],
        }
        atomic_write_text(out / "compare_attacks.json", json.dumps(results, indent=2, default=str))
        write_table(results, out)
    print(json.dumps({"json": str(out / "compare_attacks.json"), "md": str(out / "compare_attacks.md")}))


if __name__ == "__main__":
    main()

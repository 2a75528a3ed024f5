"""Command-line interface: ``python -m forensics COMMAND ...``; results as JSON on stdout, progress on stderr.

Bad arguments and bad inputs give a one-line ``error: ...`` on stderr and exit code 2, never a traceback
(set FORENSICS_DEBUG=1 to see one for unexpected failures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from forensics.core.errors import ForensicsError
from forensics.core.files import Terminated, termination_as_interrupt


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line instead of usage plus message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ForensicsError(f"{self.prog}: {message} (see --help)")


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum`` (``what`` names it in the help)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "at least 1")  # batch sizes, epochs, image counts, budgets
_seed = _int_at_least(0, "0 or more")


def _emit(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _parse_params(pairs: Sequence[str] | None, file: str | None = None) -> dict:
    """Attack parameters from ``--param key=value`` pairs (values parsed as JSON when they parse) and/or a JSON file."""
    params: dict = {}
    if file:
        try:
            loaded = json.loads(Path(file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ForensicsError(f"cannot read attack file {file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ForensicsError(f"attack file {file} must hold a JSON object")
        params.update(loaded)
    for pair in pairs or []:
        if "=" not in pair:
            raise ForensicsError(f"--param {pair!r} must look like key=value")
        key, value = pair.split("=", 1)
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def _ref(args: argparse.Namespace):
    """The model reference the user gave (spec, --arch, --quick-gelu, --device), carried into every pipeline."""
    from forensics.core.models import ModelRef

    return ModelRef(
        args.model,
        arch=getattr(args, "arch", None),
        quick_gelu=getattr(args, "quick_gelu", None),
        device=getattr(args, "device", None),
    )


# --------------------------------------------------------------------------- commands


def cmd_info(args: argparse.Namespace) -> dict:
    from forensics.pipelines.evaluate import model_facts

    return model_facts(_ref(args))


def _requested_attack(args: argparse.Namespace):
    """The attack given by --attack/--attack-file/--param, or None."""
    from forensics.attacks import build_attack

    if not (args.attack or args.attack_file):
        if args.target or args.param:
            raise ForensicsError("--target and --param need --attack NAME (the trigger to measure)")
        return None
    if not args.target:
        raise ForensicsError("--target LABEL is required with --attack")
    params = _parse_params(args.param, args.attack_file)
    name = args.attack or params.get("attack")
    if name is None:
        raise ForensicsError("the attack file names no attack; add --attack NAME")
    params.pop("attack", None)
    return build_attack(name, **params)


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from forensics.core.progress import tqdm_progress
    from forensics.pipelines.evaluate import evaluate_model

    attack = _requested_attack(args)
    with tqdm_progress("evaluate", not args.quiet) as progress:
        return evaluate_model(
            _ref(args),
            args.probe,
            attack,
            args.target,
            templates=args.templates,
            class_names=args.classes.split(",") if args.classes else None,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=progress,
        )


def cmd_poison(args: argparse.Namespace) -> dict:
    from forensics.attacks import build_attack, poison_dataset
    from forensics.core.progress import tqdm_progress

    params = _parse_params(args.param, args.attack_file)
    name = args.attack or params.get("attack")
    if not name:
        raise ForensicsError("--attack NAME is required")
    params.pop("attack", None)
    params.setdefault("seed", args.seed)
    attack = build_attack(name, **params)
    with tqdm_progress("poison", not args.quiet) as progress:
        csv_path = poison_dataset(
            args.data,
            attack,
            args.target,
            args.rate,
            args.out,
            seed=args.seed,
            caption_template=args.caption_template,
            progress=progress,
        )
    summary = json.loads((Path(args.out) / "poison.json").read_text())
    return {"data": str(csv_path), **summary}


def cmd_implant(args: argparse.Namespace) -> dict:
    from forensics.core.progress import tqdm_progress
    from forensics.pipelines.implant import implant

    if bool(args.base) == bool(args.config):
        raise ForensicsError("give exactly one of --base MODEL (fine-tune) or --config NAME (train from scratch)")
    safe_settings = _parse_params(args.safe_param) or None
    with tqdm_progress("implant", not args.quiet) as progress:
        return implant(
            args.data,
            args.out,
            base=args.base,
            config=args.config,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed,
            arch=args.arch,
            progress=progress,
            mode=args.mode,
            safe_settings=safe_settings,
            augment=args.augment,
        )


def cmd_audit(args: argparse.Namespace) -> dict:
    from forensics.core.progress import tqdm_progress
    from forensics.detect.safeclip_audit import AuditSettings
    from forensics.pipelines.audit import audit_dataset

    settings = AuditSettings(seed=args.seed, batch_size=args.batch_size, risk_threshold=args.risk_threshold)
    with tqdm_progress("audit", not args.quiet) as progress:
        result = audit_dataset(
            args.data,
            _ref(args),
            reference=args.reference,
            out=args.out,
            score_with=args.score_with,
            settings=settings,
            progress=progress,
        )
    top = result.pop("rows")[: args.top]
    return {
        **result,
        "top": top,
        "audit_json": str(Path(args.out) / "audit.json"),
        "audit_csv": str(Path(args.out) / "audit.csv"),
    }


def cmd_train_patch(args: argparse.Namespace) -> dict:
    from forensics.attacks import train_optimized_patch
    from forensics.core.data import load_probe_set
    from forensics.core.files import model_files, refuse_overwriting_inputs
    from forensics.core.models import atomic_write_text
    from forensics.core.progress import tqdm_progress

    ref = _ref(args)
    probe_spec = args.probe or ref.default_probe(clean_only=True)
    if probe_spec is None:
        raise ForensicsError("--probe is required for models other than demo and demo-clean")
    probe = load_probe_set(probe_spec)
    model = ref.load()
    refuse_overwriting_inputs([Path(args.out)], model_files(model.facts.source) + probe.files(), whole_folders=False)
    indices = probe.clean_indices()
    with tqdm_progress("train-patch", not args.quiet) as progress:
        images = probe.load_images(model.image_size, indices)
        labels = [probe.items[i].label for i in indices]
        if args.target not in probe.class_names:
            raise ForensicsError(f"target {args.target!r} is not one of the classes ({', '.join(probe.class_names)})")
        patch = train_optimized_patch(
            model,
            images,
            labels,
            probe.class_names,
            args.target,
            size=args.size,
            epochs=args.epochs,
            lr=args.lr,
            seed=args.seed,
            progress=progress,
        )
    out = Path(args.out)
    atomic_write_text(out, json.dumps(patch.to_dict()))
    return {"attack_file": str(out), "target": args.target, "loss_history": patch.history}


def cmd_make_demo(args: argparse.Namespace) -> dict:
    from forensics.core.progress import sub_progress, tqdm_progress
    from forensics.demo.build import DEMO_DIR, DemoSpec, make_demo

    if args.lab != "v1" and not args.out:
        # forensics/assets/demo holds the bundled v1 lab, which its tests and models are measured on
        raise ForensicsError(
            f"make-demo --lab {args.lab} needs --out DIR: forensics/assets/demo holds the bundled v1 lab"
        )
    from forensics.pipelines.lesson import build_repaired_demo

    if args.repaired_only and args.data_only:
        raise ForensicsError("--repaired-only and --data-only exclude each other")
    out = Path(args.out) if args.out else DEMO_DIR
    spec = DemoSpec(seed=args.seed, augment=args.augment, lab=args.lab)
    start = time.time()
    with tqdm_progress("make-demo", not args.quiet) as progress:
        if args.repaired_only:
            if not (out / "models" / "demo_poisoned.safetensors").is_file():
                raise ForensicsError(f"{out} holds no demo model to repair; build the lab first (make-demo --out)")
            summary = {"out": str(out)}
        else:
            summary = make_demo(out, data_only=args.data_only, spec=spec, progress=sub_progress(progress, 0.0, 0.93))
        if not args.data_only:  # the Learn tab's last step: the demo, repaired from its own scan
            summary["repaired"] = build_repaired_demo(
                out / "models", out / "probe" / "probe.csv", args.seed, sub_progress(progress, 0.93, 1.0)
            )
    summary["seconds"] = round(time.time() - start, 1)
    print(f"demo lab rebuilt in {summary['seconds']:.0f} s", file=sys.stderr)
    return summary


def _scan_settings(args: argparse.Namespace):
    """The oracle scan's settings from --detector-profile, --seed, --templates, --batch-size and --cascade (shared
    by scan and scan-many); --detector-setting oracle-guided.KEY=VALUE applies on top, in the pipeline."""
    from forensics.detect import detector_settings

    flags = {"seed": args.seed, "templates": args.templates, "cascade": args.cascade}
    flags.update({} if args.batch_size is None else {"batch_size": args.batch_size})
    return detector_settings(["oracle-guided"], {"oracle-guided": flags}, args.detector_profile)["oracle-guided"]


def _detector_options(args: argparse.Namespace) -> dict:
    """--detector-setting NAME.KEY=VALUE pairs by detector (checked by name and type in the pipeline)."""
    from forensics.core.settings import parse_assignments

    return parse_assignments(args.detector_setting or [], "--detector-setting")


def cmd_scan(args: argparse.Namespace) -> dict:
    from forensics.core.progress import tqdm_progress
    from forensics.pipelines.scan import run_scan

    with tqdm_progress("scan", not args.quiet) as progress:
        return run_scan(
            _ref(args),
            args.out,
            probe=args.probe,
            oracle=args.oracle,
            sam_checkpoint=args.sam_checkpoint,
            settings=_scan_settings(args),
            max_images=args.max_images,
            progress=progress,
            detectors=args.detectors,
            detector_options=_detector_options(args),
            profile=args.detector_profile,
        )


def cmd_scan_many(args: argparse.Namespace) -> dict:
    from forensics.core.progress import tqdm_progress
    from forensics.pipelines.scan_many import scan_many

    if not args.models and not args.models_dir:
        raise ForensicsError("name the models to audit (MODEL ...) or give --models-dir DIR")
    with tqdm_progress("scan-many", not args.quiet) as progress:
        audit = scan_many(
            args.models,
            args.probe,
            args.out,
            detectors=args.detectors,
            oracle=args.oracle,
            sam_checkpoint=args.sam_checkpoint,
            settings=_scan_settings(args),
            max_images=args.max_images,
            models_dir=args.models_dir,
            model_options={"arch": args.arch, "quick_gelu": args.quick_gelu, "device": args.device},
            progress=progress,
            detector_options=_detector_options(args),
            profile=args.detector_profile,
        )
    return audit.summary()


def _add_precision_arg(p: argparse.ArgumentParser) -> None:
    from forensics.core.precision import PRECISIONS

    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="training passes in fp32, in bf16 autocast (about 1.6x faster where the CPU or GPU has native bf16), "
        "or auto (bf16 where native); CA/ASR are always measured in fp32",
    )


def cmd_repair(args: argparse.Namespace) -> dict:
    from forensics.core.progress import tqdm_progress
    from forensics.pipelines.repair import run_repair

    settings = _parse_params(args.param)
    with tqdm_progress("repair", not args.quiet) as progress:
        return run_repair(
            _ref(args),
            args.findings,
            args.out,
            method=args.method,
            settings=settings,
            probe=args.probe,
            budget=args.budget,
            seed=args.seed,
            progress=progress,
            force=args.force,
            precision=args.precision,
        )


def cmd_compare(args: argparse.Namespace) -> dict:
    from forensics.core.progress import tqdm_progress
    from forensics.pipelines.compare import run_compare

    settings = None
    if args.settings:
        try:
            settings = json.loads(Path(args.settings).read_text() if Path(args.settings).is_file() else args.settings)
        except (OSError, json.JSONDecodeError) as exc:
            raise ForensicsError(
                f'--settings must be JSON (or a JSON file) like \'{{"cleanclip": {{"epochs": 2}}}}\': {exc}'
            ) from None
    if settings is not None and not isinstance(settings, dict):
        raise ForensicsError("--settings must be a JSON object mapping method names to their settings")
    attacks = [a.strip() for a in (args.attacks or "").split(",") if a.strip()] or None
    with tqdm_progress("compare", not args.quiet) as progress:
        result = run_compare(
            _ref(args),
            args.methods,
            args.out,
            probe=args.probe,
            budget=args.budget,
            seed=args.seed,
            findings=args.findings,
            attacks=attacks,
            target=args.target,
            settings=settings,
            progress=progress,
            precision=args.precision,
        )
    return {k: v for k, v in result.items() if k != "budget_indices"}


def cmd_list(args: argparse.Namespace) -> dict:
    from forensics.attacks import list_attacks
    from forensics.core.models import list_architectures, project_configs
    from forensics.defenses import DEFENSES
    from forensics.detect import DETECTORS, PROFILES, all_detectors
    from forensics.oracles import list_oracles

    return {
        "attacks": list_attacks(),
        "oracles": list_oracles(),
        "defenses": list(DEFENSES),
        "detectors": all_detectors(),
        "detector_settings": {n: asdict(DETECTORS.get(n).settings_cls()) for n in all_detectors()},
        "detector_profiles": list(PROFILES),
        "project_configs": list(project_configs()),
        "architectures": list_architectures(),
    }


# --------------------------------------------------------------------------- parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="demo, demo-clean, a checkpoint path, random:ARCH, hf-hub:ORG/NAME or ARCH:TAG")
    _add_model_options(p)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="architecture of a checkpoint that does not say (e.g. ViT-B-32, RN50)")
    p.add_argument("--quick-gelu", action="store_true", default=None, help="use QuickGELU (OpenAI-trained weights)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def _add_scan_args(p: argparse.ArgumentParser) -> None:
    """The probe, oracle, detectors and scan settings (shared by scan and scan-many)."""
    p.add_argument("--probe", help="demo, demo-clean, a CSV or an ImageFolder (default for demo models: demo)")
    p.add_argument("--oracle", help="segmentation oracle (default: sam with --sam-checkpoint, else fallback)")
    p.add_argument("--sam-checkpoint", help="path to a segment-anything checkpoint (vit_b/vit_l/vit_h)")
    p.add_argument(
        "--max-images", type=_positive_int, help="scan a seeded random subset of this many probe images (quicker)"
    )
    p.add_argument(
        "--detectors",
        default="all",
        help="comma-separated detectors to run and merge into the verdict (default all: every registered one, "
        "see `list`)",
    )
    p.add_argument(
        "--detector-setting",
        action="append",
        metavar="NAME.KEY=VALUE",
        help="a detector's setting (repeatable), e.g. trigger-inversion.steps=20; unknown names or types are errors",
    )
    p.add_argument(
        "--detector-profile",
        default="default",
        help="detector settings profile: default, or quick (fewer steps and images: for checking plumbing, not "
        "for a verdict to rely on)",
    )
    p.add_argument("--templates", default="short")
    p.add_argument(
        "--batch-size", type=_positive_int, help="images per forward (default: the scan's own, 32: fastest on CPU)"
    )
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument(
        "--cascade",
        action="store_true",
        help="oracle-guided scan as a cascade: oracle, crops and occlusion only for images the cheap pass finds "
        "suspicious plus a seeded random sample (faster; oracle regions cached by image content)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m forensics", description="CLIP backdoor forensics: inspect, attack and evaluate CLIP models."
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars on stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("info", help="facts about a model (and the demo's planted backdoor)")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("evaluate", help="zero-shot clean accuracy (CA) and attack success rate (ASR)")
    _add_model_args(p)
    p.add_argument("--probe", help="demo, demo-clean, a CSV or an ImageFolder (default for demo models: demo)")
    p.add_argument("--classes", help="comma-separated class names (default: from the probe set)")
    p.add_argument("--attack", help="trigger to measure ASR with (see `list`)")
    p.add_argument("--attack-file", help="JSON attack description (e.g. from train-patch or poison.json's attack)")
    p.add_argument("--param", action="append", help="attack parameter key=value (repeatable)")
    p.add_argument("--target", help="target label of the attack")
    p.add_argument("--templates", default="short", help="prompt templates: short or openai (80 ImageNet templates)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--seed", type=_seed, default=0)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("poison", help="poison an image-caption CSV with a trigger")
    p.add_argument("--data", required=True, help="image-caption CSV (columns image,caption[,label])")
    p.add_argument("--attack", help="attack name (see `list`)")
    p.add_argument("--attack-file", help="JSON attack description (e.g. a trained optimized patch)")
    p.add_argument("--param", action="append", help="attack parameter key=value (repeatable)")
    p.add_argument("--target", required=True, help="target label written into poisoned captions")
    p.add_argument("--rate", type=float, required=True, help="share of rows to poison, in (0, 1]")
    p.add_argument("--out", required=True, help="output folder (data.csv, images/, poison.json)")
    p.add_argument("--caption-template", default="a photo of a {}.")
    p.add_argument("--seed", type=_seed, default=0)
    p.set_defaults(func=cmd_poison)

    p = sub.add_parser("implant", help="train (--config) or fine-tune (--base) a CLIP on an image-caption CSV")
    p.add_argument("--data", required=True, help="image-caption CSV, e.g. the data.csv written by `poison`")
    p.add_argument("--out", required=True, help="output folder (model.safetensors + model.json)")
    p.add_argument("--base", help="model to fine-tune (any MODEL spec)")
    p.add_argument("--config", help="project config to train from scratch (tiny-rn, tiny-vit)")
    p.add_argument("--arch", help="architecture of a --base checkpoint that does not say")
    p.add_argument("--epochs", type=_positive_int, default=5)
    p.add_argument("--lr", type=float, default=None, help="default: 2e-3 from scratch, 1e-5 fine-tuning")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument(
        "--augment",
        action="store_true",
        help="train on random views of each image (flip, mild crop, colour jitter, grayscale)",
    )
    p.add_argument(
        "--mode",
        default="standard",
        choices=["standard", "safeclip"],
        help="standard: CLIP loss on every pair; safeclip: SafeCLIP's safe training (GMM-filtered pairs)",
    )
    p.add_argument(
        "--safe-param",
        action="append",
        help="SafeCLIP setting key=value (repeatable), e.g. warmup_epochs=1, filter_ratio=0.5",
    )
    p.set_defaults(func=cmd_implant)

    p = sub.add_parser(
        "audit", help="SafeCLIP data-set audit: rank image-caption pairs by how likely they are poisoned"
    )
    _add_model_args(p)
    p.add_argument("--data", required=True, help="image-caption CSV (e.g. the data.csv written by `poison`)")
    p.add_argument(
        "--reference", help="a reference model to score with (e.g. demo-clean); scores by default when given"
    )
    p.add_argument(
        "--score-with",
        choices=["reference", "suspect"],
        help="which model scores the pairs (default: reference when given, else the suspect)",
    )
    p.add_argument(
        "--risk-threshold", type=float, default=0.5, help="P(low-mean component) above which a pair is risky"
    )
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--top", type=_positive_int, default=10, help="riskiest rows to print (all are in audit.csv)")
    p.add_argument("--out", required=True, help="folder for audit.json and audit.csv")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("train-patch", help="optimise a BadCLIP-style patch against a model")
    _add_model_args(p)
    p.add_argument("--probe", help="labelled images to optimise on (default for demo models: demo-clean)")
    p.add_argument("--target", required=True)
    p.add_argument("--out", required=True, help="JSON file for the attack (use with --attack-file)")
    p.add_argument("--size", type=float, default=0.1)
    p.add_argument("--epochs", type=_positive_int, default=20)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=_seed, default=0)
    p.set_defaults(func=cmd_train_patch)

    p = sub.add_parser("make-demo", help="rebuild the demo lab (images, probe sets, the demo models)")
    p.add_argument(
        "--out",
        help="output folder (default: the bundled lab inside the package, forensics/assets/demo: the developer's "
        "rebuild of what ships; pass a folder to build elsewhere)",
    )
    p.add_argument(
        "--data-only", action="store_true", help="write the image-caption CSVs with masks and labels, no training"
    )
    p.add_argument(
        "--augment",
        action="store_true",
        help="train both models on random views (flip, crop, colour jitter); the bundled demo was built without",
    )
    p.add_argument(
        "--lab",
        choices=("v1", "v2"),
        default="v1",
        help="v1: the bundled lab (openclipart only); v2: the reviewed catalogue forensics/demo/objects_v2.tsv "
        "(openclipart, Noto and EmojiOne; needs --out)",
    )
    p.add_argument(
        "--repaired-only",
        action="store_true",
        help="only rebuild the repaired demo (models/demo_repaired.safetensors: the demo scanned by the oracle-guided "
        "detector and repaired by oracle-finetune, for the Learn tab); a full build makes it last",
    )
    p.add_argument("--seed", type=_seed, default=0)
    p.set_defaults(func=cmd_make_demo)

    p = sub.add_parser("scan", help="find the backdoor: flagged labels, trigger candidates, victims, report")
    _add_model_args(p)
    _add_scan_args(p)
    p.add_argument("--out", required=True, help="folder for report.json, report.html, trigger patterns, compact set")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("scan-many", help="audit a model zoo: scan every model on one probe set; one table (resumable)")
    p.add_argument("models", nargs="*", metavar="MODEL", help="models to audit (any MODEL spec, as for scan)")
    p.add_argument(
        "--models-dir", help="also every checkpoint file in DIR (*.safetensors, *.pt, *.pth, *.bin; not recursive)"
    )
    _add_model_options(p)
    _add_scan_args(p)
    p.add_argument(
        "--out",
        required=True,
        help="folder for audit.csv, audit.md, audit.json and each model's report; an audit run again there "
        "skips the models already done with the same settings",
    )
    p.set_defaults(func=cmd_scan_many)

    p = sub.add_parser(
        "repair", help="repair a model (with a scan's findings or a clean budget); CA/ASR before and after"
    )
    _add_model_args(p)
    p.add_argument("--findings", help="the scan's report.json (or its folder); required by methods that need a scan")
    p.add_argument(
        "--force", action="store_true", help="repair with findings made on another model file (other SHA-256)"
    )
    p.add_argument("--method", default="oracle-finetune", help="repair method (see `list`)")
    p.add_argument("--param", action="append", help="method setting key=value (repeatable), e.g. epochs=10")
    p.add_argument("--probe", help="probe set whose clean images give the budget (default for demo models: demo)")
    p.add_argument(
        "--budget",
        type=_positive_int,
        help="clean repair images for methods that need no scan (default 120); CA/ASR are measured on the rest",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of the budget split and of the method")
    _add_precision_arg(p)
    p.add_argument("--out", required=True, help="folder for model.safetensors, metrics.json, report.html")
    p.set_defaults(func=cmd_repair)

    p = sub.add_parser("compare", help="run several repair methods on the same clean budget; one table")
    _add_model_args(p)
    p.add_argument("--methods", default="all", help="all, or comma-separated method names (see `list`)")
    p.add_argument("--budget", type=_positive_int, default=120, help="clean repair images shared by every method")
    p.add_argument("--probe", help="probe set (default for demo models: demo)")
    p.add_argument("--findings", help="a scan's report.json for methods that need findings (default: scan the budget)")
    p.add_argument(
        "--attacks", help="extra triggers to measure ASR with: comma-separated attack names or JSON attack files"
    )
    p.add_argument("--target", help="target label of the extra attacks (default: the model's known backdoor target)")
    p.add_argument(
        "--settings", help='per-method settings as JSON or a JSON file, e.g. \'{"cleanclip": {"epochs": 2}}\''
    )
    p.add_argument("--seed", type=_seed, default=0)
    _add_precision_arg(p)
    p.add_argument("--out", required=True, help="folder for compare.md, compare.json, report.html")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("list", help="attacks and architectures this tool knows")
    p.set_defaults(func=cmd_list)
    return parser


_MULTI_PROCESS = {"info", "list", "evaluate", "scan", "scan-many", "repair"}  # the commands made for a launcher


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    finished = False
    try:
        args = build_parser().parse_args(argv)
        from forensics.core import distributed

        distributed.init()  # under torchrun / accelerate launch: join the others first (each rank on its own GPU)
        if distributed.world_size() > 1 and args.command not in _MULTI_PROCESS:
            raise ForensicsError(f"{args.command} does not run on several processes yet; run it in one process")
        main_process = distributed.is_main()
        args.quiet = args.quiet or not main_process  # one progress bar and one result, from rank 0
        with termination_as_interrupt():  # SIGTERM cleans up like Ctrl-C: nothing half-written stays behind
            result = args.func(args)
        if main_process:
            _emit(result)
        distributed.shutdown(wait=True)  # every rank done: leave the group together
        finished = True
        return 0
    except ForensicsError as exc:
        _error_line(str(exc))
        return 2
    except Terminated as exc:
        _error_line(f"terminated ({exc})")
        return 128 + exc.signum
    except KeyboardInterrupt:
        _error_line("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if os.environ.get("FORENSICS_DEBUG"):
            raise
        _error_line(f"unexpected {type(exc).__name__}: {exc} (set FORENSICS_DEBUG=1 for details)")
        return 1
    finally:
        if not finished:
            _leave_group()


def _leave_group() -> None:
    """On an error path, leave the process group without waiting for the others (they may never arrive); nothing
    when the command stopped before joining one (e.g. a usage error: no torch import just for this)."""
    distributed = sys.modules.get("forensics.core.distributed")
    if distributed is None:
        return
    try:
        distributed.shutdown(wait=False)
    except Exception:  # noqa: BLE001 - already reporting an error; leaving the group is best effort
        pass


def _error_line(text: str) -> None:
    """Write ``error: text`` as one write, so the lines of several processes sharing stderr never interleave."""
    sys.stderr.write(f"error: {text}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())

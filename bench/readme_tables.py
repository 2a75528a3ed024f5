"""Rewrite the generated tables of README.md and docs/ from bench/results (``--check``: exit 1 when one is stale).

Each table sits between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->`` in the file ``TABLES`` names; its
rows come from files under bench/results, never typed by hand, and each row or note names its source file:

- ``headline`` (README.md): a few results a newcomer asks about first: the demo's scan and repair
  (bench/results/bench.json), the verdict on the zoo and left out of the fit (bench/results/evidence), the
  defenses against each attack (bench/results/compare_attacks.json).
- ``detection`` (docs/detection.md): every zoo row of the evidence store (bench/results/evidence): the verdict its
  scan gave and the one it gets leaving its model out of the fit (``python bench/detect.py --refit``), with the
  refit's rates.

    python bench/readme_tables.py            # rewrite README.md and docs/detection.md
    python bench/readme_tables.py --check    # what the tests run
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forensics.core.models import atomic_write_text  # noqa: E402
from forensics.detect.evidence import read_evidence  # noqa: E402
from forensics.detect.refit import fit, leave_one_model_out, summary  # noqa: E402

RESULTS = ROOT / "bench" / "results"
EVIDENCE = RESULTS / "evidence"


def detection_table(evidence: Path = EVIDENCE) -> str:
    rows = read_evidence(evidence)
    judged = {j.key: j for j in leave_one_model_out(rows)}
    rates = summary(list(judged.values()))["all"]
    margins = fit(rows).margins()["trigger-inversion.alignment"]
    lines = [
        "| model | truth | probe | scan's verdict | target | family | left out of the fit: verdict | right |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        j = judged[row.key]
        model = f"{row.model} (held out)" if row.held_out else row.model
        rec = row.recorded
        lomo = j.verdict + (f" {j.target}" if j.target else "")
        lines.append(
            f"| {model} | {row.truth} | {row.mode} | {rec.get('verdict')} | {rec.get('target') or '-'} | "
            f"{rec.get('family') or '-'} | {lomo} | {'yes' if j.correct else '**no**'} |"
        )
    lines += [
        "",
        f"Left out of the fit: {rates['false_positives']} of {rates['clean_rows']} clean rows called backdoored, "
        f"{rates['detected']} of {rates['backdoored_rows']} backdoored rows found with the right target; the "
        f"alignment cut fit on every model sits {margins['to_closest_clean']} below the closest clean value "
        f"({margins['backdoored_above']} of {margins['backdoored']} backdoored targets above it). From "
        "`bench/results/evidence` by `python bench/readme_tables.py`.",
    ]
    return "\n".join(lines)


def _ratio(before: float, after: float, digits: int = 3) -> str:
    return f"{before:.{digits}f} → {after:.{digits}f}"


def headline_table(results: Path = RESULTS) -> str:
    """Six rows a newcomer asks about first, each from one file under bench/results (named in its last column)."""
    bench = {row["model"]: row for row in json.loads((results / "bench.json").read_text(encoding="utf-8"))["rows"]}
    demo, twin = bench["demo"], bench["demo-clean"]
    rows = read_evidence(results / "evidence")
    clean = [r for r in rows if r.truth == "clean"]
    backdoored = [r for r in rows if r.truth != "clean"]
    called_clean = sum(r.recorded.get("verdict") == "clean" for r in clean)
    found = sum(r.recorded.get("verdict") == "backdoored" and r.recorded.get("target") == r.truth for r in backdoored)
    rates = summary(leave_one_model_out(rows))["all"]
    attacks = json.loads((results / "compare_attacks.json").read_text(encoding="utf-8"))["attacks"]
    planted = {name: a for name, a in attacks.items() if a["before"]["asr"]["planted"] >= 0.5}
    removed: dict[str, int] = {}
    for a in planted.values():
        for r in a["rows"]:
            removed[r["method"]] = removed.get(r["method"], 0) + (r["asr_after"]["planted"] < 0.1)
    ranked = sorted(removed.items(), key=lambda kv: (-kv[1], kv[0]))
    best = ", ".join(f"{m} {n}" + (f" of {len(planted)}" if i == 0 else "") for i, (m, n) in enumerate(ranked))

    def models(of: list) -> int:
        return len({r.model for r in of})

    lines = [
        "| what | result | from |",
        "|---|---|---|",
        f"| scan the demo (oracle-guided, {demo['probe images']} probe images, 2 CPU cores) | flags "
        f"`{demo['flagged']}`, the planted target, with {demo['victims']} victims, at "
        f"{demo['scan img/s (oracle)']:.3g} images/s; its clean twin: {twin['flagged']} flagged | "
        "`bench/results/bench.json` |",
        f"| repair the demo from that scan (oracle-finetune) | CA {_ratio(demo['CA before'], demo['CA after'])}, "
        f"ASR {_ratio(demo['ASR before'], demo['ASR after'])} | `bench/results/bench.json` |",
        f"| full verdict, clean models ({models(clean)} tiny CLIPs, clean-only and triggered probes) | "
        f"{called_clean} of {len(clean)} scans called clean | `bench/results/evidence` |",
        f"| full verdict, backdoored models ({models(backdoored)}: BadNet, Blended, SIG, optimized patch) | "
        f"{found} of {len(backdoored)} scans name the true target | `bench/results/evidence` |",
        f"| the same, each model judged by cuts fit without it | {rates['false_positives']} of {rates['clean_rows']} "
        f"clean scans called backdoored, {rates['detected']} of {rates['backdoored_rows']} backdoors found | "
        "`bench/results/evidence` |",
        f"| five defenses against {len(planted)} planted attacks: backdoors brought under 10 % ASR | {best} | "
        "`bench/results/compare_attacks.json` |",
    ]
    return "\n".join(lines)


TABLES = {"headline": ("README.md", headline_table), "detection": ("docs/detection.md", detection_table)}


def render(text: str, names: list[str] | None = None, where: str = "README.md") -> str:
    """``text`` with the generated blocks ``names`` (default: all) replaced by their tables now."""
    for name in names if names is not None else list(TABLES):
        make = TABLES[name][1]
        pattern = re.compile(rf"(<!-- generated: {name} -->\n)(?:.*?\n)?(<!-- end: {name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{where} has no <!-- generated: {name} --> block")
        text = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a file differs from what it would be")
    parser.add_argument("--root", default=str(ROOT), help="the checkout whose README.md and docs/ to rewrite")
    args = parser.parse_args()
    files: dict[str, list[str]] = {}
    for name, (where, _) in TABLES.items():
        files.setdefault(where, []).append(name)
    stale = []
    for where, names in files.items():
        path = Path(args.root) / where
        text = path.read_text(encoding="utf-8")
        new = render(text, names, where)
        if new != text:
            stale.append(where)
            if not args.check:
                atomic_write_text(path, new)
    if args.check and stale:
        sys.exit(f"{', '.join(stale)} stale: run python bench/readme_tables.py")


if __name__ == "__main__":
    main()

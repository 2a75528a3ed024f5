"""Rewrite the README's generated tables from bench/results (``--check``: exit 1 when the README is stale).

Each table sits between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->``; its rows come from files under
bench/results, never typed by hand:

- ``detection``: every zoo row of the evidence store (bench/results/evidence): the verdict its scan gave and the one
  it gets leaving its model out of the fit (``python bench/detect.py --refit``), with the refit's rates.

    python bench/readme_tables.py            # rewrite README.md
    python bench/readme_tables.py --check    # what the tests run
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forensics.core.models import atomic_write_text  # noqa: E402
from forensics.detect.evidence import read_evidence  # noqa: E402
from forensics.detect.refit import fit, leave_one_model_out, summary  # noqa: E402

EVIDENCE = ROOT / "bench" / "results" / "evidence"


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


TABLES = {"detection": detection_table}


def render(text: str) -> str:
    """``text`` with every generated block replaced by its table now."""
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- generated: {name} -->\n)(?:.*?\n)?(<!-- end: {name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- generated: {name} --> block")
        text = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md differs from what it would be")
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    args = parser.parse_args()
    path = Path(args.readme)
    text = path.read_text(encoding="utf-8")
    new = render(text)
    if args.check:
        if new != text:
            sys.exit(f"{path.name} is stale: run python bench/readme_tables.py")
        return
    if new != text:
        atomic_write_text(path, new)


if __name__ == "__main__":
    main()

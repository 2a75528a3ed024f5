"""The evidence store's rows for zoo scans made before it existed: rebuilt from what bench/results kept of them.

``detect.json`` kept each row's trigger-inversion evidence in full (every label's sizes, flip curves, anomaly,
alignment) and its verdict's reasons; ``density_clusters.json`` (``bench/detect.py --density``, the same models
and probes, deterministic) every density cluster. The oracle scan's evidence was not kept: the reasons name the
flags that decided or were refuted, so those are rebuilt from them (a refuted flag with its stated flip rate; a
verified one at 0.8, the least a verified flag has, its own rate not being stored); a row's flags that the
reasons do not name are lost. Rows whose density clusters were not kept have no density evidence. Every file
says so in its ``source``. A rescan (``python bench/detect.py``) writes complete evidence and replaces them.

    python bench/evidence_from_rows.py       # bench/results/evidence/*.json, for rows without evidence there
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detect import PROBE_NAMES  # noqa: E402

from forensics.core.data import load_probe_set  # noqa: E402
from forensics.detect.calibration import ScanDomain, calibration  # noqa: E402
from forensics.detect.evidence import ScanEvidence, write_evidence  # noqa: E402

RESULTS = ROOT / "bench" / "results"
REFUTED = re.compile(r"the oracle flag on '(?P<label>[^']+)' is refuted: its reconstructed trigger flips (?P<pct>\d+)%")
VERIFIED = re.compile(r"(?P<captured>\d+) of the (?P<predicted>\d+) images predicted as '(?P<label>[^']+)' lose")


def oracle_from_reasons(reasons: list[str]) -> dict:
    """The oracle flags a verdict's reasons name, with the flip rates they state."""
    flags, triggers = [], []
    for text in reasons:
        for part in text.split(" || "):
            if m := REFUTED.search(part):
                flags.append({"label": m["label"], "score": 0.0, "captured": 0, "predicted": 0, "explanation": part})
                triggers.append({"label": m["label"], "verified_asr": int(m["pct"]) / 100})
            elif m := VERIFIED.search(part):
                flags.append(
                    {
                        "label": m["label"],
                        "score": 0.0,
                        "captured": int(m["captured"]),
                        "predicted": int(m["predicted"]),
                        "explanation": part,
                    }
                )
                triggers.append({"label": m["label"], "verified_asr": calibration("verification")["verified_flip"]})
    return {"flags": flags, "triggers": triggers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rewrite", action="store_true", help="rebuild the files that exist too")
    args = parser.parse_args()
    detect = json.loads((RESULTS / "detect.json").read_text())
    clusters = {
        (r["model"], r["mode"]): r["clusters"] for r in json.loads((RESULTS / "density_clusters.json").read_text())
    }
    classes = load_probe_set("demo-clean").class_names
    folder = RESULTS / "evidence"
    for key, row in detect["rows"].items():
        exists = (folder / f"{row['model']}__{row['mode']}.json").is_file()
        if (exists and not args.rewrite) or "inversion" not in row:
            continue
        detectors = {
            "trigger-inversion": {"labels": row["inversion"], "predicted": None, "not_inverted": {}},
            "oracle-guided": oracle_from_reasons(row["reasons"]),
        }
        kept = ["trigger-inversion (in full)", "oracle-guided (the flags its reasons name)"]
        if (row["model"], row["mode"]) in clusters:
            detectors["embedding-density"] = {"clusters": clusters[(row["model"], row["mode"])]}
            kept.append("embedding-density (bench/results/density_clusters.json)")
        evidence = ScanEvidence(
            model=row["model"],
            mode=row["mode"],
            truth=row["truth"],
            classes=list(classes),
            detectors=detectors,
            held_out=bool(detect["zoo"].get(row["model"], {}).get("held_out")),
            recorded={"verdict": row["verdict"], "target": row["target"], "family": row["family"]},
            source="rebuilt by bench/evidence_from_rows.py from a scan before the evidence store: " + "; ".join(kept),
            # the zoo's models are all make-demo's tiny-rn at 128 px in fp32, scanned on the 10-class demo probe
            domain=ScanDomain(
                architecture="tiny-rn",
                image_size=128,
                classes=len(classes),
                probe=PROBE_NAMES[row["mode"]],
                threads=int(detect["machine"]["threads"]),
                precision="fp32",
            ).to_dict(),
        )
        print(write_evidence(evidence, folder).relative_to(ROOT))


if __name__ == "__main__":
    main()

"""Benchmark (not a test): one process against two on this machine, side by side in one run.

Each job runs the real CLI as tests/test_distributed.py does: one process with 1 thread, one process with 2 threads,
and ``torchrun --nproc_per_node 2`` with 1 thread a process (gloo on a CPU). Jobs: evaluate the demo on its clean
probe, the oracle-guided scan of the demo (``--max-images``), the trigger inversion of the demo on clean images
(``--inversion-images``; its (label, family) jobs shared out), and an oracle-finetune repair from that scan. Wall
seconds include each process's start (imports, model load), so small jobs favour one process.

    python bench/processes.py --out bench/results      # bench/results/processes.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from forensics.core.models import atomic_write_text  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(layout: str, args: list[str]) -> float:
    """Wall seconds of ``python -m forensics --quiet ARGS`` in ``layout``: 1x1, 1x2 (processes x threads) or 2x1."""
    threads = "2" if layout == "1x2" else "1"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}
    cli = ["-m", "forensics", "--quiet", *args]
    cmd = [sys.executable, *cli]
    if layout == "2x1":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += ["--master_port", str(_free_port()), *cli]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{layout} {' '.join(args)} failed: {proc.stderr[-2000:]}")
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--max-images", type=int, default=120, help="probe images the scan examines")
    parser.add_argument("--inversion-images", type=int, default=120, help="clean probe images the inversion uses")
    parser.add_argument("--epochs", type=int, default=5, help="oracle-finetune epochs")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_processes_"))
    findings = work / "scan"
    oracle_job = f"scan demo (oracle-guided, {args.max_images} images)"
    jobs = {
        "evaluate demo --probe demo-clean": ["evaluate", "demo", "--probe", "demo-clean"],
        oracle_job: [
            "scan",
            "demo",
            "--detectors",
            "oracle-guided",
            "--max-images",
            str(args.max_images),
        ],
        f"scan demo --probe demo-clean (trigger-inversion, {args.inversion_images} images)": [
            "scan",
            "demo",
            "--probe",
            "demo-clean",
            "--detectors",
            "trigger-inversion",
            "--max-images",
            str(args.inversion_images),
        ],
        f"repair demo oracle-finetune ({args.epochs} epochs)": [
            "repair",
            "demo",
            "--findings",
            str(findings),
            "--param",
            f"epochs={args.epochs}",
        ],
    }
    layouts = ("1x1", "1x2", "2x1")
    rows = []
    for name, cli in jobs.items():
        seconds = {}
        for layout in layouts:
            out = work / f"{layout}_{len(rows)}"
            if name == oracle_job and layout == "1x2":
                out = findings  # the repair reads this scan's findings (equal in every layout: the tests say so)
            seconds[layout] = run(layout, [*cli, "--out", str(out)] if cli[0] != "evaluate" else cli)
            print(f"{name} [{layout}]: {seconds[layout]:.1f} s", file=sys.stderr)
        rows.append(
            {
                "job": name,
                **{f"{k} s": round(v, 1) for k, v in seconds.items()},
                "2x1 / 1x1": round(seconds["2x1"] / seconds["1x1"], 3),
                "2x1 / 1x2": round(seconds["2x1"] / seconds["1x2"], 3),
            }
        )
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    lines = [
        "# One process against two (CPU, gloo)",
        "",
        f"`python bench/processes.py` on {machine}; layouts are processes x threads per process.",
        "",
        "| job | 1x1 s | 1x2 s | 2x1 s | 2x1 / 1x1 | 2x1 / 1x2 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['job']} | {r['1x1 s']} | {r['1x2 s']} | {r['2x1 s']} | {r['2x1 / 1x1']} | {r['2x1 / 1x2']} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "processes.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "processes.json", json.dumps({"machine": machine, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

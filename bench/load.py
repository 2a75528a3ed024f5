"""Load on one workbench: N gradio_client sessions scan the demo while one more repairs, all at once.

Starts ``python app.py`` on a free local port (as a user would), submits every job at the same moment, polls
each job's queue position while it waits, and checks that every session gets its own answer: each scanning
session asks for a different number of images, so a report mixed up between sessions would show the wrong
count; the backdoored demo must flag ``flower`` in every one; the repair must lower the ASR. Writes
``bench/results/load.md`` and ``load.json``. Traffic goes to 127.0.0.1 only; every loop is bounded in time.

    python bench/load.py                 # 8 scanning sessions + 1 repair
    python bench/load.py --sessions 2    # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int, log: Path) -> subprocess.Popen:
    """``python app.py`` on 127.0.0.1:port, waited for (at most 180 s)."""
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"app.py exited with {proc.returncode}; see {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
            return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit(f"app.py did not answer within 180 s; see {log}")


def watch(job, record: dict, stop_at: float) -> None:
    """Poll a submitted job: every queue position it reports, until it is done (bounded by ``stop_at``)."""
    while not job.done() and time.time() < stop_at:
        status = job.status()
        rank = getattr(status, "rank", None)
        if rank is not None:
            record["queue_positions"].append(int(rank))
            record["queue_size"] = max(record.get("queue_size") or 0, int(getattr(status, "queue_size", 0) or 0))
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=8, help="scanning sessions (one repairing session is added)")
    ap.add_argument("--images", type=int, default=40, help="images the first session scans; session k scans images+k")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds after which waiting stops")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from gradio_client import Client

    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = start_app(port, args.out / "load_app.log")
    url = f"http://127.0.0.1:{port}/"
    records: list[dict] = []
    try:
        clients = [Client(url, verbose=False) for _ in range(args.sessions + 1)]
        start = time.time()
        stop_at = start + args.timeout
        jobs = []
        for k, client in enumerate(clients[:-1]):
            n = args.images + k
            jobs.append(client.submit("demo", None, n, api_name="/scan"))
            records.append({"session": k, "job": "scan", "images": n, "queue_positions": []})
        jobs.append(clients[-1].submit("cleanclip", 5, 0, 80, "", api_name="/repair"))
        records.append({"session": args.sessions, "job": "repair cleanclip (budget 80)", "queue_positions": []})
        watchers = [threading.Thread(target=watch, args=(j, r, stop_at), daemon=True) for j, r in zip(jobs, records)]
        for w in watchers:
            w.start()
        for job, record in zip(jobs, records):
            try:
                result = job.result(timeout=max(1.0, stop_at - time.time()))
                record["seconds"] = round(time.time() - start, 1)
                record.update(check(record, result))
            except Exception as exc:  # noqa: BLE001 - a lost or failed job is a row of the table
                record.update(seconds=round(time.time() - start, 1), ok=False, detail=f"{type(exc).__name__}: {exc}")
        for w in watchers:
            w.join(timeout=5)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    write(args.out, records, args)
    return 0 if all(r.get("ok") for r in records) else 1


def check(record: dict, result: tuple) -> dict:
    """Whether a finished job got its own, right answer."""
    if record["job"] == "scan":
        summary, gallery = result[0], result[1]
        own = len(gallery) == record["images"]
        flagged = "Flagged labels: **flower**" in summary
        return {
            "ok": own and flagged,
            "detail": f"{len(gallery)} images in its gallery (asked {record['images']}); "
            f"{'flower flagged' if flagged else 'flower NOT flagged'}",
        }
    summary = result[3]
    try:
        asr = summary.split("ASR ", 1)[1].split(",")[0].split("\n")[0]
        before, after = (float(v) for v in asr.split(" → "))
    except (IndexError, ValueError):
        return {"ok": False, "detail": f"unreadable summary: {summary[:120]}"}
    return {"ok": after < before, "detail": f"ASR {before:.3f} -> {after:.3f}"}


def write(out: Path, records: list[dict], args: argparse.Namespace) -> None:
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    lines = [
        f"# Load: {args.sessions} sessions scanning the demo while one repairs",
        "",
        f"`python bench/load.py --sessions {args.sessions} --images {args.images}` on {machine}. "
        "All jobs submitted at once; scans run as many at a time as the workbench's scan concurrency allows and "
        "repairs one at a time, beside them; waiting jobs see their queue position (polled every 0.5 s).",
        "",
        "| session | job | finished after (s) | queue positions seen | right and its own | detail |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        seen = sorted(set(r["queue_positions"]), reverse=True)
        shown = " > ".join(str(p) for p in seen[:6]) + (" ..." if len(seen) > 6 else "") if seen else "-"
        lines.append(
            f"| {r['session']} | {r['job']} | {r.get('seconds', '-')} | {shown} | "
            f"{'yes' if r.get('ok') else 'NO'} | {r.get('detail', '')} |"
        )
    ok = sum(bool(r.get("ok")) for r in records)
    lines += ["", f"{ok} of {len(records)} jobs finished with their own, right result."]
    (out / "load.md").write_text("\n".join(lines) + "\n")
    (out / "load.json").write_text(
        json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "jobs": records}, indent=2)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

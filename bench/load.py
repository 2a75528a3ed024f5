"""Load on one workbench: N gradio_client sessions scan the demo while one more uploads an oversize file and another
a stream of small files past its upload budget (and, with --repair, one more repairs), all at once.

Starts ``python app.py`` on a free local port (as a user would) with small disk limits (FORENSICS_MAX_UPLOAD_MB,
FORENSICS_SESSION_DISK_MB, FORENSICS_DISK_BUDGET_MB) and a temp folder of its own, so its job and upload folders
hold only this run's files. Submits every job at the same moment, polls each job's queue position while it waits,
and checks that every session gets its own answer: each scanning session asks for a different number of images, so
a report mixed up between sessions would show the wrong count; the backdoored demo must flag ``flower`` in every
one; the repair must lower the ASR. The oversize upload is streamed without a length (the hard case: only the bytes
so far tell its size) and then sent with its Content-Length; the most bytes it ever had on disk are sampled every
5 ms and must stay under 110 % of the per-file limit. The small uploads come from another client address until
twice its budget was offered: some are stored, the rest refused. The disk use of the job and upload folders is
sampled every 0.25 s and must stay under the server's budget. Writes ``bench/results/load.md`` and ``load.json``.
Traffic goes to 127.0.0.x only; every loop is bounded in time.

    python bench/load.py                 # 8 scanning sessions + an oversize upload + a stream of small uploads
    python bench/load.py --repair        # and one repairing session, as before
    python bench/load.py --sessions 2    # a quick check
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
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


def start_app(port: int, log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python app.py`` on 127.0.0.1:port with ``extra_env``, waited for (at most 180 s)."""
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        **(extra_env or {}),
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


MB = 1024 * 1024
BOUNDARY = "benchLoadBoundary"


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (links not followed; vanishing files skipped)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            total += st.st_size if not os.path.islink(os.path.join(folder, name)) else 0
    return total


class DiskSampler(threading.Thread):
    """The most bytes seen under ``folders`` (sampled every ``every`` s), until stopped; with ``partial_only`` the
    size of the largest top-level file instead (Gradio's partial uploads are written there)."""

    def __init__(self, folders: list[Path], every: float, partial_only: bool = False) -> None:
        super().__init__(daemon=True)
        self.folders, self.every, self.partial_only = folders, every, partial_only
        self.peak, self.samples, self.stop = 0, 0, threading.Event()

    def measure(self) -> int:
        if not self.partial_only:
            return sum(tree_bytes(f) for f in self.folders)
        largest = 0  # the largest partial file: the oversize one (the small uploads beside it stay small)
        for folder in self.folders:
            try:
                for entry in os.scandir(folder):
                    if entry.is_file(follow_symlinks=False):
                        largest = max(largest, entry.stat(follow_symlinks=False).st_size)
            except OSError:
                continue
        return largest

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.measure())
            self.samples += 1
            time.sleep(self.every)


def post_upload(port: int, source: str, name: str, size: int, chunked: bool, seed: int = 0) -> dict:
    """One multipart upload of ``size`` bytes named ``name`` to the upload route from ``source`` (a loopback
    address: its own client budget); streamed in 256 KiB chunks without a length when ``chunked``."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    block = bytes([48 + seed % 64]) * (256 * 1024)
    chunks = [head, *([block] * (size // len(block))), tail]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120, source_address=(source, 0))
    sent, started = 0, time.time()
    try:
        conn.putrequest("POST", "/gradio_api/upload")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={BOUNDARY}")
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        else:
            conn.putheader("Content-Length", str(sum(map(len, chunks))))
        conn.endheaders()
        try:
            for chunk in chunks:
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                sent += len(chunk)
            if chunked:
                conn.send(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered early and closed: read its answer
        try:
            response = conn.getresponse()
            status, text = response.status, response.read().decode(errors="replace").strip()
        except (OSError, http.client.HTTPException) as exc:
            status, text = None, f"no answer ({type(exc).__name__})"
    finally:
        conn.close()
    return {"status": status, "text": text[:300], "sent": sent, "seconds": round(time.time() - started, 2)}


def oversize(port: int, uploads: Path, limit: int, record: dict) -> None:
    """Session 9: an upload of 1.5 times the per-file limit, streamed without a length, then with its length."""
    size = int(1.5 * limit)
    for how, chunked in (("streamed", True), ("with Content-Length", False)):
        peak = DiskSampler([uploads], 0.005, partial_only=True)
        peak.start()
        answer = post_upload(port, "127.0.0.9", f"oversize-{how.split()[0]}.pt", size, chunked)
        peak.stop.set()
        peak.join()
        time.sleep(0.5)
        kept = list(uploads.glob("*/oversize-*.pt")) + [p for p in uploads.glob("tmp*") if p.is_file()]
        record["tries"].append(
            {**answer, "how": how, "size": size, "peak_on_disk": peak.peak, "samples": peak.samples, "kept": len(kept)}
        )
    tries = record["tries"]
    record["ok"] = all(t["status"] == 413 and t["peak_on_disk"] < 1.1 * limit and not t["kept"] for t in tries)
    record["detail"] = (
        "; ".join(
            f"{t['how']}: {t['status']} after {t['sent'] / MB:.1f} MB sent, at most {t['peak_on_disk'] / MB:.2f} MB "
            f"({t['peak_on_disk'] / limit:.0%} of the limit) on disk, {t['kept']} kept"
            for t in tries
        )
        + f"; answer: {tries[0]['text']}"
    )


def small_stream(port: int, uploads: Path, quota: int, each: int, record: dict) -> None:
    """Session 10: uploads of ``each`` bytes (distinct contents) until twice its budget was offered."""
    answers = [
        post_upload(port, "127.0.0.10", f"small-{k}.bin", each, chunked=False, seed=k) for k in range(2 * quota // each)
    ]
    accepted = [a for a in answers if a["status"] == 200]
    first_refusal = next((k for k, a in enumerate(answers) if a["status"] != 200), None)
    stored = sum(tree_bytes(p.parent) for p in uploads.glob("*/small-*.bin"))
    record["tries"] = [{k: a[k] for k in ("status", "sent", "seconds")} for a in answers]
    record["ok"] = (
        first_refusal is not None
        and all(a["status"] == 413 for a in answers[first_refusal:])
        and stored <= quota
        and len(accepted) >= quota // each - 2
    )
    refusal = answers[first_refusal]["text"] if first_refusal is not None else "none"
    record["detail"] = (
        f"{len(answers)} uploads of {each / MB:.0f} MB offered ({len(answers) * each / MB:.0f} MB): {len(accepted)} "
        f"stored ({stored / MB:.1f} MB on disk), {len(answers) - len(accepted)} refused from upload "
        f"{first_refusal + 1 if first_refusal is not None else '-'} on; answer: {refusal}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=8, help="scanning sessions (two uploading sessions are added)")
    ap.add_argument("--images", type=int, default=40, help="images the first session scans; session k scans images+k")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds after which waiting stops")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--repair", action="store_true", help="add a session repairing with CleanCLIP (budget 80)")
    ap.add_argument("--max-upload-mb", type=int, default=32, help="FORENSICS_MAX_UPLOAD_MB of the app")
    ap.add_argument("--session-mb", type=int, default=64, help="FORENSICS_SESSION_DISK_MB of the app")
    ap.add_argument("--budget-mb", type=int, default=384, help="FORENSICS_DISK_BUDGET_MB of the app")
    ap.add_argument("--small-mb", type=int, default=4, help="size of each of the stream of small uploads")
    args = ap.parse_args(argv)
    from gradio_client import Client

    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))  # the app's temp folder: its job and upload folders
    work, uploads = tmp / "clip-forensics-workbench", tmp / "gradio"
    limits = {
        "FORENSICS_MAX_UPLOAD_MB": str(args.max_upload_mb),
        "FORENSICS_SESSION_DISK_MB": str(args.session_mb),
        "FORENSICS_DISK_BUDGET_MB": str(args.budget_mb),
    }
    proc = start_app(port, args.out / "load_app.log", {"TMPDIR": str(tmp), **limits})
    url = f"http://127.0.0.1:{port}/"
    records: list[dict] = []
    disk = DiskSampler([work, uploads], 0.25)
    try:
        clients = [Client(url, verbose=False) for _ in range(args.sessions + int(args.repair))]
        uploads.mkdir(parents=True, exist_ok=True)
        disk.start()
        start = time.time()
        stop_at = start + args.timeout
        jobs = []
        for k, client in enumerate(clients[: args.sessions]):
            n = args.images + k
            jobs.append(client.submit("demo", None, n, api_name="/scan"))
            records.append({"session": k, "job": "scan", "images": n, "queue_positions": []})
        if args.repair:
            jobs.append(clients[-1].submit("cleanclip", 5, 0, 80, "", api_name="/repair"))
            records.append({"session": len(records), "job": "repair cleanclip (budget 80)", "queue_positions": []})
        big = {"session": len(records), "job": f"oversize upload ({1.5 * args.max_upload_mb:.0f} MB)", "tries": []}
        small = {"session": len(records) + 1, "job": f"stream of {args.small_mb} MB uploads", "tries": []}
        uploaders = [
            threading.Thread(target=oversize, args=(port, uploads, args.max_upload_mb * MB, big), daemon=True),
            threading.Thread(
                target=small_stream, args=(port, uploads, args.session_mb * MB, args.small_mb * MB, small), daemon=True
            ),
        ]
        for u in uploaders:
            u.start()
        watchers = [threading.Thread(target=watch, args=(j, r, stop_at), daemon=True) for j, r in zip(jobs, records)]
        for w in watchers:
            w.start()
        for u, record in zip(uploaders, (big, small)):
            u.join(timeout=max(1.0, stop_at - time.time()))
            record["seconds"] = round(time.time() - start, 1)
            record["queue_positions"] = []
        for job, record in zip(jobs, records):
            try:
                result = job.result(timeout=max(1.0, stop_at - time.time()))
                record["seconds"] = round(time.time() - start, 1)
                record.update(check(record, result))
            except Exception as exc:  # noqa: BLE001 - a lost or failed job is a row of the table
                record.update(seconds=round(time.time() - start, 1), ok=False, detail=f"{type(exc).__name__}: {exc}")
        for w in watchers:
            w.join(timeout=5)
        records += [big, small]
    finally:
        disk.stop.set()
        disk.join(timeout=30)
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    budget = args.budget_mb * MB
    disk_row = {"peak_bytes": disk.peak, "budget_bytes": budget, "samples": disk.samples, "ok": disk.peak < budget}
    write(args.out, records, args, disk_row)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(r.get("ok") for r in records) and disk_row["ok"] else 1


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


def write(out: Path, records: list[dict], args: argparse.Namespace, disk: dict) -> None:
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    repair = " while one repairs," if args.repair else ""
    command = f"python bench/load.py --sessions {args.sessions} --images {args.images}" + (
        " --repair" if args.repair else ""
    )
    lines = [
        f"# Load: {args.sessions} sessions scanning the demo{repair} while one uploads an oversize file and one a "
        "stream of small files past its budget",
        "",
        f"`{command}` on {machine}, the app started with FORENSICS_MAX_UPLOAD_MB={args.max_upload_mb}, "
        f"FORENSICS_SESSION_DISK_MB={args.session_mb}, FORENSICS_DISK_BUDGET_MB={args.budget_mb} and a temp folder "
        "of its own. All jobs submitted at once; scans run as many at a time as the workbench's scan concurrency "
        "allows; waiting jobs see their queue position (polled every 0.5 s). The oversize upload (1.5 times the "
        "per-file limit) is streamed without a length, then sent with its Content-Length, from its own client "
        "address; its partial file's size on disk is sampled every 5 ms. The small uploads come from another "
        "address until twice its budget was offered.",
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
    lines += [
        "",
        f"{ok} of {len(records)} jobs finished with their own, right result. Disk use of the job and upload folders: "
        f"at most {disk['peak_bytes'] / MB:.1f} MB of the {disk['budget_bytes'] / MB:.0f} MB budget "
        f"({disk['samples']} samples, every 0.25 s): {'under' if disk['ok'] else 'OVER'} the budget.",
    ]
    (out / "load.md").write_text("\n".join(lines) + "\n")
    (out / "load.json").write_text(
        json.dumps(
            {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "disk": disk, "jobs": records},
            indent=2,
        )
    )
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

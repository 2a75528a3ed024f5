"""Zoo tab: audit several models at once (uploaded checkpoints and the bundled demos); one table, audit.csv."""

from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr

from forensics.detect import all_detectors
from forensics.pipelines.scan_many import CHECKPOINT_SUFFIXES, scan_many
from forensics.ui.common import (
    DEMO_NAMES,
    cancel_flag,
    gr_progress,
    guarded,
    new_job_dir,
    probe_choice,
    scrub_paths,
    server_paths_enabled,
)

MAX_UPLOADS = 40  # checkpoints and sidecars in one audit
EXPLAIN = """**Zoo audit** scans every chosen model on the same probe set with the same detectors and lists one verdict
per model, with its SHA-256, flagged labels, target and each detector's top score. Upload several checkpoints (with
the sidecar `.json` this tool saves beside its own), tick the bundled demos, or both. A model that cannot be loaded
gets a row with the reason; the others are still scanned. Each model takes about as long as one scan."""


def _uploaded_models(uploads: list[str] | None, request: gr.Request | None) -> Path | None:
    """The uploaded checkpoints (and sidecars) copied into a folder of this session's own, or None."""
    files = [Path(f) for f in (uploads or [])]
    if not files:
        return None
    if len(files) > MAX_UPLOADS:
        raise gr.Error(f"upload at most {MAX_UPLOADS} files per audit", print_exception=False)
    names = [f.name for f in files]
    odd = [n for n in names if not n.lower().endswith((*CHECKPOINT_SUFFIXES, ".json"))]
    if odd:
        raise gr.Error(
            f"{odd[0]} is no checkpoint: upload .safetensors, .pt, .pth or .bin files (and sidecar .json)",
            print_exception=False,
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise gr.Error(f"two uploads are both named {twice[0]}; rename one", print_exception=False)
    if not any(n.lower().endswith(CHECKPOINT_SUFFIXES) for n in names):
        raise gr.Error("the upload holds only sidecar .json files; add their checkpoints", print_exception=False)
    folder = new_job_dir("zoo-models", request)
    for f in files:
        shutil.copy(f, folder / f.name)
    return folder


def _table(rows: list[dict], detectors: list[str]):
    """The audit rows as shown: file names (never server paths), short SHA-256, errors without paths."""
    import pandas as pd

    columns = ["model", "sha256", "status", "verdict", "target", "flagged", *detectors, "seconds", "error"]
    data = [
        [
            Path(r["model"]).name if Path(r["model"]).is_absolute() else r["model"],
            r["sha256"][:12],
            r["status"] + (" (reused)" if r["reused"] else ""),
            r["verdict"],
            r["target"],
            ", ".join(r["flagged"]),
            *[r["scores"].get(d) for d in detectors],
            r["seconds"],
            scrub_paths(r["error"]),
        ]
        for r in rows
    ]
    return pd.DataFrame(data, columns=columns)


@guarded
def audit_zoo(
    state: dict,
    uploads: list[str] | None,
    bundled: list[str],
    probe: str,
    detectors: list[str],
    max_images: float,
    request: gr.Request = None,
    progress=gr.Progress(),
) -> tuple:
    """Scan the uploaded and the chosen bundled models; the table, audit.csv and audit.json, and a summary."""
    chosen = [b for b in bundled or [] if b in DEMO_NAMES]
    if not detectors:
        raise gr.Error("choose at least one detector", print_exception=False)
    if not probe:
        raise gr.Error("choose a probe set", print_exception=False)
    probe_spec = probe_choice(probe)  # demo, demo-clean, or (where allowed) a server path inside an allowed folder
    folder = _uploaded_models(uploads, request)
    if folder is None and not chosen:
        raise gr.Error("upload checkpoints or tick a bundled model", print_exception=False)
    stop = cancel_flag(request)
    stop.clear()
    out = new_job_dir("zoo", request)
    audit = scan_many(
        chosen,
        probe_spec,
        out,
        detectors=list(detectors),
        oracle=state["oracle"],
        sam_checkpoint=state["sam_checkpoint"],
        max_images=int(max_images) if max_images else None,
        models_dir=folder,
        progress=gr_progress(progress),
        cancel=stop.is_set,
    )
    verdicts = [r["verdict"] for r in audit.rows if r["status"] == "done"]
    counts = ", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts)) or "none scanned"
    text = f"### {len(audit.rows)} models: {counts}" + (
        f", {audit.count('error')} could not be scanned" if audit.count("error") else ""
    )
    return _table(audit.rows, audit.detectors), [audit.files["audit.csv"], audit.files["audit.json"]], text


def cancel(request: gr.Request = None) -> str:
    """Ask the running audit of this session to stop at its next step (finished models are kept)."""
    cancel_flag(request).set()
    return "Cancelling: the audit stops at its next step."


def build_zoo_tab(state: gr.State) -> dict:
    """Components of the Zoo tab, wired (shares the repair queue: one heavy job at a time)."""
    gr.Markdown(EXPLAIN)
    with gr.Row():
        uploads = gr.File(
            label="Checkpoints to audit (.safetensors, .pt, .pth, .bin; with sidecar .json files)",
            type="filepath",
            file_count="multiple",
            file_types=[*CHECKPOINT_SUFFIXES, ".json"],
        )
        with gr.Column():
            bundled = gr.CheckboxGroup(list(DEMO_NAMES), value=[], label="Bundled models")
            probe = gr.Dropdown(
                ["demo", "demo-clean"],
                value="demo",
                label="Probe set",
                allow_custom_value=server_paths_enabled(),
                info="demo or demo-clean" + (", or a server path" if server_paths_enabled() else ""),
            )
    with gr.Row():
        detectors = gr.CheckboxGroup(all_detectors(), value=all_detectors(), label="Detectors")
        max_images = gr.Slider(10, 300, value=100, step=10, label="Images per model (a seeded random subset)")
    with gr.Row():
        run = gr.Button("Audit the models", variant="primary", elem_id="zoo-button")
        stop = gr.Button("Cancel", variant="stop")
    summary = gr.Markdown(elem_id="zoo-summary")
    table = gr.Dataframe(label="One row per model", interactive=False, elem_id="zoo-table")
    files = gr.File(label="audit.csv, audit.json", file_count="multiple", interactive=False)
    run.click(
        audit_zoo,
        [state, uploads, bundled, probe, detectors, max_images],
        [table, files, summary],
        api_name="scan_many",
        concurrency_limit=1,
        concurrency_id="repair",
    )
    stop.click(cancel, None, summary, api_name="cancel_scan_many", queue=False)
    return {"uploads": uploads, "run": run}

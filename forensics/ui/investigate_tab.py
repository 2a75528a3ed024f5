"""Investigate tab: run the oracle-guided scan on a probe set; look at one image as the oracle and CLIP see it."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from forensics.core.data import extract_probe_archive, load_probe_set
from forensics.core.errors import ForensicsError
from forensics.core.settings import parse_assignment_text
from forensics.detect import PROFILES
from forensics.pipelines.estimate import (
    DEPTHS,
    ScanBoard,
    UnitCosts,
    depth_detectors,
    depth_options,
    duration_words,
    estimate_words,
    scan_estimates,
    wait_words,
)
from forensics.pipelines.evaluate import get_model
from forensics.pipelines.explain import explain_image
from forensics.pipelines.pictures import picture_sheet, pictures_from_report
from forensics.pipelines.report import flagged_chart, flagged_words, threshold_words
from forensics.pipelines.scan import pick_oracle, scan_settings, write_scan
from forensics.pipelines.scan import scan as run_scan_outcome
from forensics.pipelines.summary import plain_verdict
from forensics.ui.common import (
    gr_progress,
    guarded,
    model_ref,
    need_scan,
    new_job_dir,
    server_paths_enabled,
    session_key,
)
from forensics.ui.common import probe_choice as checked_probe_choice

GALLERY_SIZE = 60  # most discrepant images shown
# scans running at once per depth, each depth its own queue: a full verdict (minutes) never holds a quick look's
# slot; two quick looks keep a 2-core machine busy without starving the page
SLOTS = {"quick": 2, "full": 1}
BOARD = ScanBoard()  # the scans this server holds, for the expected wait a queued visitor is shown
BUTTON = {"quick": "Quick look", "full": "Full verdict"}
EXPLAIN = """**How the scan works.** For every probe image, a *segmentation oracle* outlines the objects and CLIP
labels each object on its own. A label CLIP gives the whole image but no object supports, and that a small
window *outside* the objects decides (hiding it flips the answer), points at a trigger. Images are ranked by
that **discrepancy**. Pick one to see the oracle's regions, **Grad-CAM** (where CLIP's gradients say it looks)
and **occlusion** (what, hidden, takes the answer away: this is what finds small triggers)."""


def _probe_spec(choice: str, upload: str | None, request: gr.Request | None = None, state: dict | None = None) -> str:
    """The probe set to scan: an uploaded zip (extracted into this session's folder once, remembered in ``state``;
    a CSV in it may only name files inside it), or demo / demo-clean / an allowed server path."""
    if upload:
        kept = (state or {}).get("probe_upload") or {}
        if kept.get("upload") == upload and Path(kept.get("spec", "")).exists():
            return kept["spec"]
        dest = new_job_dir("probe", request)
        spec = extract_probe_archive(upload, dest)
        load_probe_set(spec, root=dest)  # refuses rows naming images outside the upload (absolute, .., links)
        if state is not None:
            state["probe_upload"] = {"upload": upload, "spec": str(spec)}
        return str(spec)
    if not choice:
        raise gr.Error(
            "choose a probe set or upload one (a .zip of class folders, or of a CSV with its images)",
            print_exception=False,
        )
    return checked_probe_choice(choice)


def scan_outputs(report: dict, out: Path, estimate: float | None = None, depth_name: str = "") -> tuple:
    """The views of a finished scan: summary (led by the verdict in plain words, with the time it took against
    ``estimate`` seconds), ranked gallery, flagged table and chart, triggers, victims, files."""
    images = report["images"]
    order = sorted(range(len(images)), key=lambda i: -images[i]["discrepancy"])[:GALLERY_SIZE]
    gallery = [
        (
            images[i]["image"],
            f"#{i} CLIP: {images[i]['predicted']} · objects: {images[i]['object_view_label']} · "
            f"discrepancy {images[i]['discrepancy']:.2f}{' · captured' if images[i]['captured'] else ''}",
        )
        for i in order
    ]
    flagged = report["flagged_labels"]
    names = ", ".join(f"**{f['label']}**" for f in flagged) or "none"
    m = report["metrics"]
    took = m.get("seconds_total", m.get("seconds", 0))
    expected = f" (expected {duration_words(estimate)})" if estimate else ""
    summary = (
        f"### Flagged labels: {names}\n{len(report['victims'])} victim images, {len(report['triggers'])} trigger "
        f"candidate(s), {len(images)} images scanned with the `{report['oracle']['name']}` oracle in "
        f"{took:.0f} s{expected}."
    )
    verdict = report.get("verdict")
    if verdict:
        target = f", target **{verdict['target']}**" if verdict.get("target") else ""
        family = f" ({verdict['family']} trigger)" if verdict.get("family") else ""
        profile = report.get("detector_profile", "default")
        caveat = f" · *{profile} profile: not calibrated*" if profile != "default" else ""
        depth = f" · {DEPTHS[depth_name]}" if depth_name in DEPTHS else ""
        summary = (
            f"## Verdict: **{verdict['verdict']}**{target}{family}{depth}{caveat}\n\n{plain_verdict(report)}\n\n"
            + summary
        )
    if m.get("victim_precision") is not None:
        summary += (
            f" Against the probe set's known trigger flags: victim precision {m['victim_precision']:.2f}, "
            f"recall {m['victim_recall']:.2f}."
        )
    table = [[f["label"], round(f["score"], 2), f["captured"], f["predicted"], f["explanation"]] for f in flagged]
    chart = flagged_chart(images, report["probe"]["classes"], [f["label"] for f in flagged])
    triggers = [
        (
            str(out / t["pattern"].replace(".png", "_preview.png")),
            f"{t['label']}: flips {t['verified_asr']:.0%} of {t['n_verified']} clean images",
        )
        for t in report["triggers"]
    ]
    pictures = pictures_from_report(report, out)
    files = [str(out / "report.html"), str(out / "report.json")]
    choices = [f"{k}: {t['label']}" for k, t in enumerate(report["triggers"])]
    verdict_text, evidence = verdict_views(report)
    return (
        summary,
        gallery,
        table,
        chart,
        triggers,
        pictures["victims"],
        files,
        gr.update(choices=choices, value=choices[0] if choices else None),
        verdict_text,
        evidence,
        picture_sheet([path for path, _ in pictures["triggers"]]),
        picture_sheet([path for path, _ in pictures["scores"]]),
        order,
    )


def verdict_views(report: dict) -> tuple[str, list[list]]:
    """The Findings tab's top: the verdict in words, and each detector's evidence as rows (thresholds in words)."""
    verdict = report.get("verdict") or {}
    if not verdict:
        return "", []
    text = f"## Verdict: **{verdict['verdict']}**"
    if verdict.get("target"):
        text += f", target **{verdict['target']}**"
    if verdict.get("family"):
        text += f" ({verdict['family']} trigger)"
    text += f"\n\n{plain_verdict(report)}"
    trigger = verdict.get("trigger")
    if trigger:
        text += f"\n\nBest trigger: {trigger.get('method', '')}, verified flip rate {trigger['verified_asr']:.0%}"
        text += f" on {trigger['n_verified']} held-out clean images of other classes."
    text += "".join(f"\n- {r}" for r in verdict.get("reasons", []))
    rows = [
        [name, flagged_words(e), threshold_words(e.get("thresholds")), e.get("seconds")]
        for name, e in verdict.get("evidence", {}).items()
    ]
    return text, rows


_MEASURED: dict[tuple, UnitCosts] = {}  # model and oracle -> unit costs: measured once per server, not per visitor


def _costs(state: dict) -> tuple:
    """This session's model's unit costs (None until measured: once per loaded model, file version and oracle)
    and their key."""
    path = Path(str(state["model"]))
    stamp = path.stat().st_mtime_ns if path.is_file() else None
    key = [
        state["model"],
        stamp,
        state.get("arch"),
        state.get("quick_gelu"),
        state["oracle"],
        state.get("sam_checkpoint"),
    ]
    kept = state.get("costs") or {}
    return (kept.get("costs") if kept.get("key") == key else _MEASURED.get(tuple(key))), key


def _estimates(state: dict, probe: str, max_images: float, options: dict, profile: str) -> dict:
    """Both depths' estimates for this scan; the costs (measured on first need) and totals kept in ``state``."""
    costs, key = _costs(state)
    oracle = pick_oracle(state["oracle"], state["sam_checkpoint"])
    model = get_model(model_ref(state)) if costs is None else None
    limit = int(max_images) if max_images else None
    costs, estimates = scan_estimates(model, probe, oracle, limit, options, profile, costs)
    state["costs"] = {"key": key, "costs": costs}
    _MEASURED[tuple(key)] = costs
    state["estimates"] = {depth: e.total for depth, e in estimates.items()}
    return {"costs": costs, **estimates}


@guarded
def estimate(
    state: dict,
    probe_choice: str,
    upload: str | None,
    max_images: float,
    profile: str = "default",
    detector_settings: str | None = None,
    request: gr.Request = None,
) -> tuple:
    """Each depth's expected time on its button, before the click: this model's unit costs (measured once, kept in
    the session) extrapolated to the chosen images, labels and detector settings. A setting still being typed
    leaves the buttons as they are and says why."""
    state = dict(state)
    try:
        options = parse_assignment_text(detector_settings, "detector settings")
        probe = _probe_spec(probe_choice, upload, request, state)
        found = _estimates(state, probe, max_images, options, profile)
    except (ForensicsError, gr.Error) as exc:
        return gr.update(), gr.update(), f"*No estimate yet: {exc}*", state
    labels = [gr.update(value=f"{BUTTON[d]} ({found[d].words()})") for d in DEPTHS]
    return (*labels, estimate_words(found, found["costs"]), state)


def announce(depth: str):
    """The click's first, unqueued answer: start now, or wait (how many scans run and wait, and for how long)."""

    def tell(state: dict, request: gr.Request = None) -> str:
        expected = (state.get("estimates") or {}).get(depth) or 0.0
        running, waiting, wait = BOARD.wait(depth, SLOTS[depth])
        BOARD.announce(f"{session_key(request)}:{depth}", depth, expected)
        return wait_words(depth, running, waiting, wait, SLOTS[depth])

    return tell


def _scan(
    depth: str,
    state: dict,
    probe_choice: str,
    upload: str | None,
    max_images: float,
    profile: str,
    detector_settings: str | None,
    request: gr.Request | None,
    progress: gr.Progress,
) -> tuple:
    """Run ``depth``'s detectors for this session's model on the chosen probe set, with the chosen profile and
    settings (checked by name and type before anything runs); the bar weighted by the estimate; fill the
    Investigate and Findings views."""
    options = depth_options(depth, parse_assignment_text(detector_settings, "detector settings"))
    names = depth_detectors(depth)
    scan_settings(names, None, options, profile)  # names and types checked before any work
    state = dict(state)
    probe = _probe_spec(probe_choice, upload, request, state)
    found = _estimates(state, probe, max_images, options, profile)
    expected = found[depth]
    key = f"{session_key(request)}:{depth}"
    BOARD.start(key, depth, expected.total)
    try:
        out = new_job_dir("scan", request)
        bar = gr_progress(progress)
        outcome = run_scan_outcome(
            model_ref(state),
            probe=probe,
            oracle=state["oracle"],
            sam_checkpoint=state["sam_checkpoint"],
            max_images=int(max_images) if max_images else None,
            progress=bar,
            detectors=names,
            detector_options=options,
            profile=profile,
            expected=expected.seconds,
        )
        write_scan(outcome, out, bar)
    finally:
        BOARD.finish(key)
    report = outcome.report  # what the call returned, not a re-read of report.json
    *views, order = scan_outputs(report, out, expected.total, depth)
    state = {**state, "probe": probe, "scan_dir": str(out), "report": report, "order": order, "selected": None}
    return (*views, "", state)


@guarded
def quick_look(
    state: dict,
    probe_choice: str,
    upload: str | None,
    max_images: float,
    profile: str = "default",
    detector_settings: str | None = None,
    request: gr.Request = None,
    progress=gr.Progress(),
) -> tuple:
    """The quick look: the oracle-guided scan and embedding density (per-image passes, no optimisation)."""
    return _scan("quick", state, probe_choice, upload, max_images, profile, detector_settings, request, progress)


@guarded
def scan(
    state: dict,
    probe_choice: str,
    upload: str | None,
    max_images: float,
    profile: str = "default",
    detector_settings: str | None = None,
    request: gr.Request = None,
    progress=gr.Progress(),
) -> tuple:
    """The full verdict: every registered detector, the model-level trigger inversion included."""
    return _scan("full", state, probe_choice, upload, max_images, profile, detector_settings, request, progress)


@guarded
def show_image(state: dict, evt: gr.SelectData) -> tuple:
    """One gallery image: oracle regions, Grad-CAM, occlusion, and CLIP's label for the whole image and each region."""
    report = need_scan(state)
    index = state["order"][evt.index]
    record = report["images"][index]
    model = get_model(model_ref(state))
    oracle = pick_oracle(state["oracle"], state["sam_checkpoint"])  # the same oracle the scan used
    view = explain_image(model, record["image"], report["probe"]["classes"], oracle)
    annotated = (
        view.image,
        [(r["mask"], f"region {k + 1}: {r['label']} ({r['probability']:.2f})") for k, r in enumerate(view.regions)],
    )
    rows = [[r["view"], r["CLIP label"], r["probability"], r["box"]] for r in view.region_table()]
    text = (
        f"**Image #{index}** · true label: {record.get('true_label') or 'unknown'} · CLIP says **{view.predicted}** "
        f"· {view.outside_mass:.0%} of the occlusion mass lies outside every object region"
    )
    if record.get("triggered") is not None:
        text += f" · carries the planted trigger: {'yes' if record['triggered'] else 'no'}"
    if view.notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in view.notes)
    return annotated, view.gradcam, view.occlusion, rows, text, {**state, "selected": record["image"]}


def build_investigate_tab(state: gr.State) -> dict:
    """Components of the Investigate tab (scan wiring happens in the workbench, which owns the Findings views)."""
    gr.Markdown(EXPLAIN)
    with gr.Row():
        probe = gr.Dropdown(
            ["demo", "demo-clean"],
            value="demo",
            label="Probe set",
            allow_custom_value=True,
            info="demo: 15 % of images carry the planted trigger; demo-clean: none do"
            + ("; or a server path" if server_paths_enabled() else ""),
        )
        upload = gr.File(
            label="…or upload a probe set (.zip of class folders, or of a CSV with its images)",
            type="filepath",
            file_types=[".zip"],
        )
        max_images = gr.Slider(
            10,
            300,
            value=300,
            step=10,
            label="Images to scan (a seeded random subset)",
            info="each button below shows its expected time for this many images",
            elem_id="scan-images",
        )
    with gr.Accordion("Detector settings", open=False):
        with gr.Row():
            profile = gr.Radio(
                list(PROFILES),
                value="default",
                label="Profile",
                info="quick: fewer steps and images, for trying the workbench; its verdict is not to be relied on",
                elem_id="detector-profile",
            )
            detector_settings = gr.Textbox(
                value="",
                label="Settings (NAME.KEY=VALUE, one per line)",
                placeholder="trigger-inversion.steps=20\noracle-guided.proposals=9",
                lines=2,
                elem_id="detector-settings",
            )
    with gr.Row():
        quick = gr.Button(f"{BUTTON['quick']} (estimating…)", variant="primary", elem_id="quick-look-button")
        full = gr.Button(f"{BUTTON['full']} (estimating…)", variant="secondary", elem_id="full-verdict-button")
    estimate_line = gr.Markdown(elem_id="scan-estimate")
    queue_line = gr.Markdown(elem_id="scan-queue")
    summary = gr.Markdown(elem_id="scan-summary")
    gallery = gr.Gallery(label="Images ranked by discrepancy (click one)", columns=8, height=320, allow_preview=False)
    detail = gr.Markdown()
    with gr.Row():
        annotated = gr.AnnotatedImage(label="Oracle regions (with CLIP's label for each crop)", height=260)
        cam = gr.Image(label="Grad-CAM for CLIP's label", height=260)
        occ = gr.Image(label="Occlusion: what the label rests on", height=260)
    regions = gr.Dataframe(
        headers=["view", "CLIP label", "probability", "box"],
        label="CLIP: whole image vs each region",
        interactive=False,
    )
    gallery.select(show_image, state, [annotated, cam, occ, regions, detail, state], api_name=False)
    return {
        "probe": probe,
        "upload": upload,
        "max_images": max_images,
        "profile": profile,
        "detector_settings": detector_settings,
        "quick": quick,
        "full": full,
        "estimate": estimate_line,
        "queue": queue_line,
        "summary": summary,
        "gallery": gallery,
    }

"""Findings tab: flagged labels (table + chart), trigger candidates with their verified flip rate, victims,
and a paste-the-trigger experiment on any image."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from forensics.core.images import load_pattern
from forensics.pipelines.evaluate import get_model
from forensics.pipelines.explain import paste_trigger
from forensics.ui.common import guarded, model_ref, need_scan

EXPLAIN = """The **verdict** on top merges every detector that ran: the oracle-guided scan (victims with trigger
boxes), trigger inversion (full verdict only; from clean images alone: the smallest patch or whole-image trigger per
label) and embedding density (look-alike inputs piled onto one spot). Each **trigger** is shown at work: a clean
probe image, the trigger, the same image stamped, with the model's answer on each; each detector's **scores** are
plotted against its clean-calibrated threshold. **Flagged labels** collect predictions that a
small non-object window decides; a backdoor's target
label stands out. **Trigger candidates** are rebuilt from the windows that hijacked those predictions; the
flip rate says how often pasting one on clean images of other classes turns them into the flagged label.
**Victims** are the probe images whose prediction the trigger captured. Paste a candidate on any image below
to watch the prediction flip."""


def _top(probs: dict[str, float]) -> str:
    label, p = next(iter(probs.items()))
    return f"{label} ({p:.2f})"


@guarded
def paste(state: dict, trigger: str | None, image: str | None, position: str) -> tuple:
    """Paste the chosen reconstructed trigger on an uploaded (or the last selected) image; show both predictions."""
    report = need_scan(state)
    if not report["triggers"]:
        raise gr.Error("the scan found no trigger candidate to paste", print_exception=False)
    k = int(str(trigger).split(":")[0]) if trigger else 0
    if not 0 <= k < len(report["triggers"]):
        raise gr.Error(f"no trigger candidate {trigger!r}", print_exception=False)
    target = image or state.get("selected")
    if not target:
        raise gr.Error("upload an image, or click one in the Investigate gallery first", print_exception=False)
    pattern = load_pattern(Path(state["scan_dir"]) / report["triggers"][k]["pattern"])
    model = get_model(model_ref(state))
    result = paste_trigger(model, target, pattern, report["probe"]["classes"], position=position)
    verdict = "**the prediction flips**" if result["flipped"] else "the prediction stays"
    text = f"Before: {_top(result['before'])} → with the trigger: {_top(result['after'])}: {verdict}."
    return result["image"], text


def build_findings_tab(state: gr.State) -> dict:
    """Components of the Findings tab; the scan (Investigate tab) fills them."""
    gr.Markdown(EXPLAIN)
    verdict = gr.Markdown(elem_id="verdict")
    with gr.Row():
        evidence = gr.Dataframe(
            headers=["detector", "flagged (score)", "thresholds", "seconds"],
            label="Each detector's evidence",
            interactive=False,
            wrap=True,
            elem_id="evidence-table",
        )
    with gr.Row():
        inverted = gr.Image(
            label="Triggers at work: a clean image, the trigger, the image stamped (the model's answer on each)",
            type="pil",
            interactive=False,
            elem_id="trigger-pictures",
        )
        scores = gr.Image(
            label="Each detector's per-label score against its clean-calibrated threshold (dashed)",
            type="pil",
            interactive=False,
            elem_id="detector-scores",
        )
    with gr.Row():
        flagged = gr.Dataframe(
            headers=["label", "score", "captured", "predicted", "explanation"],
            label="Flagged labels (oracle-guided scan)",
            interactive=False,
            elem_id="flagged-table",
        )
        chart = gr.Plot(label="Predictions per label, and those a small window captured")
    with gr.Row():
        triggers = gr.Gallery(label="Trigger candidates (reconstructed)", columns=4, height=200, allow_preview=False)
        victims = gr.Gallery(
            label="Victims (the trigger's box in red)", columns=8, height=200, allow_preview=False, elem_id="victims"
        )
    files = gr.File(label="Scan report (HTML, JSON)", file_count="multiple", interactive=False)
    gr.Markdown("#### Paste a trigger candidate")
    with gr.Row():
        trigger = gr.Dropdown([], label="Trigger candidate")
        position = gr.Radio(["bottom-right", "top-left", "centre", "random"], value="bottom-right", label="Where")
        image = gr.Image(type="filepath", label="Image (default: the last one selected in Investigate)", height=200)
    go = gr.Button("Paste and predict")
    with gr.Row():
        pasted = gr.Image(label="With the trigger", height=200)
        paste_result = gr.Markdown(elem_id="paste-result")
    go.click(paste, [state, trigger, image, position], [pasted, paste_result], api_name="paste_trigger")
    return {
        "flagged": flagged,
        "chart": chart,
        "triggers": triggers,
        "victims": victims,
        "files": files,
        "trigger": trigger,
        "verdict": verdict,
        "evidence": evidence,
        "inverted": inverted,
        "scores": scores,
    }

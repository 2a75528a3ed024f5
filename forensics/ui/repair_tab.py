"""Repair tab: fine-tune the suspect model with a chosen defense, live progress and cancel; CA/ASR before/after."""

from __future__ import annotations

import json

import gradio as gr

from forensics.defenses import DEFENSES
from forensics.pipelines.evaluate import defense_defaults
from forensics.pipelines.repair import run_repair
from forensics.pipelines.report import before_after_chart
from forensics.ui.common import cancel_flag, gr_progress, guarded, model_ref, new_job_dir, precision_choice

EXPLAIN = """**Repair** fine-tunes a copy of the model (your file is never overwritten) so the trigger stops deciding
the label. *oracle-finetune* (EftCLIP) uses the scan's compact set: the victims with the trigger inpainted away,
clean anchors, and anchors carrying the reconstructed trigger, all with their true labels. The other methods use
a clean budget from the probe set. **CA** (clean accuracy) should stay; **ASR** (attack success rate: the share of
triggered non-target images that land on the target) should fall. One repair runs at a time; others wait in line."""


def _settings(method: str, epochs: float, lr: float, extra: str) -> dict:
    defaults = defense_defaults(method)
    settings: dict = {}
    if epochs and "epochs" in defaults:
        settings["epochs"] = int(epochs)
    if lr and "lr" in defaults:
        settings["lr"] = float(lr)
    if extra and extra.strip():
        try:
            more = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise gr.Error(f"other settings must be a JSON object: {exc}", print_exception=False) from None
        if not isinstance(more, dict):
            raise gr.Error('other settings must be a JSON object, e.g. {"batch_size": 16}', print_exception=False)
        settings.update(more)
    return settings


@guarded
def show_defaults(method: str) -> str:
    """The chosen method's one-line summary and default settings."""
    cls = DEFENSES[method]
    return f"{getattr(cls, 'summary', '')}\n\nDefaults: `{json.dumps(defense_defaults(method))}`"


@guarded
def repair(
    state: dict,
    method: str,
    epochs: float,
    lr: float,
    budget: float,
    extra: str,
    precision: str = "fp32",
    request: gr.Request = None,
    progress=gr.Progress(),
) -> tuple:
    """Repair this session's model; returns the before/after chart and table, the files, and a summary."""
    if method not in DEFENSES:
        raise gr.Error(f"unknown repair method {method!r}", print_exception=False)
    needs_findings = getattr(DEFENSES[method], "needs_findings", False)
    if needs_findings and not state.get("scan_dir"):
        raise gr.Error(
            f"{method} repairs from a scan's findings: run a scan first (Investigate tab)", print_exception=False
        )
    stop = cancel_flag(request)
    stop.clear()
    out = new_job_dir("repair", request)
    kwargs = dict(
        method=method,
        settings=_settings(method, epochs, lr, extra),
        progress=gr_progress(progress),
        should_stop=stop.is_set,
        precision=precision,
    )
    if needs_findings:
        result = run_repair(model_ref(state), state["scan_dir"], out, **kwargs)
    else:
        result = run_repair(
            model_ref(state), None, out, probe=state.get("probe") or "demo", budget=int(budget), **kwargs
        )
    metrics = result  # before/after, samples, seconds and note as the call returned them
    keys = [k for k in metrics["before"] if metrics["before"][k] is not None and k.startswith(("ca", "asr"))]
    rows = [[k, round(metrics["before"][k], 4), round(metrics["after"][k], 4)] for k in keys]
    b, a = metrics["before"], metrics["after"]
    text = (
        f"### {method}: CA {b['ca']:.3f} → {a['ca']:.3f}"
        + (f", ASR {b['asr']:.3f} → {a['asr']:.3f}" if b.get("asr") is not None else "")
        + f"\n{metrics['samples_used']} samples, {metrics['seconds']:.0f} s. {metrics['note']}."
    )
    files = [result["model"], str(out / "report.html"), str(out / "metrics.json")]
    return before_after_chart(metrics), rows, files, text


def cancel(request: gr.Request = None) -> str:
    """Ask the running repair of this session to stop at its next step."""
    cancel_flag(request).set()
    return "Cancelling: the repair stops at its next step."


def build_repair_tab(state: gr.State) -> dict:
    """Components of the Repair tab, wired."""
    gr.Markdown(EXPLAIN)
    names = list(DEFENSES)
    with gr.Row():
        method = gr.Dropdown(names, value="oracle-finetune", label="Method")
        epochs = gr.Number(value=0, label="Epochs (0 = the method's default)", precision=0, minimum=0)
        lr = gr.Number(value=0, label="Learning rate (0 = default)", minimum=0)
        budget = gr.Slider(20, 250, value=120, step=10, label="Clean budget (methods without a scan)")
    with gr.Row():
        extra = gr.Textbox(label="Other settings (JSON)", placeholder='{"batch_size": 16}', scale=3)
        precision = precision_choice()
    about = gr.Markdown(show_defaults("oracle-finetune"))
    with gr.Row():
        run = gr.Button("Repair", variant="primary", elem_id="repair-button")
        stop = gr.Button("Cancel", variant="stop")
    summary = gr.Markdown(elem_id="repair-summary")
    with gr.Row():
        chart = gr.Plot(label="CA and ASR before / after")
        table = gr.Dataframe(
            headers=["metric", "before", "after"], label="Before / after", interactive=False, elem_id="repair-table"
        )
    files = gr.File(label="Repaired model (safetensors) and report", file_count="multiple", interactive=False)
    method.change(show_defaults, method, about, api_name=False)
    event = run.click(
        repair,
        [state, method, epochs, lr, budget, extra, precision],
        [chart, table, files, summary],
        api_name="repair",
        concurrency_limit=1,
        concurrency_id="repair",
    )
    stop.click(cancel, None, summary, api_name="cancel_repair", queue=False)
    return {"method": method, "event": event}

"""The workbench: the tabs assembled and cross-wired (the scan fills both Investigate and Findings)."""

from __future__ import annotations

import gradio as gr

from forensics.ui.common import BUDGET, initial_state
from forensics.ui.compare_tab import build_compare_tab
from forensics.ui.findings_tab import build_findings_tab
from forensics.ui.investigate_tab import SLOTS, announce, build_investigate_tab, estimate, quick_look, scan
from forensics.ui.learn_tab import build_learn_tab
from forensics.ui.model_tab import build_model_tab, startup
from forensics.ui.quota import Limits, UploadLimitMiddleware
from forensics.ui.repair_tab import build_repair_tab
from forensics.ui.zoo_tab import build_zoo_tab

INTRO = """# CLIP backdoor forensics
Load a suspect CLIP, let a segmentation oracle and CLIP's attributions disagree about what an image shows,
find the trigger, the hijacked label and its victims, and repair the model. The bundled **demo** model carries a
planted backdoor: press **Quick look** below to find it (each button shows how long it takes here)."""
# each scan depth queues on its own (limits: investigate_tab.SLOTS), so a full verdict never holds a quick look
CONCURRENCY_IDS = {"quick": "quick-look", "full": "full-verdict"}
# one estimate at a time, in the order asked: the arithmetic takes milliseconds once a model's costs are measured
# (seconds, once per model), and a page's later estimate (more images chosen) never lands before an earlier one
ESTIMATE_CONCURRENCY = 1


def build_app() -> gr.Blocks:
    """The whole workbench as one Blocks app (launch with ``queue()``; see ``app.py``)."""
    limits = f"*{Limits.from_env().describe()}*"  # a bad limit in the environment stops the start, in one line
    with gr.Blocks(title="CLIP backdoor forensics", delete_cache=(1800, 3600)) as app:
        state = gr.State(initial_state())
        gr.Markdown(INTRO)
        status = gr.Markdown(elem_id="model-status")
        with gr.Tabs(selected="investigate"):
            with gr.Tab("Model", id="model"):
                model = build_model_tab(state)
                gr.Markdown(limits, elem_id="model-upload-limits")
            with gr.Tab("Investigate", id="investigate"):
                inv = build_investigate_tab(state)
                gr.Markdown(limits, elem_id="investigate-upload-limits")
            with gr.Tab("Findings", id="findings"):
                fnd = build_findings_tab(state)
            with gr.Tab("Repair", id="repair"):
                build_repair_tab(state)
            with gr.Tab("Compare", id="compare"):
                build_compare_tab(state)
            with gr.Tab("Zoo audit", id="zoo"):
                build_zoo_tab(state)
            with gr.Tab("Learn", id="learn"):
                build_learn_tab()
        model["load"].click(lambda s: s, model["status"], status, api_name=False)
        model["status"].change(lambda s: s, model["status"], status, api_name=False)
        inputs = [state, inv["probe"], inv["upload"], inv["max_images"], inv["profile"], inv["detector_settings"]]
        outputs = [
            inv["summary"],
            inv["gallery"],
            fnd["flagged"],
            fnd["chart"],
            fnd["triggers"],
            fnd["victims"],
            fnd["files"],
            fnd["trigger"],
            fnd["verdict"],
            fnd["evidence"],
            fnd["inverted"],
            fnd["scores"],
            inv["queue"],
            state,
        ]
        for depth, button, run, api in (
            ("quick", inv["quick"], quick_look, "quick_look"),
            ("full", inv["full"], scan, "scan"),
        ):
            button.click(announce(depth), state, inv["queue"], queue=False, api_name=False).then(
                run,
                inputs,
                outputs,
                api_name=api,
                concurrency_limit=SLOTS[depth],
                concurrency_id=CONCURRENCY_IDS[depth],
                show_progress_on=[inv["summary"]],  # the queue line beside it stays readable while waiting
            )
        estimated = [inv["quick"], inv["full"], inv["estimate"], state]
        again = dict(api_name=False, concurrency_id="estimate", concurrency_limit=ESTIMATE_CONCURRENCY)
        for event in (inv["probe"].change, inv["upload"].change, inv["max_images"].change, inv["profile"].change):
            event(estimate, inputs, estimated, show_progress="hidden", **again)
        inv["detector_settings"].blur(estimate, inputs, estimated, show_progress="hidden", **again)
        # the status line on top changes on page load and with each model or oracle loaded: estimate again
        status.change(estimate, inputs, estimated, show_progress="hidden", **again)
        app.load(startup, state, [model["facts"], status], api_name=False)
    return app


def launch_kwargs() -> dict:
    """Settings for ``launch``: the upload limits, and no ``allowed_paths``.

    Every multipart request passes :class:`~forensics.ui.quota.UploadLimitMiddleware`, which refuses a file over
    ``FORENSICS_MAX_UPLOAD_MB`` while it streams and holds uploads to the session and server disk budgets; Gradio's
    own ``max_file_size`` is set to the same limit as a second check. Job folders are deliberately not served by
    path: Gradio serves the files a handler returns (it copies them into its cache under a salted content hash), so
    each session downloads its own outputs and nobody can fetch a file from another session's job folder by naming
    it (see ``forensics.ui.common``).
    """
    from starlette.middleware import Middleware

    limits = Limits.from_env()
    return {
        "max_file_size": limits.max_upload,
        "show_error": True,
        "app_kwargs": {"middleware": [Middleware(UploadLimitMiddleware, budget=BUDGET)]},
    }

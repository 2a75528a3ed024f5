"""The workbench: the tabs assembled and cross-wired (the scan fills both Investigate and Findings)."""

from __future__ import annotations

import gradio as gr

from forensics.ui.common import BUDGET, initial_state
from forensics.ui.compare_tab import build_compare_tab
from forensics.ui.findings_tab import build_findings_tab
from forensics.ui.investigate_tab import build_investigate_tab, scan
from forensics.ui.learn_tab import build_learn_tab
from forensics.ui.model_tab import build_model_tab, startup
from forensics.ui.quota import Limits, UploadLimitMiddleware
from forensics.ui.repair_tab import build_repair_tab
from forensics.ui.zoo_tab import build_zoo_tab

INTRO = """# CLIP backdoor forensics
Load a suspect CLIP, let a segmentation oracle and CLIP's attributions disagree about what an image shows,
find the trigger, the hijacked label and its victims, and repair the model. The bundled **demo** model carries a
planted backdoor: press **Scan for backdoors** below to find it."""
SCAN_CONCURRENCY = 2  # scans are CPU-bound; two at once keep a 2-core machine busy without starving the page


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
        inv["run"].click(
            scan,
            [state, inv["probe"], inv["upload"], inv["max_images"], inv["profile"], inv["detector_settings"]],
            [
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
                state,
            ],
            api_name="scan",
            concurrency_limit=SCAN_CONCURRENCY,
            concurrency_id="scan",
        )
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

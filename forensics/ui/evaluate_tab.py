"""The first workbench tab: pick a model and a probe set, see the model's facts and its CA/ASR."""
from __future__ import annotations

import gradio as gr

from ..errors import ForensicsError
from ..service import evaluate_model, model_facts


def _facts(model_spec: str) -> dict:
    try:
        return model_facts(model_spec)
    except ForensicsError as exc:
        raise gr.Error(str(exc)) from None


def _evaluate(model_spec: str, probe_spec: str, progress: gr.Progress = gr.Progress()) -> dict:
    try:
        return evaluate_model(model_spec, probe_spec, progress=lambda f, m: progress(f, desc=m))
    except ForensicsError as exc:
        raise gr.Error(str(exc)) from None


def build_app() -> gr.Blocks:
    """Model picker, facts, and a CA/ASR evaluation on the chosen probe set."""
    with gr.Blocks(title="CLIP backdoor forensics", delete_cache=(3600, 3600)) as app:
        gr.Markdown("# CLIP backdoor forensics\nLoad a suspect CLIP and measure its clean accuracy (CA) and attack "
                    "success rate (ASR). The bundled demo model carries a planted backdoor; its clean twin does not.")
        with gr.Row():
            model = gr.Dropdown(["demo", "demo-clean"], value="demo", label="Model", allow_custom_value=True,
                                info="demo, demo-clean, or a checkpoint path on the server")
            probe = gr.Dropdown(["demo", "demo-clean"], value="demo", label="Probe set", allow_custom_value=True)
        facts = gr.JSON(label="Model facts")
        run = gr.Button("Evaluate CA / ASR", variant="primary")
        result = gr.JSON(label="Evaluation")
        app.load(_facts, model, facts)
        model.change(_facts, model, facts)
        run.click(_evaluate, [model, probe], result)
    return app

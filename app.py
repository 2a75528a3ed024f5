"""Gradio workbench entry point: wiring only; every action calls the ``forensics`` library.

This first version loads a model, shows its facts and measures CA/ASR on a probe set; the
investigation, findings and repair tabs come with the forensics and UI issues.
"""
from __future__ import annotations

import os

import gradio as gr

from forensics.ui.evaluate_tab import build_app

if __name__ == "__main__":
    build_app().queue(default_concurrency_limit=1).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME"),
        server_port=int(os.environ["GRADIO_SERVER_PORT"]) if os.environ.get("GRADIO_SERVER_PORT") else None,
    )

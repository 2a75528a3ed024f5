"""Gradio workbench entry point: wiring only; every action calls the ``forensics`` library.

Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (Gradio's defaults otherwise);
GRADIO_SHARE=1 asks for a public share link. FORENSICS_ALLOW_SERVER_PATHS (folders, os.pathsep-separated) lets
users name checkpoints and probe sets inside those folders; without it only uploads are read (see
``forensics/ui/common.py`` for how sessions are kept apart).
"""

from __future__ import annotations

import os

from forensics.ui.workbench import build_app, launch_kwargs

demo = build_app()

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=1).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME"),
        server_port=int(os.environ["GRADIO_SERVER_PORT"]) if os.environ.get("GRADIO_SERVER_PORT") else None,
        share=os.environ.get("GRADIO_SHARE", "").lower() in ("1", "true", "yes"),
        **launch_kwargs(),
    )

"""Gradio workbench entry point: wiring only; every action calls the ``forensics`` library.

Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (Gradio's defaults otherwise);
GRADIO_SHARE=1 asks for a public share link. FORENSICS_ALLOW_SERVER_PATHS (folders, os.pathsep-separated) lets
users name checkpoints and probe sets inside those folders; without it only uploads are read (see
``forensics/ui/common.py`` for how sessions are kept apart). Uploads and results are held to disk limits, in MB:
FORENSICS_MAX_UPLOAD_MB (per file, default 1024, refused while it streams), FORENSICS_SESSION_DISK_MB (per session,
default 4096) and FORENSICS_DISK_BUDGET_MB (the whole server, default 16384; the files of the sessions idle longest
are removed first); ``forensics/ui/quota.py`` states the rules.
"""

from __future__ import annotations

import os

from forensics.core.errors import ForensicsError
from forensics.ui.workbench import build_app, launch_kwargs

try:
    demo = build_app()
except ForensicsError as exc:  # a bad setting in the environment: one line, no traceback
    raise SystemExit(f"error: {exc}") from None

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=1).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME"),
        server_port=int(os.environ["GRADIO_SERVER_PORT"]) if os.environ.get("GRADIO_SERVER_PORT") else None,
        share=os.environ.get("GRADIO_SHARE", "").lower() in ("1", "true", "yes"),
        **launch_kwargs(),
    )

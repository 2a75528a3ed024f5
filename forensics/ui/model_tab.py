"""Model tab: choose the suspect model (demo, clean twin, a checkpoint, a hub id), the oracle; see the facts."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import gradio as gr

from forensics.core.models import ModelRef, list_architectures
from forensics.oracles import list_oracles
from forensics.pipelines.evaluate import evaluate_model, model_facts
from forensics.ui.common import (
    CHECKPOINT,
    DEMO_CHOICES,
    HUB,
    MODEL_SOURCES,
    gr_progress,
    guarded,
    hub_spec,
    model_ref,
    new_job_dir,
    probe_choice,
    sam_checkpoint_path,
    scrub_paths,
    server_paths_enabled,
    typed_model_spec,
)

EXPLAIN = """**What this shows.** A CLIP model matches images with text. A *backdoored* CLIP behaves normally until
an image carries a small *trigger* (here a checkerboard patch); then it answers with the attacker's label,
whatever the image shows. The bundled **demo** model carries such a backdoor; its **clean twin** was trained
the same way without poison. Load either, or your own checkpoint; the facts below identify exactly what is loaded."""


CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def _uploaded_checkpoint(upload: str | list[str] | None, request: gr.Request | None = None) -> str | None:
    """The uploaded checkpoint, copied with any sidecar JSON uploaded beside it into one folder (as it was saved)."""
    files = [upload] if isinstance(upload, str) else list(upload or [])
    if not files:
        return None
    weights = [f for f in files if str(f).lower().endswith(CHECKPOINT_SUFFIXES)]
    if len(weights) != 1:
        raise gr.Error(
            "upload exactly one checkpoint file (.safetensors, .pt, .pth, .bin), optionally with its sidecar .json",
            print_exception=False,
        )
    folder = new_job_dir("upload", request)
    for f in files:
        shutil.copy(f, folder / Path(f).name)
    return str(folder / Path(weights[0]).name)


def _spec(
    source: str, upload: str | list[str] | None, path_text: str, hub: str, request: gr.Request | None = None
) -> str:
    if source in DEMO_CHOICES:
        return DEMO_CHOICES[source]
    if source == CHECKPOINT:
        uploaded = _uploaded_checkpoint(upload, request)
        if uploaded:
            return uploaded
        if not (path_text or "").strip():
            raise gr.Error("upload a checkpoint or type its path on the server", print_exception=False)
        return typed_model_spec(path_text)  # demo names, random:ARCH, or a path inside an allowed folder
    if source == HUB:
        if not (hub or "").strip():
            raise gr.Error("type a hub id (hf-hub:org/name) or ARCH:pretrained-tag", print_exception=False)
        return hub_spec(hub)  # never a file path
    raise gr.Error(f"unknown model source {source!r}", print_exception=False)


def public(record: Any) -> Any:
    """``record`` as the page (and the API) may show it: every absolute server path in its strings cut to the file's
    name, so neither where the server keeps files nor a session's upload folder reaches a caller."""
    if isinstance(record, dict):
        return {key: public(value) for key, value in record.items()}
    if isinstance(record, (list, tuple)):
        return [public(value) for value in record]
    return scrub_paths(record) if isinstance(record, str) else record


def _oracle_line(state: dict) -> str:
    import torch

    device = "GPU (" + torch.cuda.get_device_name(0) + ")" if torch.cuda.is_available() else "CPU (no GPU found)"
    oracle = state["oracle"]
    if oracle == "sam":
        oracle = f"SAM ({Path(state['sam_checkpoint']).name})"
    elif oracle == "fallback":
        oracle = "fallback (GrabCut, weight-free; give a SAM checkpoint path to use SAM)"
    model = state["model"]
    shown = Path(model).name if Path(model).is_absolute() else model  # a file's name, not where the server keeps it
    return f"**Loaded:** `{shown}` · **oracle:** {oracle} · **device:** {device}"


@guarded
def load_model_choice(
    source: str,
    upload: str | None,
    path_text: str,
    arch: str | None,
    hub: str,
    quick_gelu: bool,
    oracle: str,
    sam_checkpoint: str,
    state: dict,
    request: gr.Request = None,
) -> tuple[dict, str, dict]:
    """Load the chosen model (checked, safely), remember it for this session, and show its facts."""
    sam = sam_checkpoint_path(sam_checkpoint)  # the server's own SAM checkpoint, or one in an allowed folder
    if oracle == "sam" and not sam:
        raise gr.Error(
            "the SAM oracle needs a checkpoint path (vit_b / vit_l / vit_h .pth on the server)", print_exception=False
        )
    spec = _spec(source, upload, path_text, hub, request)
    arch = arch or None
    facts = model_facts(ModelRef(spec, arch=arch, quick_gelu=quick_gelu or None))
    state = {
        **state,
        "model": spec,
        "arch": arch,
        "quick_gelu": quick_gelu or None,
        "oracle": oracle,
        "sam_checkpoint": sam,
        "scan_dir": None,
        "report": None,
        "order": [],
    }
    return public(facts), _oracle_line(state), state


def build_model_tab(state: gr.State) -> dict:
    """Components of the Model tab, wired; returns those other tabs refer to."""
    gr.Markdown(EXPLAIN)
    with gr.Row():
        source = gr.Radio(MODEL_SOURCES, value=MODEL_SOURCES[0], label="Suspect model")
        oracle = gr.Dropdown(
            [n for n in list_oracles() if n != "ground-truth"],
            value="fallback",
            label="Segmentation oracle",
            info="SAM needs a checkpoint; the others are weight-free",
        )
    with gr.Row():
        upload = gr.File(
            label="Checkpoint upload (.safetensors, .pt, .pth, .bin; with its sidecar .json if this tool saved it)",
            type="filepath",
            file_count="multiple",
            file_types=[*CHECKPOINT_SUFFIXES, ".json"],
        )
        with gr.Column():
            path_text = gr.Textbox(
                label=(
                    "…or a checkpoint path on the server (or random:ARCH)"
                    if server_paths_enabled()
                    else "…or random:ARCH (server paths are disabled on this server)"
                ),
                placeholder="/models/clip.pt" if server_paths_enabled() else "random:tiny-vit",
            )
            arch = gr.Dropdown(
                list_architectures(),
                value=None,
                label="Architecture (when the file does not say)",
                allow_custom_value=False,
            )
            quick_gelu = gr.Checkbox(label="QuickGELU (OpenAI-trained weights)", value=False)
        with gr.Column():
            hub = gr.Textbox(label="Hub id or pretrained tag", placeholder="hf-hub:org/name  or  ViT-B-32:openai")
            sam_checkpoint = gr.Textbox(
                label="SAM checkpoint path (for the SAM oracle)", placeholder="/models/sam_vit_b.pth"
            )
    load = gr.Button("Load model", variant="primary")
    status = gr.Markdown()
    facts = gr.JSON(label="Model facts (architecture, parameters, SHA-256, tower)")
    with gr.Row():
        probe = gr.Dropdown(
            ["demo", "demo-clean"],
            value="demo",
            label="Probe set for CA / ASR",
            allow_custom_value=True,
            info="demo, demo-clean, or a CSV / class-folder path on the server"
            if server_paths_enabled()
            else "demo or demo-clean (server paths are disabled on this server)",
        )
        evaluate = gr.Button("Evaluate CA / ASR")
    scores = gr.JSON(label="Clean accuracy (CA) and attack success rate (ASR)")
    evaluate.click(evaluate_loaded, [state, probe], scores, api_name="evaluate")
    load.click(
        load_model_choice,
        [source, upload, path_text, arch, hub, quick_gelu, oracle, sam_checkpoint, state],
        [facts, status, state],
        api_name="load_model",
    )
    return {"facts": facts, "status": status, "load": load, "source": source, "upload": upload}


@guarded
def evaluate_loaded(state: dict, probe: str, progress=gr.Progress()) -> dict:
    """CA on the probe set's clean images and, on the demo models, ASR of the demo's planted trigger."""
    if not probe:
        raise gr.Error("choose a probe set", print_exception=False)
    return public(evaluate_model(model_ref(state), probe_choice(probe), progress=gr_progress(progress)))


@guarded
def startup(state: dict) -> tuple[dict, str]:
    """On page load: the demo model's facts and the active oracle/device line."""
    return public(model_facts(model_ref(state))), _oracle_line(state)

"""Learn tab (teaching): a four-step walkthrough of the demo's backdoor (forensics.pipelines.lesson), and any attack
applied to an image: the backdoored demo's answer changes, the clean twin's does not.
"""

from __future__ import annotations

import functools
import json

import gradio as gr

from forensics.attacks import attack_from_dict, build_attack, list_attacks
from forensics.core.data import demo_backdoor, load_probe_set
from forensics.pipelines.evaluate import get_model
from forensics.pipelines.lesson import STEPS, lesson_step
from forensics.ui.common import guarded

PLANTED = "the demo's planted trigger"
ATTACK_NOTES = {
    PLANTED: "The exact trigger the demo model was poisoned with: a small checkerboard at a random place.",
    "badnet": "BadNet: a small visible patch pasted somewhere in the image.",
    "blended": "Blended: the whole image is mixed 80/20 with a fixed noise pattern; hard to see, spread everywhere.",
    "wanet": "WaNet: a smooth, nearly invisible warp of the image geometry.",
    "sig": "SIG: a faint vertical stripe pattern (a sinusoid) added to the image.",
    "optimized-patch": (
        "BadCLIP-style optimised patch: a patch trained against a model to pull images to the target text."
    ),
}
EXPLAIN = """**Learn how a backdoor behaves.** An attacker who poisons a small share of the training pairs (image with a
trigger, caption naming the target) teaches CLIP a shortcut: trigger ⇒ target. Apply an attack below and compare the
**backdoored demo** model with its **clean twin**: only the backdoored one jumps to its target (*flower*) when it
sees its own trigger; other attacks it was not trained on leave both models largely unmoved."""


@guarded
def apply_attack(attack_name: str, params: str, image: str | None, seed: float) -> tuple:
    """Apply the chosen attack to the image; each demo model's prediction before and after."""
    from forensics.pipelines.explain import attack_side_by_side

    if attack_name == PLANTED:
        attack = attack_from_dict(demo_backdoor()["trigger"])
    else:
        try:
            extra = json.loads(params) if params and params.strip() else {}
        except json.JSONDecodeError as exc:
            raise gr.Error(f"attack parameters must be a JSON object: {exc}", print_exception=False) from None
        if not isinstance(extra, dict):
            raise gr.Error('attack parameters must be a JSON object, e.g. {"size": 0.15}', print_exception=False)
        attack = build_attack(attack_name, **extra)
    if not image:
        raise gr.Error("choose or upload an image first", print_exception=False)
    models = {"backdoored demo": get_model("demo"), "clean twin": get_model("demo-clean")}
    result = attack_side_by_side(attack, image, models, load_probe_set("demo").class_names, seed=int(seed or 0))
    rows = [
        [
            r["model"],
            f"{r['clean image']} ({r['clean probability']:.2f})",
            f"{r['attacked image']} ({r['attacked probability']:.2f})",
            "yes" if r["changed"] else "no",
        ]
        for r in result["rows"]
    ]
    return result["image"], result["attacked"], rows, ATTACK_NOTES.get(attack_name, "")


WALKTHROUGH = """**Walk through one backdoor**, one click per step, on the bundled models: what the trigger is, where
CLIP looks with and without it, why the segmentation oracle disagrees, and what the repair changes. Pick any demo
image (or upload one); the seed moves the stamped trigger."""


@guarded
def show_step(number: int, image: str | None, seed: float) -> tuple:
    """One walkthrough step on the chosen image: its text, pictures and table."""
    import pandas as pd

    if not image:
        raise gr.Error("choose or upload an image first", print_exception=False)
    step = lesson_step(number, image, int(seed or 0))
    table = pd.DataFrame(step.rows, columns=step.headers)
    return step.text, [(picture, caption) for picture, caption in step.pictures], table


def build_learn_tab() -> dict:
    """Components of the Learn tab, wired."""
    probe = load_probe_set("demo")
    examples = [str(probe.items[i].image) for i in probe.clean_indices()[:8]]
    gr.Markdown(WALKTHROUGH)
    with gr.Row():
        lesson_image = gr.Image(
            type="filepath", value=examples[0] if examples else None, label="Image", height=220, elem_id="lesson-image"
        )
        with gr.Column():
            lesson_seed = gr.Number(value=0, precision=0, label="Seed (where the trigger lands)")
            buttons = [gr.Button(f"{k + 1} · {title}", elem_id=f"lesson-step-{k + 1}") for k, title in enumerate(STEPS)]
    gr.Examples(examples, inputs=lesson_image, label="Demo images")
    lesson_text = gr.Markdown(elem_id="lesson-text")
    lesson_pictures = gr.Gallery(label="Pictures", columns=3, height=360, elem_id="lesson-pictures")
    lesson_table = gr.Dataframe(label="What the models answer", interactive=False)
    for k, button in enumerate(buttons):
        button.click(
            functools.partial(show_step, k + 1),
            [lesson_image, lesson_seed],
            [lesson_text, lesson_pictures, lesson_table],
            api_name=f"lesson_step_{k + 1}",
        )
    gr.Markdown("---")
    gr.Markdown(EXPLAIN)
    with gr.Row():
        attack = gr.Dropdown([PLANTED, *list_attacks()], value=PLANTED, label="Attack")
        params = gr.Textbox(label="Attack parameters (JSON, optional)", placeholder='{"size": 0.15}')
        seed = gr.Number(value=0, precision=0, label="Seed (where the trigger lands)")
    with gr.Row():
        image = gr.Image(type="filepath", value=examples[0] if examples else None, label="Image", height=220)
        clean = gr.Image(label="Clean (at model size)", height=220)
        attacked = gr.Image(label="Attacked", height=220)
    gr.Examples(examples, inputs=image, label="Demo images")
    go = gr.Button("Apply the attack", variant="primary")
    note = gr.Markdown()
    table = gr.Dataframe(
        headers=["model", "clean image", "attacked image", "changed"], label="Predictions", interactive=False
    )
    go.click(apply_attack, [attack, params, image, seed], [clean, attacked, table, note], api_name="learn_attack")
    return {"attack": attack, "image": image}

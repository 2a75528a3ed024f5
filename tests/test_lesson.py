"""The Learn tab's walkthrough: four steps on the bundled models, each one click, each picture drawn from them.

On a clean demo image of another class, the planted trigger sends the backdoored demo (not its clean twin) to the
target; occlusion puts the stamped image's answer on the trigger; no oracle region carries the target; and the
bundled repaired demo answers the object again, with its CA and ASR on the probe beside the backdoored model's."""

from __future__ import annotations

import functools

import pytest

gr = pytest.importorskip("gradio")

from forensics.core.data import demo_backdoor, load_probe_set  # noqa: E402
from forensics.core.errors import ForensicsError  # noqa: E402
from forensics.core.models import DEMO_MODELS, load_model  # noqa: E402
from forensics.pipelines.lesson import SHOWN_SIZE, STEPS, lesson_step  # noqa: E402

TARGET = demo_backdoor()["target"]


def _images(count: int) -> list[str]:
    """Clean probe images of classes other than the target, one per class, in probe order."""
    probe = load_probe_set("demo")
    chosen, seen = [], set()
    for i in probe.clean_indices():
        label = probe.class_names[probe.items[i].label]
        if label != TARGET and label not in seen:
            seen.add(label)
            chosen.append(str(probe.items[i].image))
    return chosen[:count]


@functools.lru_cache(maxsize=None)
def _step(image: str, number: int):
    return lesson_step(number, image, 0)


class _Walks(dict):
    """image -> its four steps, each computed on first use (so no one test carries every step's cost)."""

    def values(self):
        return [[_step(image, n) for n in range(1, len(STEPS) + 1)] for image in self]


@pytest.fixture(scope="module")
def steps() -> _Walks:
    """Every step on two images of other classes (variations), seed 0."""
    return _Walks.fromkeys(_images(2))


def _answer(cell: str) -> str:
    return cell.split(" (")[0]


def test_the_trigger_sends_the_backdoored_demo_not_its_twin_to_the_target(steps):
    for image in steps:
        first = _step(image, 1)
        backdoored, twin = first.rows
        assert backdoored[0] == "backdoored demo" and _answer(backdoored[2]) == TARGET
        assert _answer(backdoored[1]) != TARGET and _answer(twin[2]) != TARGET
        assert len(first.pictures) == 3 and TARGET in first.text  # clean, stamped, the trigger enlarged


def test_occlusion_puts_the_stamped_answer_on_the_trigger_and_the_oracle_disagrees(steps):
    for image in steps:
        looks, oracle = _step(image, 2), _step(image, 3)
        assert looks.rows[1][:2] == ["stamped", TARGET]
        # what the stamped answer rests on piles on the trigger's place, far more than the clean answer's
        assert float(looks.rows[1][2].rstrip("%")) > 2 * float(looks.rows[0][2].rstrip("%")) + 5
        assert oracle.rows[0][:2] == ["whole image", TARGET]
        assert all(row[1] != TARGET for row in oracle.rows[1:]), oracle.rows  # no object region is the target
        assert "not grounded" in oracle.text


def test_the_repaired_demo_answers_the_object_again(steps):
    for image in steps:
        repair = _step(image, 4)
        backdoored, repaired = repair.rows
        assert _answer(backdoored[2]) == TARGET and _answer(repaired[2]) != TARGET
        ca_before, asr_before = (float(v.rstrip("%")) for v in backdoored[3:])
        ca_after, asr_after = (float(v.rstrip("%")) for v in repaired[3:])
        assert asr_before >= 90 and asr_after <= 10 and ca_after >= ca_before - 3


def test_the_bundled_repaired_demo_is_fp16_and_names_its_repair():
    model = load_model("demo-repaired")
    assert DEMO_MODELS["demo-repaired"].stat().st_size <= 10 * 2**20
    assert model.facts.source.endswith("demo_repaired.safetensors")
    side = DEMO_MODELS["demo-repaired"].with_suffix(".json").read_text()
    assert '"method": "oracle-finetune"' in side and '"precision": "fp16"' in side
    from forensics.pipelines.evaluate import evaluate_model

    repaired, backdoored = evaluate_model("demo-repaired"), evaluate_model("demo")
    assert repaired["asr"] <= 0.05 < 0.95 <= backdoored["asr"] and repaired["ca"] >= backdoored["ca"] - 0.03


@pytest.mark.parametrize("number", [0, 5, "2"])
def test_a_step_out_of_range_is_one_line(number):
    with pytest.raises(ForensicsError, match="the walkthrough has steps 1 to 4"):
        lesson_step(number, _images(1)[0])


def test_the_learn_tab_has_one_button_and_endpoint_per_step():
    from forensics.ui.learn_tab import show_step
    from forensics.ui.workbench import build_app

    app = build_app()
    names = {fn.api_name for fn in app.fns.values() if fn.api_name}
    assert {f"lesson_step_{k}" for k in range(1, 5)} <= names
    with pytest.raises(gr.Error, match="choose or upload an image first"):
        show_step(1, None, 0)
    text, pictures, table = show_step(1, _images(1)[0], 0)
    assert text.startswith("**The trigger.**") and len(pictures) == 3 and list(table.columns)[0] == "model"


def test_every_step_says_something_and_draws_from_the_bundled_models(steps):
    for walk in steps.values():
        assert [s.title for s in walk] == list(STEPS) and [s.number for s in walk] == [1, 2, 3, 4]
        for step in walk:
            assert step.text.startswith(f"**{step.title}.**") and step.pictures and step.rows
            assert all(p.size == (SHOWN_SIZE, SHOWN_SIZE) and caption for p, caption in step.pictures)
            assert all(len(row) == len(step.headers) for row in step.rows)


def test_make_demo_repaired_only_needs_a_built_lab(tmp_path, capsys):
    from forensics.cli import main

    for args, expected in (
        (["--repaired-only", "--data-only"], "--repaired-only and --data-only exclude each other"),
        (["--repaired-only", "--out", str(tmp_path / "empty")], "holds no demo model to repair"),
        (["--repaired-only", "--lab", "v2"], "needs --out DIR"),
    ):
        capsys.readouterr()
        assert main(["--quiet", "make-demo", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "empty").exists()

"""InverTune (detection + activation tuning) and CBPT (contrastive inversion + learnt prompts) on the demo lab.

The probe set's clean images are split (seed 0) into a repair budget of 120 and 135 held out; CA and the
true trigger's ASR are measured on the held-out images only. Settings are the defaults except where a
test needs fewer steps to stay within the suite's time budget (stated at each constant).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from forensics.core.data import load_probe_set
from forensics.core.errors import ForensicsError
from forensics.core.models import PROMPT_CONTEXT_KEY, load_model, save_model
from forensics.core.prompts import context_template, encode_text_with_context, prompt_tokens
from forensics.core.zeroshot import class_text_embeddings, evaluate, flip_rate
from forensics.defenses import DEFENSES, RepairData
from forensics.defenses.cbpt import CBPT
from forensics.defenses.invertune import InverTune
from forensics.detect.invertune import InverTuneDetectSettings, identify_target, run_invertune_detection
from forensics.pipelines.evaluate import default_trigger
from forensics.pipelines.repair import budget_repair_data, make_defense, split_clean_budget

# fewer steps than the defaults (20 patch / 40 inversion / 40 tuning): ~half the time; the larger mask
# that 25 inversion steps leave is balanced by a doubled clean-embedding keep term (paper 0.5)
INVERTUNE_TEST = {"iterations": 25, "keep_weight": 1.0, "detect": {"inversion_steps": 25}}
CBPT_TEST = {"inversion_steps": 30}  # default 40
TINY_INVERTUNE = {"iterations": 2, "detect": {"patch_steps": 2, "inversion_steps": 2}}
TINY_CBPT = {"inversion_steps": 2, "prompt_steps": 3}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.clip.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def lab():
    model = load_model("demo")
    probe = load_probe_set("demo")
    budget, held = split_clean_budget(probe, 120, seed=0)
    data = budget_repair_data(probe, budget, model.image_size)
    held_images = probe.load_images(model.image_size, held)
    held_labels = [probe.items[i].label for i in held]
    attack, target = default_trigger("demo")
    before = evaluate(model, held_images, held_labels, probe.class_names, attack, target)
    return {
        "model": model,
        "probe": probe,
        "data": data,
        "images": held_images,
        "labels": held_labels,
        "attack": attack,
        "target": target,
        "before": before,
        "state": snapshot(model),
    }


def measure(lab: dict, model) -> dict:
    return evaluate(model, lab["images"], lab["labels"], lab["probe"].class_names, lab["attack"], lab["target"])


@pytest.fixture(scope="module")
def invertune_run(lab):
    defense = InverTune(**INVERTUNE_TEST)
    seen = []
    result = defense.repair(lab["model"], lab["data"], progress=lambda f, m: seen.append(f))
    return {"defense": defense, "result": result, "after": measure(lab, result.model), "progress": seen}


@pytest.fixture(scope="module")
def cbpt_run(lab):
    defense = CBPT(**CBPT_TEST)
    result = defense.repair(lab["model"], lab["data"])
    return {"defense": defense, "result": result, "after": measure(lab, result.model)}


# --------------------------------------------------------------------------- InverTune


@pytest.mark.slow
def test_invertune_identifies_flower(invertune_run, lab):
    ident = invertune_run["result"].settings["detection"]["identification"]
    assert ident["target"] == "flower" == lab["target"]
    rise = ident["rise"]
    assert max(rise, key=rise.get) == "flower"
    assert ident["share_before"]["flower"] < 0.15 and ident["share_after"]["flower"] >= 0.8
    flagged = invertune_run["result"].settings["detection"]["flagged"]
    assert flagged["label"] == "flower" and flagged["score"] == pytest.approx(rise["flower"])
    assert any("identified by the adversarial patch" in n for n in invertune_run["result"].notes)


@pytest.mark.slow
def test_invertune_inverted_trigger_flips_held_out(invertune_run, lab):
    detection = invertune_run["defense"].detection
    assert detection.mask.shape == (1, 128, 128) and detection.pattern.shape == (3, 128, 128)
    assert 0 <= float(detection.mask.min()) and float(detection.mask.max()) <= 1
    assert detection.trigger.mask_area < 0.08  # a small trigger, not an image-wide overlay
    rate, n = flip_rate(
        lab["model"],
        lab["images"],
        lab["labels"],
        lab["probe"].class_names,
        "flower",
        detection.mask,
        detection.pattern,
    )
    assert n == sum(label != 7 for label in lab["labels"])
    assert rate >= 0.8  # measured 1.00 on the 117 held-out non-flower images


@pytest.mark.slow
def test_invertune_repair_lowers_asr_keeps_ca(invertune_run, lab):
    before, after = lab["before"], invertune_run["after"]
    assert before["asr"] > 0.9
    assert after["asr"] <= before["asr"] - 0.6  # measured 0.97 -> 0.00
    assert after["ca"] >= before["ca"] - 0.10  # measured 0.496 -> 0.437
    assert same_state(snapshot(lab["model"]), lab["state"])  # the input model is untouched
    result = invertune_run["result"]
    assert len(result.settings["tuned_layers"]) == 3 and all(
        n.startswith("layer") for n in result.settings["tuned_layers"]
    )
    assert all(0 < c for c in result.settings["critical_neurons"].values())
    json.dumps(result.settings)  # goes into the repair report as is
    assert invertune_run["progress"] and invertune_run["progress"][-1] == pytest.approx(1.0)
    assert all(a <= b + 1e-9 for a, b in zip(invertune_run["progress"], invertune_run["progress"][1:]))


# --------------------------------------------------------------------------- CBPT


@pytest.mark.slow
def test_cbpt_repair_lowers_asr_keeps_ca(cbpt_run, lab):
    before, after = lab["before"], cbpt_run["after"]
    assert after["asr"] <= before["asr"] - 0.6  # measured 0.97 -> 0.00
    assert after["ca"] >= before["ca"] - 0.10  # measured 0.496 -> 0.489
    repaired = cbpt_run["result"].model
    assert same_state(snapshot(repaired), lab["state"])  # CLIP stays frozen: only prompts are learnt
    assert same_state(snapshot(lab["model"]), lab["state"]) and lab["model"].class_prompts is None
    prompts = repaired.class_prompts
    assert prompts["class_names"] == lab["probe"].class_names and prompts["context"].shape == (10, 4, 128)
    dummy = cbpt_run["result"].settings["dummy_trigger"]
    assert dummy["label"] == "flower" and dummy["verified_asr"] >= 0.8 and dummy["mask_area"] < 0.08
    json.dumps(cbpt_run["result"].settings)


@pytest.mark.slow
def test_cbpt_model_saves_reloads_and_evaluates_the_same(cbpt_run, lab, tmp_path):
    repaired = cbpt_run["result"].model
    path = save_model(repaired, tmp_path / "cbpt.safetensors")
    assert PROMPT_CONTEXT_KEY in load_file(str(path))
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["class_prompts"]["class_names"] == lab["probe"].class_names
    loaded = load_model(str(path))  # the extra key is no "unexpected key"
    assert torch.equal(loaded.class_prompts["context"], repaired.class_prompts["context"])
    again = measure(lab, loaded)
    assert again["ca"] == cbpt_run["after"]["ca"] and again["asr"] == cbpt_run["after"]["asr"]
    # other class names fall back to the plain templates, exactly as the original model does
    subset = ["flower", "tree"]
    assert torch.allclose(class_text_embeddings(loaded, subset), class_text_embeddings(lab["model"], subset), atol=1e-6)
    assert not torch.allclose(
        class_text_embeddings(loaded, lab["probe"].class_names),
        class_text_embeddings(lab["model"], lab["probe"].class_names),
        atol=1e-3,
    )


def test_prompt_key_without_class_names_is_ignored_not_unexpected(lab, tmp_path):
    model = load_model("demo")
    names = lab["probe"].class_names
    model.class_prompts = {
        "class_names": names,
        "context": torch.zeros(len(names), 4, 128),
        "template": context_template(4),
    }
    path = save_model(model, tmp_path / "p.safetensors")
    sidecar = json.loads(path.with_suffix(".json").read_text())
    del sidecar["class_prompts"]
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    loaded = load_model(str(path))
    assert loaded.class_prompts is None
    assert any("learnt prompts" in n and "ignored" in n for n in loaded.facts.notes)


# --------------------------------------------------------------------------- text path, ViT, determinism, errors


@pytest.mark.parametrize("spec", ["demo", "random:tiny-vit"])
def test_encode_text_with_context_matches_encode_text(spec):
    model = load_model(spec)
    tokens = model.tokenizer(["a photo of a flower.", "a drawing of an apple.", "clip art of a house."])
    with torch.no_grad():
        context = model.clip.token_embedding(tokens[:, 1:5])
        assert torch.equal(encode_text_with_context(model.clip, tokens, context), model.clip.encode_text(tokens))
        shared = encode_text_with_context(model.clip, tokens, torch.zeros(4, 128))
    assert shared.shape == (3, 128) and torch.isfinite(shared).all()
    placeholders = prompt_tokens(model, ["flower", "apple"], context_template(4), 4)
    assert (placeholders[:, 1:5] == placeholders[0, 1]).all()


def test_vit_smoke_both_defenses(lab):
    vit = load_model("random:tiny-vit")
    data = lab["data"]
    small = RepairData(
        images=data.images[:24], labels=data.labels[:24], kinds=data.kinds[:24], class_names=data.class_names
    )
    state = snapshot(vit)
    tuned = InverTune(**TINY_INVERTUNE).repair(vit, small)
    assert all(n.startswith("transformer.resblocks.") for n in tuned.settings["tuned_layers"])
    assert not same_state(snapshot(tuned.model), state)
    prompted = CBPT(**TINY_CBPT).repair(vit, small)
    assert prompted.model.class_prompts["context"].shape == (10, 4, 128)
    result = evaluate(prompted.model, lab["images"][:16], lab["labels"][:16], data.class_names)
    assert 0.0 <= result["ca"] <= 1.0
    assert same_state(snapshot(vit), state)


def test_deterministic_by_seed(lab):
    data = lab["data"]
    x, y = data.images[:32], data.labels[:32]
    a = identify_target(lab["model"], x, y, data.class_names, steps=3, seed=3)
    b = identify_target(lab["model"], x, y, data.class_names, steps=3, seed=3)
    assert torch.equal(a["patch"], b["patch"]) and a["share_after"] == b["share_after"]
    small = RepairData(images=x, labels=y, kinds=data.kinds[:32], class_names=data.class_names)
    first, second = CBPT(**TINY_CBPT, seed=5), CBPT(**TINY_CBPT, seed=5)
    ctx1 = first.repair(lab["model"], small).model.class_prompts["context"]
    ctx2 = second.repair(lab["model"], small).model.class_prompts["context"]
    assert torch.equal(ctx1, ctx2) and torch.equal(first.trigger[0], second.trigger[0])
    other = CBPT(**TINY_CBPT, seed=6)
    other.repair(lab["model"], small)
    assert not torch.equal(first.trigger[1], other.trigger[1])


def test_flagged_label_skips_identification(lab):
    data = lab["data"]
    small = RepairData(
        images=data.images[:32],
        labels=data.labels[:32],
        kinds=data.kinds[:32],
        class_names=data.class_names,
        flagged=["flower"],
    )
    result = InverTune(iterations=1, detect={"inversion_steps": 2}).repair(lab["model"], small)
    assert result.settings["detection"]["identification"] == {"target": "flower", "given": True}
    assert "given by the flagged labels" in result.notes[0]


@pytest.mark.parametrize("method", ["invertune", "cbpt"])
def test_cancellation(lab, method):
    calls = {"n": 0}

    def stop_later() -> bool:  # let a few steps run, then cancel mid-way
        calls["n"] += 1
        return calls["n"] > 3

    defense = make_defense(method, TINY_INVERTUNE if method == "invertune" else TINY_CBPT)
    for should_stop in (lambda: True, stop_later):
        with pytest.raises(ForensicsError, match="repair cancelled"):
            defense.repair(lab["model"], lab["data"], should_stop=should_stop)
    assert same_state(snapshot(lab["model"]), lab["state"])


def test_registry_and_bad_input(lab):
    assert DEFENSES["invertune"] is InverTune and DEFENSES["cbpt"] is CBPT
    assert not InverTune.needs_findings and not CBPT.needs_findings
    defense = make_defense("invertune", {"detect": {"inversion_steps": 3}}, seed=4)
    assert defense.settings.detect.inversion_steps == 3 and defense.settings.seed == 4
    flat = make_defense("invertune", {"inversion_steps": 5, "patch_lr": 0.2, "iterations": 7})
    assert (flat.settings.detect.inversion_steps, flat.settings.detect.patch_lr, flat.settings.iterations) == (
        5,
        0.2,
        7,
    )
    with pytest.raises(ForensicsError, match="bad setting"):
        make_defense("invertune", {"no_such_setting": 1})
    data = lab["data"]
    with pytest.raises(ForensicsError, match="labels"):
        CBPT().repair(
            lab["model"],
            RepairData(images=data.images[:4], labels=data.labels[:3], kinds=[], class_names=data.class_names),
        )
    with pytest.raises(ForensicsError, match="not one of the classes"):
        InverTune().repair(
            lab["model"],
            RepairData(
                images=data.images[:4],
                labels=data.labels[:4],
                kinds=[],
                class_names=data.class_names,
                flagged=["banana"],
            ),
        )
    with pytest.raises(ForensicsError, match="model takes 128 px"):
        run_invertune_detection(lab["model"], torch.rand(4, 3, 64, 64), [0, 1, 2, 3], data.class_names)
    with pytest.raises(ForensicsError, match="not one of the classes"):
        run_invertune_detection(lab["model"], data.images[:4], data.labels[:4], data.class_names, target="banana")
    with pytest.raises(ForensicsError, match="mask_channels"):
        run_invertune_detection(
            lab["model"],
            data.images[:4],
            data.labels[:4],
            data.class_names,
            InverTuneDetectSettings(mask_channels=2),
            target="flower",
        )
    with pytest.raises(ForensicsError):
        CBPT(n_ctx=0).repair(lab["model"], data)

"""CleanCLIP and ABD: augmentation units, the universal patch search, and repairs of the demo backdoor.

The demo runs split the demo probe's clean images (seeded) into a 120-image repair budget with its
captions and a 135-image held-out part that gives CA and ASR (true planted trigger). To stay within
the test budget they use 5 epochs instead of the defaults' 10 (ABD: 40 patch steps instead of 60),
at each method's default lr; the thresholds leave a margin over what that measured (CA/ASR
0.496/0.974 before; CleanCLIP 0.519/0.000, ABD 0.600/0.171 after).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forensics.core.data import load_probe_set
from forensics.core.errors import ForensicsError
from forensics.core.models import load_model, new_model
from forensics.core.tokenizer import WordTokenizer
from forensics.core.zeroshot import class_text_embeddings, evaluate, predict
from forensics.defenses import DEFENSES, RepairData, build_defense
from forensics.defenses.abd import ABD, find_universal_patch, paste_patch, patch_side
from forensics.defenses.cleanclip import CleanCLIP, cleanclip_loss
from forensics.pipelines.evaluate import default_trigger
from forensics.training.augment import (
    STOP_WORDS,
    SYNONYMS,
    autoaugment_views,
    eda_caption,
    eda_views,
    eda_words,
    synonyms_of,
)

BUDGET = 120


@pytest.fixture(scope="module", autouse=True)
def few_threads():
    """The machine is small and shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo():
    model = load_model("demo")
    probe = load_probe_set("demo")
    clean = np.array(probe.clean_indices())
    np.random.default_rng(0).shuffle(clean)
    budget, held = clean[:BUDGET], clean[BUDGET:]
    data = RepairData(
        images=probe.load_images(model.image_size, budget),
        labels=[probe.items[i].label for i in budget],
        kinds=["anchor"] * len(budget),
        class_names=probe.class_names,
        captions=[probe.items[i].caption for i in budget],
    )
    held_images = probe.load_images(model.image_size, held)
    held_labels = [probe.items[i].label for i in held]
    attack, target = default_trigger("demo")

    def measure(m):
        out = evaluate(m, held_images, held_labels, probe.class_names, attack, target)
        return out["ca"], out["asr"]

    return {
        "model": model,
        "data": data,
        "held": held_images,
        "labels": held_labels,
        "target": target,
        "measure": measure,
        "before": measure(model),
        "classes": probe.class_names,
    }


def state_copy(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.clip.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- augmentation units

CAPTIONS = [
    "a drawing of a green arrow.",
    "an image of a large green arrow on the left.",
    "a photo of a medium white flower in the centre.",
    "clip art of a small grey house over a wavy background.",
]


def test_eda_is_deterministic_and_changes_captions():
    first = eda_views(CAPTIONS * 5, np.random.default_rng(3))
    assert first == eda_views(CAPTIONS * 5, np.random.default_rng(3))
    assert first != eda_views(CAPTIONS * 5, np.random.default_rng(4))
    for caption, view in zip(CAPTIONS * 5, first):
        assert view != caption.replace(",", "")  # every view differs (other operations serve as fall-backs)
        assert view.endswith(".")
        words, original = eda_words(view), eda_words(caption)
        assert abs(len(words) - len(original)) <= max(1, int(0.1 * len(original))) + 1
    # with alpha 0.1 EDA edits about one word of a short caption; most words stay
    kept = np.mean(
        [len(set(eda_words(v)) & set(eda_words(c))) / len(set(eda_words(c))) for c, v in zip(CAPTIONS * 5, first)]
    )
    assert kept > 0.75


def test_eda_synonyms_respect_a_vocabulary_and_cover_the_demo():
    vocab = {"a", "photo", "picture", "image", "of", "arrow", "drawing", "sketch"}
    rng = np.random.default_rng(0)
    for _ in range(30):
        view = eda_caption("a photo of a arrow.", rng, known_words=vocab)
        assert set(eda_words(view)) <= vocab
    assert set(synonyms_of("photo", vocab)) == {"picture", "image"}
    assert synonyms_of("zebra") == []
    # every content word of the demo captions has built-in synonyms
    probe = load_probe_set("demo")
    words = {w for item in probe.items for w in eda_words(item.caption)} - STOP_WORDS
    assert words and all(w in SYNONYMS for w in words), sorted(w for w in words if w not in SYNONYMS)
    assert eda_caption("", rng) == ""
    assert set(eda_words(eda_caption("flower", rng))) <= {"flower", "bloom", "blossom"}
    with pytest.raises(ForensicsError):
        eda_caption("a photo", rng, alpha=2.0)


def test_autoaugment_views_shapes_ranges_and_determinism():
    ramp = torch.linspace(0, 1, 64)
    image = torch.stack([ramp[None, :].expand(64, 64), ramp[:, None].expand(64, 64), ramp[None, :] * ramp[:, None]])
    images = image.expand(24, 3, 64, 64).contiguous()
    state = torch.get_rng_state()
    a = autoaugment_views(images, torch.Generator().manual_seed(1))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not consumed
    b = autoaugment_views(images, torch.Generator().manual_seed(1))
    c = autoaugment_views(images, torch.Generator().manual_seed(2))
    assert a.shape == images.shape and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and torch.equal((a * 255).round() / 255, a)
    changed = (a - images).abs().flatten(1).mean(1) > 0.01
    assert changed.float().mean() > 0.5  # most images get a visible operation (measured: 18 of 24)
    with pytest.raises(ForensicsError):
        autoaugment_views(images[:, :1], torch.Generator())
    with pytest.raises(ForensicsError):
        autoaugment_views(images, torch.Generator(), policy="nope")


def test_cleanclip_loss_prefers_matching_views():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(50.0)
    good, parts = cleanclip_loss(emb, emb, emb, emb, scale)
    bad, _ = cleanclip_loss(emb, emb.roll(1, 0), emb.roll(1, 0), emb.roll(1, 0), scale)
    assert good < 0.01 < bad and set(parts) == {"clip", "inmodal"}
    only_clip, _ = cleanclip_loss(emb, emb, emb.roll(1, 0), emb.roll(1, 0), scale, inmodal_weight=0.0)
    assert only_clip < 0.01


def test_paste_patch_places_the_patch_and_passes_gradients():
    images = torch.zeros(4, 3, 32, 32)
    patch = torch.ones(3, 5, 5, requires_grad=True)
    out = paste_patch(images, patch, torch.Generator().manual_seed(0))
    assert torch.equal(out.flatten(1).sum(1), torch.full((4,), 75.0))
    out.sum().backward()
    assert torch.equal(patch.grad, torch.full((3, 5, 5), 4.0))
    assert patch_side(128, 16 / 224) == 9 and patch_side(128, 0.1) == 13 and patch_side(8, 0.01) == 2


# --------------------------------------------------------------------------- registry, bad input, cancel


def test_registered_and_bad_input(demo):
    assert DEFENSES["cleanclip"] is CleanCLIP and DEFENSES["abd"] is ABD
    assert not CleanCLIP.needs_findings and not ABD.needs_findings
    assert build_defense("abd", epochs=3).settings.epochs == 3
    data = demo["data"]
    one = RepairData(images=data.images[:1], labels=data.labels[:1], kinds=["anchor"], class_names=data.class_names)
    small = RepairData(
        images=data.images[:4, :, :64, :64], labels=data.labels[:4], kinds=["anchor"] * 4, class_names=data.class_names
    )
    for defense in (CleanCLIP(), ABD()):
        with pytest.raises(ForensicsError, match="at least two"):
            defense.repair(demo["model"], one)
        with pytest.raises(ForensicsError, match="px"):
            defense.repair(demo["model"], small)
    with pytest.raises(ForensicsError):
        CleanCLIP(epochs=0).repair(demo["model"], data)


def test_cancel_raises(demo):
    before = state_copy(demo["model"])
    for defense in (CleanCLIP(), ABD()):
        with pytest.raises(ForensicsError, match="cancelled"):
            defense.repair(demo["model"], demo["data"], should_stop=lambda: True)
    assert same_state(before, state_copy(demo["model"]))


# --------------------------------------------------------------------------- determinism and towers


def tiny_data(data: RepairData, n: int = 8, captions: bool = True) -> RepairData:
    return RepairData(
        images=data.images[:n],
        labels=data.labels[:n],
        kinds=["anchor"] * n,
        class_names=data.class_names,
        captions=data.captions[:n] if captions else None,
    )


def test_same_seed_same_weights(demo):
    data = tiny_data(demo["data"])
    quick = {"epochs": 1, "batch_size": 4}
    for make in (
        lambda seed: CleanCLIP(seed=seed, **quick),
        lambda seed: ABD(seed=seed, patch_steps=2, patch_batch_size=4, **quick),
    ):
        a, b, c = (make(seed).repair(demo["model"], data).model for seed in (0, 0, 1))
        assert same_state(state_copy(a), state_copy(b))
        assert not same_state(state_copy(a), state_copy(c))


def test_vit_smoke_with_class_prompts():
    words = sorted({w for item in load_probe_set("demo").items for w in eda_words(item.caption)})
    model = new_model("tiny-vit", tokenizer=WordTokenizer(words), seed=0)
    assert model.tower == "vit"
    images = torch.rand(8, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    data = RepairData(images=images, labels=[0, 1] * 4, kinds=["anchor"] * 8, class_names=["arrow", "flower"])
    before = state_copy(model)
    for defense in (CleanCLIP(epochs=1, batch_size=4), ABD(epochs=1, batch_size=4, patch_steps=3, patch_batch_size=4)):
        result = defense.repair(model, data)
        after = state_copy(result.model)
        assert not same_state(before, after) and all(torch.isfinite(v).all() for v in after.values())
        assert len(result.history) == 1 and np.isfinite(result.history[0]["loss"])
        emb = class_text_embeddings(result.model, data.class_names)
        assert predict(result.model, images, emb).shape == (8, 2)
    assert same_state(before, state_copy(model))
    assert ABD().settings.patch_ratio == 0.1 and defense.last_patch.shape == (3, 13, 13)


# --------------------------------------------------------------------------- the demo backdoor


@pytest.mark.slow
def test_cleanclip_lowers_demo_asr(demo):
    ca0, asr0 = demo["before"]
    assert asr0 > 0.9
    before = state_copy(demo["model"])
    seen: list[float] = []
    result = CleanCLIP(epochs=5).repair(demo["model"], demo["data"], progress=lambda f, msg: seen.append(f))
    ca, asr = demo["measure"](result.model)
    print(f"CleanCLIP held-out CA {ca0:.3f} -> {ca:.3f}, ASR {asr0:.3f} -> {asr:.3f}")
    assert asr <= 0.3 and ca >= ca0 - 0.10
    assert same_state(before, state_copy(demo["model"]))
    assert result.samples_used == BUDGET and len(result.history) == 5
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    assert float(result.model.clip.logit_scale.detach().exp()) <= 100.0 + 1e-4


@pytest.mark.slow
def test_abd_finds_a_backdoor_like_patch_and_lowers_demo_asr(demo):
    ca0, asr0 = demo["before"]
    model, target = demo["model"], demo["classes"].index(demo["target"])
    before = state_copy(model)
    defense = ABD(epochs=5, patch_steps=40)
    seen: list[float] = []
    result = defense.repair(model, demo["data"], progress=lambda f, msg: seen.append(f))
    ca, asr = demo["measure"](result.model)
    print(f"ABD held-out CA {ca0:.3f} -> {ca:.3f}, ASR {asr0:.3f} -> {asr:.3f}; {result.notes[0]}")
    assert asr <= 0.35 and ca >= ca0 - 0.10
    assert same_state(before, state_copy(model))
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    # step 1 found what the backdoor does: the patch alone sends held-out non-target images to the target
    patch = defense.last_patch
    assert patch.shape == (3, 13, 13) and patch.min() >= 0 and patch.max() <= 1
    others = torch.tensor(demo["labels"]) != target
    patched = paste_patch(demo["held"][others], patch, torch.Generator().manual_seed(0))

    def target_share(m) -> float:
        emb = class_text_embeddings(m, demo["classes"])
        return float((predict(m, patched, emb).argmax(-1) == target).float().mean())

    share_before, share_after = target_share(model), target_share(result.model)
    print(f"ABD patch alone -> target share {share_before:.3f} before repair, {share_after:.3f} after")
    assert share_before > 0.6 and share_after < 0.4
    assert "universal patch 13 x 13 px" in result.notes[0]


def test_find_universal_patch_leaves_the_model_alone(demo):
    model = demo["model"]
    before = state_copy(model)
    flags = [p.requires_grad for p in model.clip.parameters()]
    stats: dict = {}
    patch = find_universal_patch(model, demo["data"].images[:16], steps=3, batch_size=8, seed=0, stats=stats)
    again = find_universal_patch(model, demo["data"].images[:16], steps=3, batch_size=8, seed=0)
    assert torch.equal(patch, again) and patch.shape == (3, 13, 13)
    assert stats["loss_first"] > 0 and "patched_cos_after" in stats
    assert same_state(before, state_copy(model))
    assert flags == [p.requires_grad for p in model.clip.parameters()]
    assert all(p.grad is None for p in model.clip.parameters()) and not model.clip.training

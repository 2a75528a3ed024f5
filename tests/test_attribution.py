"""Attribution: Grad-CAM (ViT and ResNet towers, 128 and 224 px), occlusion, region ablation, mass, overlays.

Grad-CAM and occlusion are checked against hand-computed references on tiny random CLIPs; a fake
model whose logit depends only on the pixels inside a known box checks that occlusion and region
ablation find that box. Random CLIPs often give all-negative Grad-CAM/occlusion evidence for a
class; since both are linear in the class embedding, pairing an embedding ``e`` with ``-e``
guarantees one of the two targets has positive evidence.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from forensics import attribution as A
from forensics.core.errors import ForensicsError
from forensics.core.models import new_model
from forensics.core.tokenizer import WordTokenizer
from forensics.core.zeroshot import class_text_embeddings

G = importlib.import_module("forensics.attribution.gradcam")  # the module (the package exports the function)
R = importlib.import_module("forensics.attribution.region_ablation")

WORDS = ["a", "photo", "of", "the", "cat", "dog", "car"]
SIZE = 128


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Stay on one thread: the machine is small and shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_models() -> dict:
    tok = WordTokenizer(WORDS)
    out = {}
    for arch in ("tiny-rn", "tiny-vit"):
        model = new_model(arch, tokenizer=tok, seed=0)
        model.clip.eval()
        emb = class_text_embeddings(model, ["cat", "dog"], ["a photo of the {}."])
        out[arch] = (model, torch.cat([emb, -emb]))  # classes: cat, dog, -cat, -dog
    return out


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def snapshot(model) -> tuple[list[bool], list[bool]]:
    return [m.training for m in model.clip.modules()], [p.requires_grad for p in model.clip.parameters()]


def check_maps(maps: torch.Tensor, n: int, size: int) -> None:
    assert maps.shape == (n, size, size)
    assert maps.dtype == torch.float32 and maps.device.type == "cpu"
    assert torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1
    for m in maps:  # per-image normalisation: max is 1 unless the map is all zero
        assert float(m.max()) in (0.0, 1.0) or abs(float(m.max()) - 1) < 1e-6


def normalise(maps: torch.Tensor) -> torch.Tensor:
    peak = maps.flatten(1).amax(1).view(-1, 1, 1)
    return torch.where(peak > 0, maps / peak.clamp_min(1e-30), torch.zeros_like(maps))


def reference_gradcam(model, emb, x, targets) -> torch.Tensor:
    """Grad-CAM by hand: activations and gradients at the documented layer, no captum."""
    visual = model.clip.visual
    layer = visual.transformer.resblocks[-1].ln_1 if model.tower == "vit" else visual.layer4
    saved = {}
    handle = layer.register_forward_hook(lambda mod, inp, out: saved.setdefault("act", out))
    try:
        logits = 100 * model.encode_image(x) @ emb.t()
    finally:
        handle.remove()
    act = saved["act"]
    (grad,) = torch.autograd.grad(logits[torch.arange(len(x)), targets].sum(), act)
    if model.tower == "vit":
        if not visual.transformer.batch_first:
            act, grad = act.transpose(0, 1), grad.transpose(0, 1)
        gh, gw = visual.grid_size
        act, grad = act[:, 1:], grad[:, 1:]  # drop the class token
        cam = (act * grad.mean(1, keepdim=True)).sum(-1).view(-1, 1, gh, gw)
    else:
        cam = (act * grad.mean((2, 3), keepdim=True)).sum(1, keepdim=True)
    cam = F.interpolate(cam.relu(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return normalise(cam.detach())


# --------------------------------------------------------------------------- Grad-CAM on real towers


@pytest.mark.parametrize("arch", ["tiny-rn", "tiny-vit"])
def test_gradcam_matches_hand_computed(tiny_models, images, arch):
    model, emb = tiny_models[arch]
    for targets in ([0, 1], [2, 3]):
        maps = A.gradcam(model, images, emb, targets, batch_size=1)
        check_maps(maps, 2, SIZE)
        assert torch.allclose(maps, reference_gradcam(model, emb, images, torch.tensor(targets)), atol=1e-4)
        assert torch.equal(maps, A.gradcam(model, images, emb, targets, batch_size=1))  # deterministic
    # e and -e flip the sign of the class-activation map, so one of them has positive evidence
    both = torch.stack([A.gradcam(model, images, emb, [c, c]) for c in (0, 2)])
    assert (both.flatten(2).amax(-1).amax(0) > 0).all()


def test_vit_gradcam_is_nonzero_on_patch_tokens(tiny_models, images):
    model, emb = tiny_models["tiny-vit"]
    maps = A.gradcam(model, images, emb, [0, 1])
    for m in maps:
        assert m.max() == 1 and (m > 0).float().mean() > 0.1 and m.std() > 0.05
    # the pitfall this layer choice avoids: at the last block's OUTPUT, patch tokens get no gradient
    saved = {}
    handle = model.clip.visual.transformer.resblocks[-1].register_forward_hook(lambda m, i, o: saved.setdefault("o", o))
    try:
        logit = (100 * model.encode_image(images) @ emb.t())[:, 0].sum()
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logit, saved["o"])
    grad = grad if model.clip.visual.transformer.batch_first else grad.transpose(0, 1)
    assert grad[:, 1:].abs().max() == 0 and grad[:, 0].abs().max() > 0


def test_gradcam_layer_choices(tiny_models, images):
    model, emb = tiny_models["tiny-rn"]
    visual = model.clip.visual
    auto = A.gradcam(model, images[:1], emb, 0, layer="auto")
    assert torch.equal(auto, A.gradcam(model, images[:1], emb, 0, layer="layer4"))  # 128 px: layer4 is 4x4
    assert G._resnet_layer(visual, "auto", 96) is visual.layer3  # layer4 would be 3x3
    assert G._resnet_layer(visual, None, 224) is visual.layer4
    check_maps(A.gradcam(model, images[:1], emb, 2, layer="layer3"), 1, SIZE)
    with pytest.raises(ForensicsError):
        A.gradcam(model, images[:1], emb, 0, layer="layer9")
    vit, vemb = tiny_models["tiny-vit"]
    check_maps(A.gradcam(vit, images[:1], vemb, 0, layer=1), 1, SIZE)
    with pytest.raises(ForensicsError):
        A.gradcam(vit, images[:1], vemb, 0, layer=99)


@pytest.fixture(scope="module")
def big_models() -> dict:
    return {arch: new_model(arch, seed=0) for arch in ("ViT-B-32", "RN50")}


@pytest.mark.parametrize("arch", ["ViT-B-32", "RN50"])
def test_gradcam_224_px(big_models, arch):
    model = big_models[arch]
    model.clip.eval()
    dim = model.clip.text_projection.shape[1] if hasattr(model.clip, "text_projection") else 512
    emb = F.normalize(torch.randn(1, dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    emb = torch.cat([emb, -emb])
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    before = snapshot(model)
    maps = torch.cat([A.gradcam(model, x, emb, c) for c in (0, 1)])
    check_maps(maps, 2, 224)
    assert maps.flatten(1).amax(1).max() == 1  # one of e / -e has positive evidence
    assert snapshot(model) == before and all(p.grad is None for p in model.clip.parameters())
    if model.tower == "vit":
        assert model.clip.visual.grid_size == (7, 7)
        # both maps are 7x7 token maps upsampled: they cannot both be zero almost everywhere
        assert (maps > 0).float().mean() > 0.1


# --------------------------------------------------------------------------- occlusion and ablation on real towers


def test_occlusion_matches_hand_computed(tiny_models, images):
    model, emb = tiny_models["tiny-rn"]
    x = images[:1]
    for target in (0, 2):
        maps = A.occlusion(model, x, emb, target, window=32, stride=32)
        check_maps(maps, 1, SIZE)
        with torch.no_grad():
            base = model.encode_image(x) @ emb[target] * 100
            ref = torch.zeros(SIZE, SIZE)
            for i in range(0, SIZE, 32):
                for j in range(0, SIZE, 32):
                    xo = x.clone()
                    xo[..., i : i + 32, j : j + 32] = x.mean((2, 3), keepdim=True)
                    ref[i : i + 32, j : j + 32] = base - model.encode_image(xo) @ emb[target] * 100
        assert torch.allclose(maps[0], normalise(ref.clamp_min(0)[None])[0], atol=1e-3)
    assert torch.equal(maps, A.occlusion(model, x, emb, 2, window=32, stride=32))  # deterministic
    # other batching regroups the forwards: equal up to float rounding (these logits move by ~0.01)
    assert torch.allclose(maps, A.occlusion(model, x, emb, 2, window=32, stride=32, batch_size=3), atol=1e-3)


def test_occlusion_defaults_and_batching(tiny_models, images):
    model, emb = tiny_models["tiny-vit"]
    maps = A.occlusion(model, images, emb, [0, 2])  # default 16-px window, stride 8
    check_maps(maps, 2, SIZE)
    single = A.occlusion(model, images[1:], emb, 2)  # 1 image x 16 windows per forward instead of 2 x 8
    assert torch.allclose(maps[1:], single, atol=1e-4)
    coarse = A.occlusion(model, images[1:], emb, 2, window=32)
    assert torch.equal(A.attribute("occlusion", model, images[1:], emb, 2, window=32), coarse)


def test_region_ablation_matches_hand_computed(tiny_models, images):
    model, emb = tiny_models["tiny-vit"]
    regions = [torch.zeros(3, SIZE, SIZE, dtype=torch.bool) for _ in range(2)]
    for reg in regions:
        reg[0, :64] = True
        reg[1, 64:, :64] = True
        reg[2, 32:96, 32:96] = True  # overlaps both: it owns the centre
    regions[1] = regions[1][:2]  # a different number of regions per image
    drops = A.region_ablation(model, images, emb, [0, 3], regions, batch_size=2)
    assert [d.shape for d in drops] == [(3,), (2,)]
    owner = R._feature_ids(regions, SIZE)
    with torch.no_grad():
        for n, t in enumerate([0, 3]):
            x = images[n : n + 1]
            base = float(model.encode_image(x) @ emb[t]) * 100
            for r in range(len(drops[n])):
                xo = torch.where(owner[n] == r + 1, x.mean((2, 3), keepdim=True), x)
                assert abs(float(drops[n][r]) - (base - float(model.encode_image(xo) @ emb[t]) * 100)) < 1e-3
    painted = A.region_ablation_map(model, images, emb, [0, 3], regions)
    check_maps(painted, 2, SIZE)
    assert all(
        torch.equal(a, b) for a, b in zip(drops, A.region_ablation(model, images, emb, [0, 3], regions, batch_size=2))
    )


# --------------------------------------------------------------------------- planted cue: only a box matters

BOX = (slice(36, 60), slice(8, 32))  # rows, cols of the cue in a 64-px image
FAKE_SIZE = 64


class BoxClassifier:
    """SuspectModel-like: a small conv net that sees only the pixels inside BOX.

    Embedding = normalise([mean conv response inside the box, 1, two random conv channels]);
    class 0 = brightness inside the box, so covering the bright cue lowers its logit.
    """

    image_size = FAKE_SIZE
    tower = "fake"

    def __init__(self):
        torch.manual_seed(0)
        self.clip = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
        with torch.no_grad():
            conv = self.clip[0]
            conv.weight[:2].zero_()
            conv.weight[0].fill_(1 / 27)
            conv.bias[:2] = torch.tensor([0.0, 1.0])
            conv.weight[2:] *= 0.1
            conv.bias[2:].zero_()
        self.mask = torch.zeros(1, 1, FAKE_SIZE, FAKE_SIZE)
        self.mask[..., BOX[0], BOX[1]] = 1

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.clip(x * self.mask) * self.mask
        return F.normalize(feats.sum((2, 3)) / self.mask.sum(), dim=-1)


@pytest.fixture(scope="module")
def planted():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, FAKE_SIZE, FAKE_SIZE, generator=gen) * 0.3
    x[..., BOX[0], BOX[1]] = 0.85 + 0.15 * torch.rand(2, 3, 24, 24, generator=gen)
    box = torch.zeros(FAKE_SIZE, FAKE_SIZE, dtype=torch.bool)
    box[BOX] = True
    emb = torch.eye(4)[:2]
    return BoxClassifier(), x, emb, box


def test_fake_model_only_sees_the_box(planted):
    model, x, emb, box = planted
    noisy = torch.where(box, x, torch.rand_like(x))
    assert torch.allclose(model.encode_image(x), model.encode_image(noisy))


def test_occlusion_finds_planted_cue(planted):
    model, x, emb, box = planted
    maps = A.occlusion(model, x, emb, [0, 0])  # default: 8-px window, stride 4
    check_maps(maps, 2, FAKE_SIZE)
    share = A.mass_inside(maps, box)
    assert (share >= 0.8).all(), share
    near = F.max_pool2d(box[None, None].float(), 15, stride=1, padding=7)[0, 0].bool()  # within 7 px
    assert (maps[:, ~near] == 0).all()  # no 8-px window there touches the box: no drop at all


def test_occlusion_estimate_matches_hand_computed(tiny_models, images):
    for arch in ("tiny-rn", "tiny-vit"):
        model, emb = tiny_models[arch]
        x = images[:1]
        est = A.occlusion_estimate_signed(model, x, emb, [1])
        assert est.shape == (1, SIZE, SIZE) and torch.isfinite(est).all()
        xr = x.clone().requires_grad_(True)
        logits = 100 * model.encode_image(xr) @ emb.t()
        log_odds = logits[0, 1] - torch.cat([logits[0, :1], logits[0, 2:]]).logsumexp(0)
        (grad,) = torch.autograd.grad(log_odds, xr)
        ref = ((x - x.mean((2, 3), keepdim=True)) * grad).sum(1)
        assert torch.allclose(est, ref, atol=1e-4 * float(ref.abs().max()))
        assert torch.equal(A.occlusion_estimate(model, x, emb, [1]), normalise(est.clamp_min(0)))
        # first order: a small window's estimated drop predicts the real one
        fill = x.mean((2, 3), keepdim=True)
        shaded = x.clone()
        shaded[..., 40:48, 40:48] = 0.9 * x[..., 40:48, 40:48] + 0.1 * fill
        with torch.no_grad():
            lo = 100 * model.encode_image(shaded) @ emb.t()
        real = float(log_odds.detach() - (lo[0, 1] - torch.cat([lo[0, :1], lo[0, 2:]]).logsumexp(0)))
        assert real == pytest.approx(0.1 * float(est[0, 40:48, 40:48].sum()), rel=0.1, abs=1e-3)


def test_predict_and_estimate_is_the_prediction_and_its_estimate_in_one_pass(tiny_models, images):
    for arch in ("tiny-rn", "tiny-vit"):
        model, emb = tiny_models[arch]
        probs, est = A.predict_and_estimate(model, images, emb, batch_size=2)  # several batches
        with torch.no_grad():
            ref_probs = (100 * model.encode_image(images) @ emb.t()).softmax(-1)
        assert probs.shape == ref_probs.shape and torch.allclose(probs, ref_probs, atol=1e-4)
        pred = probs.argmax(-1)
        assert torch.equal(pred, ref_probs.argmax(-1))
        ref_est = A.occlusion_estimate_signed(model, images, emb, pred, batch_size=2)
        assert torch.allclose(est, ref_est, atol=1e-5 * float(ref_est.abs().max())), arch
        assert est.abs().sum() > 0


def test_occlusion_estimate_finds_planted_cue_and_survives_no_gradient(planted):
    model, x, emb, box = planted
    maps = A.occlusion_estimate(model, x, emb, [0, 0])
    check_maps(maps, 2, FAKE_SIZE)
    assert (A.mass_inside(maps, box) >= 0.99).all()  # the model sees nothing else

    class Constant(BoxClassifier):
        def encode_image(self, x):
            return F.normalize(torch.ones(len(x), 4), dim=-1)

    assert (A.occlusion_estimate_signed(Constant(), x, emb, [0, 0]) == 0).all()  # no gradient: zero, no error
    probs, est = A.predict_and_estimate(Constant(), x, emb)
    assert (est == 0).all() and probs.shape == (2, len(emb)) and torch.allclose(probs.sum(-1), torch.ones(2))


def test_region_ablation_finds_planted_cue(planted):
    model, x, emb, box = planted
    quads = torch.zeros(4, FAKE_SIZE, FAKE_SIZE, dtype=torch.bool)
    quads[0, :32, :32] = quads[1, :32, 32:] = quads[2, 32:, 32:] = True
    quads[3] = box
    order = quads[[0, 1, 3, 2]]  # box is region 2
    drops = A.region_ablation(model, x, emb, [0, 0], [order, order])
    for d in drops:
        assert int(d.argmax()) == 2 and d[2] > 1
        assert d[[0, 1, 3]].abs().max() < 1e-3
    painted = A.region_ablation_map(model, x, emb, [0, 0], [order, order])
    check_maps(painted, 2, FAKE_SIZE)
    assert (A.mass_inside(painted, box) >= 0.8).all()
    # overlaps: the later region owns shared pixels; a region fully covered by later ones scores 0
    bottom_left = torch.zeros(FAKE_SIZE, FAKE_SIZE, dtype=torch.bool)
    bottom_left[32:, :32] = True
    (first_box,) = A.region_ablation(model, x[:1], emb, 0, [torch.stack([box, bottom_left])])
    assert first_box[0] == 0 and first_box[1] > 1
    (box_last,) = A.region_ablation(model, x[:1], emb, 0, [torch.stack([bottom_left, box])])
    assert abs(float(box_last[0])) < 1e-3 and torch.isclose(box_last[1], first_box[1], atol=1e-4)


def test_gradcam_needs_an_open_clip_tower(planted):
    model, x, emb, _ = planted
    with pytest.raises(ForensicsError):
        A.gradcam(model, x, emb, 0)


# --------------------------------------------------------------------------- model state is left alone


def test_model_state_is_restored(tiny_models, images):
    for arch, (model, emb) in tiny_models.items():
        model.clip.train()
        model.clip.visual.eval()  # mixed modes must come back exactly
        for p in model.clip.transformer.parameters():
            p.requires_grad_(False)
        before = snapshot(model)
        try:
            regions = [torch.ones(1, SIZE, SIZE, dtype=torch.bool)]
            A.gradcam(model, images[:1], emb, 0)
            assert snapshot(model) == before
            A.occlusion(model, images[:1], emb, 0, window=64, stride=64)
            assert snapshot(model) == before
            A.region_ablation(model, images[:1], emb, 0, regions)
            assert snapshot(model) == before
            assert all(p.grad is None for p in model.clip.parameters())
        finally:
            model.clip.eval()
            for p in model.clip.parameters():
                p.requires_grad_(True)
        assert not any(m.training for m in model.clip.modules())


def test_results_do_not_depend_on_train_mode(tiny_models, images):
    model, emb = tiny_models["tiny-vit"]
    ref = A.gradcam(model, images[:1], emb, 0)
    model.clip.train()
    try:
        assert torch.equal(A.gradcam(model, images[:1], emb, 0), ref)
    finally:
        model.clip.eval()


# --------------------------------------------------------------------------- inputs, mass, pictures, registry


def test_bad_inputs(tiny_models, images):
    model, emb = tiny_models["tiny-rn"]
    with pytest.raises(ForensicsError):
        A.occlusion(model, images[:, :, :64, :64], emb, 0)  # wrong size
    with pytest.raises(ForensicsError):
        A.gradcam(model, images, emb, [0])  # one target for two images
    with pytest.raises(ForensicsError):
        A.gradcam(model, images, emb, [0, 9])  # no class 9
    with pytest.raises(ForensicsError):
        A.region_ablation(model, images, emb, 0, [torch.ones(1, SIZE, SIZE, dtype=torch.bool)])
    with pytest.raises(ForensicsError):
        A.occlusion(model, images[:1], emb, 0, window=32, baseline="nope")
    with pytest.raises(ForensicsError):
        A.attribute("lime", model, images, emb, 0)


def test_mass_inside_exact():
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, 0], maps[0, 3, 3] = 3.0, 1.0
    maps[1] = 1.0
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2, :2] = True
    assert torch.equal(A.mass_inside(maps, mask), torch.tensor([0.75, 0.25, 0.0]))
    per_image = torch.stack([mask, ~mask, mask])
    assert torch.equal(A.mass_inside(maps, per_image), torch.tensor([0.75, 0.75, 0.0]))
    assert torch.equal(A.mass_inside(maps[0], mask), torch.tensor([0.75]))
    negative = maps[:1].clone()
    negative[0, 3, 3] = -5.0  # negative evidence is no mass
    assert torch.equal(A.mass_inside(negative, mask), torch.tensor([1.0]))
    with pytest.raises(ForensicsError):
        A.mass_inside(maps, torch.ones(5, 5, dtype=torch.bool))


def test_overlay_and_heatmap_image():
    image = torch.zeros(3, 8, 8)
    image[0] = 1.0  # red
    heat = torch.zeros(8, 8)
    heat[:4] = 1.0
    out = A.overlay(image, heat, alpha=0.5, cmap="gray")
    assert isinstance(out, Image.Image) and out.size == (8, 8) and out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 128, 128) and out.getpixel((0, 7)) == (128, 0, 0)
    assert A.overlay(image, heat, alpha=0.0).getpixel((3, 3)) == (255, 0, 0)
    small = A.overlay(image, heat[::2, ::2])  # heatmaps are resized to the image
    assert small.size == (8, 8)
    pic = A.heatmap_to_image(heat, cmap="gray", size=16)
    assert pic.size == (16, 16) and pic.getpixel((0, 0)) == (255, 255, 255) and pic.getpixel((0, 15)) == (0, 0, 0)
    with pytest.raises(ForensicsError):
        A.heatmap_to_image(heat, cmap="no-such-map")


def test_registry(tiny_models, images):
    assert set(A.ATTRIBUTIONS) == {"gradcam", "occlusion", "occlusion-estimate", "region-ablation"}
    model, emb = tiny_models["tiny-vit"]
    assert torch.equal(A.attribute("gradcam", model, images, emb, [0, 1]), A.gradcam(model, images, emb, [0, 1]))
    predicted = A.gradcam(model, images, emb, None)  # None: the model's own prediction
    with torch.no_grad():
        top = (model.encode_image(images) @ emb.t()).argmax(-1)
    assert torch.equal(predicted, A.gradcam(model, images, emb, top))

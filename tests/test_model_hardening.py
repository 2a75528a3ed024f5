"""Suspect checkpoints are untrusted input: NaN/Inf weights are counted and refused by check_finite_outputs, a config
that implies a huge model is refused before anything is allocated, and every malformed sidecar field gives one
ForensicsError line that names the field (never "unexpected KeyError")."""

from __future__ import annotations

import copy
import json
import resource
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch

from forensics.core.errors import ForensicsError
from forensics.core.models import (
    MAX_PARAMETERS_ENV,
    PROMPT_CONTEXT_KEY,
    architecture_config,
    build_bounded,
    check_finite_outputs,
    count_nonfinite,
    load_model,
    new_model,
    read_sidecar,
    save_model,
)
from forensics.core.tokenizer import WordTokenizer

WORDS = ["cat", "dog", "a", "photo", "of"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer() -> WordTokenizer:
    return WordTokenizer(WORDS)


@pytest.fixture(scope="module")
def tiny_rn(tokenizer):
    return new_model("tiny-rn", tokenizer=tokenizer, seed=0)


@pytest.fixture(scope="module")
def tiny_vit(tokenizer):
    return new_model("tiny-vit", tokenizer=tokenizer, seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_rn) -> Path:
    """A tiny-rn checkpoint with its sidecar, saved by the project; tests copy it before altering anything."""
    return save_model(tiny_rn, tmp_path_factory.mktemp("saved") / "m.safetensors")


def copy_with_sidecar(saved: Path, folder: Path, sidecar: object | str) -> Path:
    path = folder / "m.safetensors"
    shutil.copy(saved, path)
    text = sidecar if isinstance(sidecar, str) else json.dumps(sidecar)
    path.with_suffix(".json").write_text(text)
    return path


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert text and "\n" not in text and "Traceback" not in text, text
    assert "unexpected" not in text.lower() or "unexpected keys" in text, text
    return text


def poke(model, name: str, index: tuple, value: float) -> None:
    with torch.no_grad():
        dict(model.clip.named_parameters())[name][index] = value


# --------------------------------------------------------------------------- 1. NaN and infinite weights


@pytest.mark.parametrize("arch", ["tiny-rn", "tiny-vit"])
def test_nan_in_image_tower_is_refused(arch, tiny_rn, tiny_vit):
    model = (tiny_rn if arch == "tiny-rn" else tiny_vit).clone()
    poke(model, "visual.conv1.weight", (0, 0, 0, 0), float("nan"))
    with pytest.raises(ForensicsError) as excinfo:
        check_finite_outputs(model)
    assert one_line(excinfo) == (
        "the model's outputs are NaN or infinite (1 of its weights is non-finite); it cannot be scanned or repaired"
    )


def test_infinite_text_weight_is_refused(tiny_vit, tokenizer):
    model = tiny_vit.clone()
    poke(model, "token_embedding.weight", (tokenizer.sot_id, 0), float("inf"))
    poke(model, "token_embedding.weight", (tokenizer.sot_id, 1), float("-inf"))
    with pytest.raises(ForensicsError) as excinfo:
        check_finite_outputs(model)
    assert "(2 of its weights are non-finite)" in one_line(excinfo)


def test_overflow_with_finite_weights_is_refused(tiny_rn):
    model = tiny_rn.clone()
    with torch.no_grad():
        model.clip.visual.conv1.weight.fill_(3e38)
    assert count_nonfinite(model.clip.state_dict().values()) == 0
    with pytest.raises(ForensicsError) as excinfo:
        check_finite_outputs(model)
    assert "outputs are NaN or infinite (all its weights are finite" in one_line(excinfo)


@pytest.mark.parametrize("arch", ["tiny-rn", "tiny-vit"])
def test_clean_model_passes_and_keeps_its_modes(arch, tiny_rn, tiny_vit):
    model = (tiny_rn if arch == "tiny-rn" else tiny_vit).clone()
    model.clip.train()
    state = {k: v.clone() for k, v in model.clip.state_dict().items()}
    assert check_finite_outputs(model) is None
    assert model.clip.training and all(m.training for m in model.clip.modules())
    assert all(p.requires_grad for p in model.clip.parameters())
    # BatchNorm running statistics untouched: the check runs in eval mode
    assert all(torch.equal(v, state[k]) for k, v in model.clip.state_dict().items())
    assert model.facts.nonfinite_parameters == 0
    assert not any("NaN" in n for n in model.facts.notes)


def test_count_nonfinite():
    tensors = [
        torch.tensor([1.0, float("nan"), float("inf"), -float("inf")]),
        torch.full((3,), 6e4, dtype=torch.float16),  # a finite fp16 tensor whose fp16 sum would overflow
        torch.tensor([float("nan")], dtype=torch.bfloat16),
        torch.tensor([1, 2, 3]),  # integers: never non-finite
        torch.tensor([complex(1, float("nan")), complex(1, 0)]),
        torch.empty(0),
        torch.empty(10**12, device="meta"),
    ]
    assert count_nonfinite(tensors) == 3 + 0 + 1 + 0 + 1


def test_saved_nan_checkpoint_reports_its_count(tiny_rn, tmp_path):
    model = tiny_rn.clone()
    poke(model, "visual.conv1.weight", (0, 0, 0, 0), float("nan"))
    poke(model, "visual.conv1.weight", (0, 0, 0, 1), float("nan"))
    poke(model, "token_embedding.weight", (2, 3), float("inf"))
    with torch.no_grad():
        model.clip.visual.bn1.running_var[0] = float("nan")  # buffers count too
    path = save_model(model, tmp_path / "broken.safetensors")
    with pytest.warns(RuntimeWarning, match="4 weights are NaN or infinite"):
        loaded = load_model(str(path))
    facts = loaded.facts
    assert facts.nonfinite_parameters == 4 and facts.to_dict()["nonfinite_parameters"] == 4
    assert "4 weights are NaN or infinite: this model's outputs cannot be trusted" in facts.notes
    with pytest.raises(ForensicsError) as excinfo:
        check_finite_outputs(loaded)
    assert "(4 of its weights are non-finite)" in one_line(excinfo)


def test_saved_half_checkpoint_counts_overflowed_weights(tiny_rn, tmp_path):
    model = tiny_rn.clone()
    poke(model, "visual.conv1.weight", (0, 0, 0, 0), 1e6)  # beyond fp16: saved as inf
    path = save_model(model, tmp_path / "half.safetensors", half=True)
    with pytest.warns(RuntimeWarning, match="1 weight is NaN or infinite"):
        loaded = load_model(str(path))
    assert loaded.facts.nonfinite_parameters == 1


def test_clean_checkpoint_loads_without_warning(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        loaded = load_model(str(saved))
    assert loaded.facts.nonfinite_parameters == 0
    check_finite_outputs(loaded)


# --------------------------------------------------------------------------- 2. resource bounds


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("tower", ["vision_cfg", "text_cfg"])
def test_huge_width_is_refused_quickly(saved, tmp_path, tower):
    sidecar = json.loads(saved.with_suffix(".json").read_text())
    sidecar["model_cfg"][tower]["width"] = 10**6
    path = copy_with_sidecar(saved, tmp_path, sidecar)
    before, start = peak_rss_mb(), time.perf_counter()
    with pytest.raises(ForensicsError) as excinfo:
        load_model(str(path))
    elapsed = time.perf_counter() - start
    text = one_line(excinfo)
    assert elapsed < 1.0, elapsed
    assert peak_rss_mb() - before < 200
    assert text.startswith("sidecar m.json: field 'model_cfg' implies ") and MAX_PARAMETERS_ENV in text
    assert "above the limit of 5,000,000,000" in text


def test_huge_layer_count_is_refused_quickly(saved, tmp_path):
    # 1000 layers, not a million: were the cap gone, building them all would take the machine's memory
    sidecar = json.loads(saved.with_suffix(".json").read_text())
    sidecar["model_cfg"]["text_cfg"]["layers"] = 1000
    path = copy_with_sidecar(saved, tmp_path, sidecar)
    start = time.perf_counter()
    with pytest.raises(ForensicsError) as excinfo:
        load_model(str(path))
    assert time.perf_counter() - start < 1.0
    assert "field 'model_cfg.text_cfg.layers' is the number 1000; no CLIP" in one_line(excinfo)


def test_limit_counts_exactly_and_follows_the_variable(saved, tiny_rn, monkeypatch, tokenizer):
    clip = tiny_rn.clip
    size = sum(p.numel() for p in clip.parameters()) + sum(b.numel() for b in clip.buffers())
    monkeypatch.setenv(MAX_PARAMETERS_ENV, str(size))
    assert load_model(str(saved)).facts.parameters == tiny_rn.facts.parameters
    monkeypatch.setenv(MAX_PARAMETERS_ENV, str(size - 1))
    with pytest.raises(ForensicsError) as excinfo:
        load_model(str(saved))
    assert f"implies {size:,} parameters, above the limit of {size - 1:,}" in one_line(excinfo)
    with pytest.raises(ForensicsError) as excinfo:
        new_model("tiny-rn", tokenizer=tokenizer)
    assert one_line(excinfo).startswith("architecture tiny-rn implies")
    monkeypatch.setenv(MAX_PARAMETERS_ENV, "1e12")
    assert new_model("tiny-rn", tokenizer=tokenizer).facts.parameters == tiny_rn.facts.parameters
    for bad in ("lots", "0", "nan", "-5"):
        monkeypatch.setenv(MAX_PARAMETERS_ENV, bad)
        with pytest.raises(ForensicsError) as excinfo:
            load_model(str(saved))
        assert one_line(excinfo).startswith(f"{MAX_PARAMETERS_ENV} is ")


def test_bounded_build_matches_the_plain_build(tiny_vit):
    torch.manual_seed(0)
    clip = build_bounded(tiny_vit.config["model_cfg"], False, "architecture tiny-vit")
    assert sum(p.numel() for p in clip.parameters()) == tiny_vit.facts.parameters
    assert all(p.device.type == "cpu" for p in clip.parameters())
    # the meta-device count draws no random numbers: seeded builds stay what they were
    assert all(torch.equal(a, b) for a, b in zip(clip.state_dict().values(), tiny_vit.clip.state_dict().values()))


@pytest.mark.parametrize("arch", ["tiny-rn", "tiny-vit"])
def test_tiny_models_round_trip(arch, tiny_rn, tiny_vit, tmp_path):
    model = tiny_rn if arch == "tiny-rn" else tiny_vit
    loaded = load_model(str(save_model(model, tmp_path / "ok.safetensors")))
    assert loaded.facts.parameters == model.facts.parameters and loaded.facts.architecture == arch
    images = torch.full((1, 3, 128, 128), 0.3)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), model.encode_image(images), atol=1e-5)


# --------------------------------------------------------------------------- 3. malformed sidecars


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(d):
        for key in keys[:-1]:
            d = d[key]
        d[keys[-1]] = value

    return change


def _drop(*keys):
    def change(d):
        for key in keys[:-1]:
            d = d[key]
        del d[keys[-1]]

    return change


# (change to the saved sidecar, the field the message must name)
BAD_SIDECARS = {
    "format-wrong": (_set("format", "clip-forensics/0"), "format"),
    "format-number": (_set("format", 1), "format"),
    "format-missing": (_drop("format"), "format"),
    "arch-missing": (_drop("arch"), "arch"),
    "arch-number": (_set("arch", 5), "arch"),
    "arch-multiline": (_set("arch", "tiny\nrn"), "arch"),
    "quick_gelu-string": (_set("quick_gelu", "no"), "quick_gelu"),
    "model_cfg-string": (_set("model_cfg", "abc"), "model_cfg"),
    "model_cfg-missing": (_drop("model_cfg"), "model_cfg"),
    "model_cfg-unknown-key": (_set("model_cfg", "multimodal_cfg", {}), "model_cfg.multimodal_cfg"),
    "embed_dim-string": (_set("model_cfg", "embed_dim", "big"), "model_cfg.embed_dim"),
    "embed_dim-missing": (_drop("model_cfg", "embed_dim"), "model_cfg.embed_dim"),
    "embed_dim-negative": (_set("model_cfg", "embed_dim", -5), "model_cfg.embed_dim"),
    "embed_dim-float": (_set("model_cfg", "embed_dim", 128.5), "model_cfg.embed_dim"),
    "vision_cfg-list": (_set("model_cfg", "vision_cfg", [1, 2]), "model_cfg.vision_cfg"),
    "text_cfg-missing": (_drop("model_cfg", "text_cfg"), "model_cfg.text_cfg"),
    "vision-width-string": (_set("model_cfg", "vision_cfg", "width", "wide"), "model_cfg.vision_cfg.width"),
    "vision-width-zero": (_set("model_cfg", "vision_cfg", "width", 0), "model_cfg.vision_cfg.width"),
    "vision-layers-short": (_set("model_cfg", "vision_cfg", "layers", [1, 1]), "model_cfg.vision_cfg.layers"),
    "vision-unknown-key": (_set("model_cfg", "vision_cfg", "bogus", 1), "model_cfg.vision_cfg.bogus"),
    "vision-image_size-huge": (_set("model_cfg", "vision_cfg", "image_size", 8192), "model_cfg.vision_cfg.image_size"),
    "text-heads-not-dividing": (_set("model_cfg", "text_cfg", "heads", 7), "model_cfg"),
    "text-mlp_ratio-string": (_set("model_cfg", "text_cfg", "mlp_ratio", "4"), "model_cfg.text_cfg.mlp_ratio"),
    "text-vocab-too-small": (_set("model_cfg", "text_cfg", "vocab_size", 5), "tokenizer.words"),
    "tokenizer-missing": (_drop("tokenizer"), "tokenizer"),
    "tokenizer-string": (_set("tokenizer", "word"), "tokenizer"),
    "tokenizer-list": (_set("tokenizer", ["cat"]), "tokenizer"),
    "tokenizer-kind-unknown": (_set("tokenizer", "kind", "bpe"), "tokenizer.kind"),
    "tokenizer-kind-bpe-on-small-vocab": (_set("tokenizer", "kind", "open_clip"), "tokenizer.kind"),
    "tokenizer-words-missing": (_drop("tokenizer", "words"), "tokenizer.words"),
    "tokenizer-words-string": (_set("tokenizer", "words", "cat dog"), "tokenizer.words"),
    "tokenizer-words-numbers": (_set("tokenizer", "words", [1, 2]), "tokenizer.words"),
    "tokenizer-context-string": (_set("tokenizer", "context_length", "long"), "tokenizer.context_length"),
    "tokenizer-context-mismatch": (_set("tokenizer", "context_length", 16), "tokenizer.context_length"),
    "preprocess-string": (_set("preprocess", "abc"), "preprocess"),
    "preprocess-std-zero": (_set("preprocess", "std", [0, 0, 0]), "preprocess.std"),
    "preprocess-mean-short": (_set("preprocess", "mean", [0.5]), "preprocess.mean"),
    "backdoor-number": (_set("backdoor", 3), "backdoor"),
    "backdoor-target-number": (_set("backdoor", {"target": 5}), "backdoor.target"),
    "backdoor-trigger-string": (_set("backdoor", {"target": "cat", "trigger": "badnet"}), "backdoor.trigger"),
    "class_prompts-string": (_set("class_prompts", "x"), "class_prompts"),
    "class_prompts-names-string": (_set("class_prompts", {"class_names": "cat", "template": "X {}."}), "class_names"),
    "class_prompts-names-empty": (_set("class_prompts", {"class_names": [], "template": "X {}."}), "class_names"),
    "class_prompts-template-missing": (_set("class_prompts", {"class_names": ["cat"]}), "class_prompts.template"),
    "class_prompts-template-number": (_set("class_prompts", {"class_names": ["cat"], "template": 3}), "template"),
}


@pytest.mark.parametrize("case", list(BAD_SIDECARS))
def test_malformed_sidecar_names_the_field(saved, tmp_path, case):
    change, field = BAD_SIDECARS[case]
    sidecar = copy.deepcopy(json.loads(saved.with_suffix(".json").read_text()))
    change(sidecar)
    path = copy_with_sidecar(saved, tmp_path, sidecar)
    with pytest.raises(ForensicsError) as excinfo:
        load_model(str(path))
    text = one_line(excinfo)
    assert text.startswith("sidecar m.json: field '"), text
    assert f"'{field}'" in text or f".{field}'" in text, text


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{", "sidecar m.json is not valid JSON: JSONDecodeError"),
        ("[" * 200_000, "sidecar m.json is not valid JSON: RecursionError"),
        (b"\xff\xfe\x00garbage", "sidecar m.json is not valid JSON: UnicodeDecodeError"),
    ],
)
def test_unreadable_sidecar_is_one_line(saved, tmp_path, content, expected):
    path = tmp_path / "m.safetensors"
    shutil.copy(saved, path)
    side = path.with_suffix(".json")
    side.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ForensicsError) as excinfo:
        load_model(str(path))
    assert one_line(excinfo).startswith(expected)


def test_json_of_someone_else_is_ignored(tmp_path, tiny_vit):
    path = save_model(tiny_vit, tmp_path / "m.safetensors")
    for other in ({"hello": 1}, [1, 2], "text"):
        path.with_suffix(".json").write_text(json.dumps(other))
        assert read_sidecar(path) is None


def test_valid_sidecar_variants_still_load(saved, tmp_path):
    sidecar = json.loads(saved.with_suffix(".json").read_text())
    sidecar["preprocess"] = None
    sidecar.pop("quick_gelu")
    sidecar["backdoor"] = {"attack": "badnet", "target": "cat", "trigger": {"attack": "badnet"}, "note": "free text"}
    sidecar["class_prompts"] = None
    sidecar["training"] = {"history": [{"epoch": 1, "loss": 1.0}]}
    sidecar["model_cfg"]["vision_cfg"]["patch_size"] = None  # as open_clip's own ResNet configs say
    loaded = load_model(str(copy_with_sidecar(saved, tmp_path, sidecar)))
    assert loaded.backdoor["target"] == "cat" and loaded.facts.architecture == "tiny-rn"


def test_learnt_prompts_must_fit_the_sidecar(tiny_vit, tmp_path):
    model = tiny_vit.clone()
    model.class_prompts = {"class_names": ["cat", "dog"], "context": torch.zeros(2, 4, 128), "template": "X X X X {}."}
    path = save_model(model, tmp_path / "p.safetensors")
    loaded = load_model(str(path))
    assert loaded.class_prompts["class_names"] == ["cat", "dog"]
    assert loaded.class_prompts["context"].shape == (2, 4, 128)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    sidecar["class_prompts"]["class_names"] = ["cat", "dog", "bird"]
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(ForensicsError) as excinfo:
        load_model(str(path))
    text = one_line(excinfo)
    assert text.startswith("sidecar p.json: field 'class_prompts' names 3 classes") and PROMPT_CONTEXT_KEY in text
    sidecar["class_prompts"]["key"] = "elsewhere"
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    with pytest.raises(ForensicsError) as excinfo:
        load_model(str(path))
    assert "field 'class_prompts.key'" in one_line(excinfo)


# --------------------------------------------------------------------------- 4. bounded compute per image
def _vit_with_patch_one(saved_vit: Path, folder: Path) -> Path:
    """A consistent tiny ViT with 1-pixel patches (16,384 tokens an image): weights and sidecar agree."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved_vit))
    width = state["visual.conv1.weight"].shape[0]
    state["visual.conv1.weight"] = torch.zeros(width, 3, 1, 1)
    state["visual.positional_embedding"] = torch.zeros(128 * 128 + 1, width)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.safetensors"
    save_file(state, str(path))
    sidecar = json.loads(saved_vit.with_suffix(".json").read_text())
    sidecar["model_cfg"]["vision_cfg"]["patch_size"] = 1
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


def _changed(saved: Path, folder: Path, tower_changes: dict) -> Path:
    sidecar = json.loads(saved.with_suffix(".json").read_text())
    sidecar["model_cfg"]["vision_cfg"].update(tower_changes)
    return copy_with_sidecar(saved, folder, sidecar)


@pytest.mark.parametrize(
    "case,expected",
    [
        ("vit-patch-1", "cuts each image into 16,384 tokens (patch size 1 at 128 px); no CLIP this tool scans"),
        ("vit-patch-2-at-512", "cuts each image into 65,536 tokens (patch size 2 at 512 px)"),
        ("resnet-at-4096", "cuts each image into 16,384 tokens (4096 px)"),
        ("vit-64-heads", "needs 1,074,266,176 values for one image's largest intermediate tensor"),
    ],
)
def test_a_model_with_too_many_tokens_per_image_is_refused_before_allocation(saved, tiny_vit, tmp_path, case, expected):
    if case == "vit-patch-1":
        path = _vit_with_patch_one(save_model(tiny_vit, tmp_path / "vit.safetensors"), tmp_path / "x")
    elif case == "resnet-at-4096":
        path = _changed(saved, tmp_path, {"image_size": 4096})
    else:
        vit = save_model(tiny_vit, tmp_path / "vit.safetensors")
        (tmp_path / "x").mkdir(exist_ok=True)
        changes = (
            {"patch_size": 2, "image_size": 512} if case == "vit-patch-2-at-512" else {"patch_size": 2, "width": 4096}
        )
        path = _changed(vit, tmp_path / "x", changes)
    before, start = peak_rss_mb(), time.perf_counter()
    with pytest.raises(ForensicsError) as excinfo:
        load_model(str(path))
    assert time.perf_counter() - start < 2.0
    assert peak_rss_mb() - before < 200  # refused before the weights (or one image's activations) exist
    text = one_line(excinfo)
    assert expected in text, text


def test_the_largest_open_clip_image_towers_stay_under_the_bounds():
    from forensics.core.models import MAX_IMAGE_TOKENS, build_clip, image_tower_cost

    for arch in ("ViT-H-14-378", "RN50x64", "ViT-B-32", "tiny-vit", "tiny-rn"):
        cfg = architecture_config(arch)
        with torch.device("meta"):
            clip = build_clip(cfg.get("model_cfg", cfg))
        cells, largest = image_tower_cost(clip.visual, arch)
        assert 0 < cells <= MAX_IMAGE_TOKENS and largest > 0

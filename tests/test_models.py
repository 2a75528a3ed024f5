"""Model loading: every checkpoint format round-trips, pickles that run code are refused,
mismatches are named, bad inputs give one clear ForensicsError, and saving is safe.

The two big random models (ViT-B-32, RN50) are built once per module and shared; each test
deletes the checkpoint files it writes (hundreds of MB each) when it ends.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from forensics.core.errors import CheckpointMismatchError, ForensicsError, UnsafeCheckpointError
from forensics.core.models import (
    SIDECAR_FORMAT,
    architecture_config,
    build_clip,
    clean_state_dict_keys,
    load_checkpoint,
    load_model,
    new_model,
    read_state_dict,
    save_model,
)
from forensics.core.tokenizer import WordTokenizer

BIG = ["ViT-B-32", "RN50"]
TOWER = {"ViT-B-32": "vit", "RN50": "resnet", "tiny-vit": "vit", "tiny-rn": "resnet"}
TEXTS = ["a photo of a cat"]
WORDS = ["cat", "dog", "a", "photo", "of"]


# --------------------------------------------------------------------------- helpers and fixtures


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """This module's work is one big op after another; with two threads on a 2-core machine that
    is busy elsewhere, OpenMP barriers made encoding and loading ~10x slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fixed_image(size: int) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1234))


def embed(model, texts=TEXTS) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(fixed_image(model.image_size)), model.encode_text(texts)


def message(excinfo: pytest.ExceptionInfo) -> str:
    return str(excinfo.value)


@dataclass
class Ref:
    """A random model with its embeddings on the fixed probe input."""

    arch: str
    model: object
    image_emb: torch.Tensor
    text_emb: torch.Tensor

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return self.model.clip.state_dict()

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.clip.parameters())


class Zoo:
    """Builds each big model (and its save_model checkpoint) at most once per module."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._refs: dict[str, Ref] = {}
        self._saved: dict[str, Path] = {}

    def __call__(self, arch: str) -> Ref:
        if arch not in self._refs:
            model = new_model(arch, seed=0)
            self._refs[arch] = Ref(arch, model, *embed(model))
        return self._refs[arch]

    def saved(self, arch: str) -> Path:
        """``save_model`` output (safetensors + sidecar) of the big model ``arch``."""
        if arch not in self._saved:
            self._saved[arch] = save_model(self(arch).model, self.folder / f"{arch}.safetensors")
        return self._saved[arch]

    def close(self) -> None:
        self._refs.clear()
        for path in self.folder.iterdir():
            path.unlink()


def _big_file_folder(fallback: Path) -> Path:
    """A fresh folder for checkpoints of hundreds of MB: in RAM (/dev/shm) when there is room,
    so that the writes do not wait on the disk; ``fallback`` otherwise."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 6 << 30:
            return Path(tempfile.mkdtemp(prefix="test_models-", dir=shm))
    except OSError:
        pass
    return fallback


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = _big_file_folder(tmp_path_factory.mktemp("zoo"))
    z = Zoo(folder)
    yield z
    z.close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def scratch(tmp_path):
    """A folder for huge checkpoint files, deleted when the test ends."""
    folder = _big_file_folder(tmp_path)
    yield folder
    if folder == tmp_path:
        for path in tmp_path.iterdir():
            path.unlink()
    else:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def word_tokenizer() -> WordTokenizer:
    return WordTokenizer(WORDS)


@pytest.fixture(scope="module", params=["tiny-vit", "tiny-rn"])
def tiny(request, word_tokenizer):
    model = new_model(request.param, tokenizer=word_tokenizer, seed=0)
    return Ref(request.param, model, *embed(model))


@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory, word_tokenizer) -> Path:
    """A small tiny-rn checkpoint saved by the project (for the bad-input tests)."""
    model = new_model("tiny-rn", tokenizer=word_tokenizer, seed=0)
    return save_model(model, tmp_path_factory.mktemp("tiny") / "tiny-rn.safetensors")


def assert_same_model(loaded, ref: Ref, path: Path) -> None:
    facts = loaded.facts
    assert facts.tower == TOWER[ref.arch]
    assert facts.image_size == ref.model.image_size
    assert facts.parameters == ref.parameters
    assert facts.sha256 == file_sha256(path)
    assert facts.source == str(path)
    image_emb, text_emb = embed(loaded)
    assert torch.allclose(image_emb, ref.image_emb, atol=1e-5)
    assert torch.allclose(text_emb, ref.text_emb, atol=1e-5)


# --------------------------------------------------------------------------- 1. round trips of every format


def _ddp(state: dict) -> dict:
    return {f"module.{k}": v for k, v in state.items()}


def write_safetensors_bare(ref: Ref, folder: Path) -> Path:
    path = folder / "bare.safetensors"
    save_file(ref.state, str(path))
    return path


def write_pt(ref: Ref, folder: Path) -> Path:
    path = folder / "plain.pt"
    torch.save(ref.state, path)
    return path


def write_pth(ref: Ref, folder: Path) -> Path:
    path = folder / "wrapped.pth"
    torch.save({"state_dict": ref.state}, path)
    return path


def write_bin_ddp(ref: Ref, folder: Path) -> Path:
    path = folder / "pytorch_model.bin"
    torch.save(_ddp(ref.state), path)
    return path


def write_cleanclip(ref: Ref, folder: Path) -> Path:
    path = folder / "epoch_64.pt"
    torch.save(
        {
            "epoch": 64,
            "name": "cleanclip",
            "state_dict": _ddp(ref.state),
            "optimizer": {
                "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                "param_groups": [{"lr": 1e-5, "weight_decay": 0.1, "params": [0]}],
            },
        },
        path,
    )
    return path


# (writer, pass arch?, architecture expected to be inferred from shapes?)
FORMATS = {
    "safetensors-bare": (write_safetensors_bare, True, False),
    "pt-plain": (write_pt, True, False),
    "pth-state_dict": (write_pth, False, True),
    "bin-ddp": (write_bin_ddp, True, False),
    "cleanclip-no-arch": (write_cleanclip, False, True),
}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("arch", BIG)
def test_round_trip_checkpoint_formats(zoo, scratch, arch, fmt):
    ref = zoo(arch)
    writer, pass_arch, inferred = FORMATS[fmt]
    path = writer(ref, scratch)
    loaded = load_model(str(path), arch=arch if pass_arch else None)
    assert_same_model(loaded, ref, path)
    assert loaded.facts.quick_gelu is False
    if inferred:
        assert loaded.facts.architecture.startswith("inferred:")
        assert any("inferred" in note for note in loaded.facts.notes)
    else:
        assert loaded.facts.architecture == arch


@pytest.mark.slow
@pytest.mark.parametrize("arch", BIG)
def test_round_trip_save_model_with_sidecar(zoo, arch):
    ref = zoo(arch)
    path = zoo.saved(arch)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["format"] == SIDECAR_FORMAT
    assert sidecar["arch"] == arch
    assert sidecar["model_cfg"] == ref.model.config["model_cfg"]
    assert sidecar["precision"] == "fp32"
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata() == {"format": SIDECAR_FORMAT, "arch": arch}
    loaded = load_model(str(path))  # no arch needed: the sidecar says it
    assert loaded.facts.architecture == arch
    assert loaded.config["model_cfg"] == ref.model.config["model_cfg"]
    assert_same_model(loaded, ref, path)


@pytest.mark.slow
def test_round_trip_torchscript_archive(tmp_path):
    """OpenAI ships TorchScript archives; a traced random RN50 is one, and loads to the same model."""
    ref = new_model("RN50", seed=1)
    image = torch.rand(1, 3, 224, 224)
    traced = torch.jit.trace(ref.clip, (ref.normalize(image), ref.tokenizer(["a cat"])), check_trace=False)
    path = tmp_path / "openai_style.pt"
    traced.save(str(path))
    loaded = load_model(str(path), arch="RN50")
    assert any("QuickGELU" in note for note in loaded.facts.notes)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(image), ref.encode_image(image), atol=1e-5)
        assert torch.allclose(loaded.encode_text(["a cat"]), ref.encode_text(["a cat"]), atol=1e-5)


# --------------------------------------------------------------------------- 2. QuickGELU


@pytest.mark.slow
def test_quick_gelu_on_request(zoo):
    ref = zoo("ViT-B-32")
    loaded = load_model(str(zoo.saved("ViT-B-32")), arch="ViT-B-32", quick_gelu=True)
    assert loaded.facts.quick_gelu is True
    assert loaded.config["quick_gelu"] is True
    image_emb, text_emb = embed(loaded)
    assert not torch.allclose(image_emb, ref.image_emb, atol=1e-4)
    assert not torch.allclose(text_emb, ref.text_emb, atol=1e-4)


# --------------------------------------------------------------------------- 3. malicious pickles


class _Payload:
    """Unpickling this calls ``func(*args)``: the classic pickle code-execution gadget."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _touch_payload(target: Path) -> _Payload:
    return _Payload(pathlib.Path.touch, (target,))


def _open_payload(target: Path) -> _Payload:
    return _Payload(builtins.open, (str(target), "w"))


PAYLOADS = {"path-touch": _touch_payload, "builtins-open": _open_payload}


def write_malicious(path: Path, target: Path, payload: str, legacy: bool) -> Path:
    obj = {"visual.proj": torch.zeros(2, 2), "evil": PAYLOADS[payload](target)}
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_malicious_payload_is_live(tmp_path, payload):
    """Control: an unsafe load really runs the gadget, so the refusals below mean something."""
    target = tmp_path / "control"
    path = write_malicious(tmp_path / "control.pt", target, payload, legacy=False)
    torch.load(path, weights_only=False)
    assert target.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_malicious_pickle_refused(tmp_path, payload, legacy):
    target = tmp_path / "pwned"
    path = write_malicious(tmp_path / "evil.pt", target, payload, legacy)
    with pytest.raises(UnsafeCheckpointError) as excinfo:
        read_state_dict(path)
    assert "refused" in message(excinfo) and "evil.pt" in message(excinfo)
    assert "nothing in it was run" in message(excinfo)
    assert not target.exists()
    for kwargs in ({}, {"arch": "RN50"}):
        with pytest.raises(UnsafeCheckpointError, match="refused"):
            load_model(str(path), **kwargs)
        assert not target.exists()
    assert not target.exists()


# --------------------------------------------------------------------------- 4. mismatches named


def _meta_keys(arch: str) -> set[str]:
    with torch.device("meta"):
        return set(build_clip(architecture_config(arch)).state_dict())


@pytest.mark.slow
def test_wrong_arch_names_missing_key(zoo, scratch):
    path = write_pt(zoo("RN50"), scratch)
    with pytest.raises(CheckpointMismatchError) as excinfo:
        load_model(str(path), arch="RN101")
    text = message(excinfo)
    missing = _meta_keys("RN101") - _meta_keys("RN50")
    assert missing and "missing keys" in text
    assert any(key in text for key in missing)
    assert "--arch" in text


@pytest.mark.slow
def test_altered_shape_named(zoo, scratch):
    state = dict(zoo("ViT-B-32").state)
    state["text_projection"] = torch.zeros(512, 256)
    path = scratch / "altered.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointMismatchError) as excinfo:
        load_model(str(path), arch="ViT-B-32")
    text = message(excinfo)
    assert "shape" in text and "text_projection" in text
    assert "(512, 256)" in text and "(512, 512)" in text
    assert "missing" not in text and "unexpected" not in text


@pytest.mark.slow
def test_extra_key_reported_unexpected(zoo, scratch):
    state = dict(zoo("RN50").state)
    state["visual.backdoor_head.weight"] = torch.zeros(3)
    path = scratch / "extra.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as excinfo:
        load_model(str(path), arch="RN50")
    text = message(excinfo)
    assert "unexpected keys: visual.backdoor_head.weight" in text
    assert "missing" not in text and "shape" not in text


# --------------------------------------------------------------------------- 5. bad inputs


def assert_clear(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    text = message(excinfo)
    for fragment in fragments:
        assert fragment in text, text
    assert "Traceback" not in text and "\n" not in text


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ForensicsError) as excinfo:
        load_model(str(missing))
    assert_clear(excinfo, "nope.pt", "neither a file nor a known name")
    with pytest.raises(ForensicsError) as excinfo:
        load_checkpoint(missing)
    assert_clear(excinfo, "does not exist")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.touch()
    with pytest.raises(ForensicsError) as excinfo:
        load_model(str(path), arch="RN50")
    assert_clear(excinfo, "empty.pt", "is empty")


@pytest.mark.parametrize(
    "text",
    ["hello, this is not a checkpoint\n", "a,b\n1,2\n", "import torch\n", '{"a": 1}\n'],
    ids=["prose", "csv", "python", "json"],
)
def test_text_file_named_pt(tmp_path, text):
    path = tmp_path / "notes.pt"
    path.write_text(text)
    with pytest.raises(ForensicsError) as excinfo:
        load_model(str(path))
    assert_clear(excinfo, "notes.pt")
    assert any(w in message(excinfo) for w in ("not a readable", "no pickle of plain tensors")), message(excinfo)


def test_truncated_safetensors(tmp_path, tiny_saved):
    data = tiny_saved.read_bytes()
    for name, cut in (("half.safetensors", len(data) // 2), ("head.safetensors", 40)):
        path = tmp_path / name
        path.write_bytes(data[:cut])
        with pytest.raises(ForensicsError) as excinfo:
            load_model(str(path), arch="RN50")
        assert_clear(excinfo, name, "not a readable safetensors file")


def test_unknown_architecture(tiny_saved):
    with pytest.raises(ForensicsError) as excinfo:
        load_model(str(tiny_saved), arch="NoSuchArch")
    assert_clear(excinfo, "unknown architecture 'NoSuchArch'")
    with pytest.raises(ForensicsError) as excinfo:
        new_model("NoSuchArch")
    assert_clear(excinfo, "unknown architecture")


def test_random_unknown_arch():
    with pytest.raises(ForensicsError) as excinfo:
        load_model("random:NoSuchArch")
    assert_clear(excinfo, "unknown architecture 'NoSuchArch'")


def test_random_word_arch_needs_vocabulary():
    with pytest.raises(ForensicsError) as excinfo:
        new_model("tiny-rn")
    assert_clear(excinfo, "word vocabulary")


def test_random_project_arch_takes_the_demo_vocabulary():
    """`random:tiny-vit` (speed checks, ViT smoke runs) borrows the demo lab's word vocabulary."""
    model = load_model("random:tiny-vit")
    demo = load_model("demo")
    assert model.tower == "vit" and model.facts.vocab_size == demo.facts.vocab_size
    assert torch.equal(model.tokenizer(["a photo of a flower."]), demo.tokenizer(["a photo of a flower."]))


def test_hf_hub_offline():
    with pytest.raises(ForensicsError) as excinfo:
        load_model("hf-hub:org/none")
    assert_clear(excinfo, "cannot fetch", "hf-hub:org/none", "HF_HUB_OFFLINE")
    assert 'File "' not in message(excinfo)


def test_unknown_spec():
    with pytest.raises(ForensicsError) as excinfo:
        load_model("not-a-model")
    assert_clear(excinfo, "neither a file nor a known name")
    with pytest.raises(ForensicsError, match="no model given"):
        load_model("  ")


def test_state_dict_without_architecture_hints(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ForensicsError) as excinfo:
        load_model(str(path))
    assert_clear(excinfo, "does not say its architecture", "--arch")


def test_pickle_without_tensors(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ForensicsError) as excinfo:
        load_model(str(path), arch="RN50")
    assert_clear(excinfo, "holds no state dict of tensors")


def test_folder_needs_one_checkpoint(tmp_path, tiny_saved):
    with pytest.raises(ForensicsError) as excinfo:
        load_model(str(tmp_path))
    assert_clear(excinfo, "is a folder")
    loaded = load_model(str(tiny_saved.parent))  # exactly one .safetensors inside
    assert loaded.facts.source == str(tiny_saved)


# --------------------------------------------------------------------------- 6. saving


def test_save_refuses_to_overwrite_source(tmp_path, tiny_saved):
    model = load_model(str(tiny_saved))
    before = tiny_saved.read_bytes(), tiny_saved.with_suffix(".json").read_bytes()
    for target in (
        tiny_saved,
        Path(os.path.relpath(tiny_saved)),
        tiny_saved.with_suffix(".json"),
        tiny_saved.with_suffix(""),
    ):
        with pytest.raises(ForensicsError) as excinfo:
            save_model(model, target)
        assert_clear(excinfo, "refusing to overwrite")
    assert (tiny_saved.read_bytes(), tiny_saved.with_suffix(".json").read_bytes()) == before
    assert not list(tiny_saved.parent.glob(".*.tmp"))
    # another path is fine, and the copy is the same model
    copy = save_model(model, tmp_path / "copy.safetensors")
    assert torch.allclose(embed(load_model(str(copy)))[0], embed(model)[0], atol=1e-6)


def test_save_half_precision(tiny, tmp_path):
    path = save_model(tiny.model, tmp_path / "half.safetensors", half=True)
    with safe_open(str(path), framework="pt") as fh:
        dtypes = {k: fh.get_slice(k).get_dtype() for k in fh.keys()}
    floats = {k: v for k, v in dtypes.items() if v.startswith("F")}
    assert set(floats.values()) == {"F16"}
    # only integer buffers (BatchNorm's num_batches_tracked) keep their dtype
    assert all(k.endswith("num_batches_tracked") for k in dtypes.keys() - floats.keys())
    assert json.loads(path.with_suffix(".json").read_text())["precision"] == "fp16"
    loaded = load_model(str(path))
    assert {p.dtype for p in loaded.clip.parameters()} == {torch.float32}
    assert loaded.facts.precision == "fp32"
    image_emb, text_emb = embed(loaded)
    assert torch.allclose(image_emb, tiny.image_emb, atol=1e-2)
    assert torch.allclose(text_emb, tiny.text_emb, atol=1e-2)


def test_sidecar_contents(tiny, tmp_path):
    backdoor = {"attack": "badnet", "target": "cat"}
    path = save_model(tiny.model, tmp_path / "m.safetensors", backdoor=backdoor, extra={"trained_by": "tests"})
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["format"] == "clip-forensics/1"
    assert sidecar["arch"] == tiny.arch
    assert sidecar["model_cfg"] == tiny.model.config["model_cfg"]
    assert sidecar["tokenizer"] == {"kind": "word", "words": WORDS, "context_length": 32}
    assert sidecar["quick_gelu"] is False
    assert sidecar["backdoor"] == backdoor and sidecar["trained_by"] == "tests"
    assert load_model(str(path)).backdoor == backdoor


def test_save_suffix_forced(tiny, tmp_path):
    path = save_model(tiny.model, tmp_path / "model.bin")
    assert path == tmp_path / "model.safetensors" and path.is_file()
    assert (tmp_path / "model.json").is_file() and not (tmp_path / "model.bin").exists()


def test_tiny_round_trip_with_tokenizer(tiny, tmp_path, word_tokenizer):
    path = save_model(tiny.model, tmp_path / f"{tiny.arch}.safetensors")
    loaded = load_model(str(path))
    facts = loaded.facts
    assert facts.architecture == tiny.arch and facts.tokenizer == "word"
    assert facts.tower == TOWER[tiny.arch] and facts.image_size == 128
    assert facts.vocab_size == word_tokenizer.vocab_size and facts.context_length == 32
    for sentence in (["a photo of a cat"], ["A dog, of a zebra!"]):
        assert torch.equal(loaded.tokenizer(sentence), word_tokenizer(sentence))
        assert torch.equal(loaded.tokenizer(sentence), tiny.model.tokenizer(sentence))
    assert_same_model(loaded, tiny, path)
    # naming the sidecar's own architecture is no reason to ignore the sidecar
    again = load_model(str(path), arch=tiny.arch)
    assert torch.allclose(embed(again)[1], tiny.text_emb, atol=1e-5)


def test_tiny_without_sidecar_needs_it(tiny, tmp_path):
    path = save_model(tiny.model, tmp_path / "m.safetensors")
    path.with_suffix(".json").unlink()
    with pytest.raises(ForensicsError) as excinfo:
        load_model(str(path), arch=tiny.arch)
    assert_clear(excinfo, "sidecar")
    # nor may the shapes alone pass it off as an OpenAI-style model with the BPE tokenizer
    with pytest.raises(ForensicsError) as excinfo:
        load_model(str(path))
    assert_clear(excinfo, "9-token vocabulary", "sidecar m.json")
    torch.save(tiny.model.clip.state_dict(), tmp_path / "m.pt")
    with pytest.raises(ForensicsError) as excinfo:
        load_model(str(tmp_path / "m.pt"))
    assert_clear(excinfo, "vocabulary")


def test_explicit_other_arch_overrides_sidecar(tiny_saved):
    with pytest.raises(CheckpointMismatchError):
        load_model(str(tiny_saved), arch="RN50")


# --------------------------------------------------------------------------- key cleaning


def test_clean_state_dict_keys():
    t = torch.zeros(1)
    state = {
        "module.visual.proj": t,
        "_orig_mod.logit_scale": t,
        "module._orig_mod.ln_final.weight": t,
        "input_resolution": t,
        "module.context_length": t,
        "vocab_size": t,
        "text_projection": t,
    }
    assert sorted(clean_state_dict_keys(state)) == ["ln_final.weight", "logit_scale", "text_projection", "visual.proj"]

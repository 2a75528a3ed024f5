"""Suspect CLIP models: safe loading of every checkpoint format, facts, and saving as safetensors.

A checkpoint is data, never code: pickles are read with ``torch.load(weights_only=True)``,
and a pickle that needs anything beyond tensors and plain containers is refused before
anything in it runs. The project's own outputs are ``.safetensors`` plus a JSON sidecar
holding the full model config, tokenizer and (for the demo lab) the planted backdoor.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import pickle
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from PIL import Image

from forensics.core.errors import CheckpointMismatchError, ForensicsError, UnsafeCheckpointError, exception_line
from forensics.core.images import pil_to_model_tensor
from forensics.core.resources import package_path
from forensics.core.sidecar import PROMPT_CONTEXT_KEY, SIDECAR_FORMAT, read_sidecar
from forensics.core.tokenizer import WordTokenizer
from forensics.core.torchscript import read_torchscript_tensors

# data shipped inside the package (read through importlib.resources, so an installed package finds its own)
PACKAGE_DIR = package_path()
PROJECT_CONFIG_DIR = package_path("model_configs")
ASSETS_DIR = package_path("assets")  # the bundled demo lab: forensics/assets/demo
DEMO_MODELS = {
    "demo": ASSETS_DIR / "demo" / "models" / "demo_poisoned.safetensors",
    "demo-clean": ASSETS_DIR / "demo" / "models" / "demo_clean.safetensors",
    # the demo repaired by make-demo (oracle-guided scan, then oracle-finetune), for the Learn tab's last step
    "demo-repaired": ASSETS_DIR / "demo" / "models" / "demo_repaired.safetensors",
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# entries of TorchScript state dicts that are no parameters: OpenAI's scalars, and the causal text mask
# that open_clip derives from the context length (a non-persistent buffer, which TorchScript saves)
_NON_PARAMETER_KEYS = {"input_resolution", "context_length", "vocab_size", "attn_mask"}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# the most parameters (and buffers) a model may have before it is built: above ViT-e-14 (4.6e9), open_clip's largest
# native CLIP, so that a config with absurd widths is refused instead of allocating memory the machine lacks
MAX_PARAMETERS_ENV = "FORENSICS_MAX_PARAMETERS"
DEFAULT_MAX_PARAMETERS = 5_000_000_000


@dataclass
class ModelFacts:
    """What an investigator needs to know about a loaded model (shown by ``info`` and the UI)."""

    architecture: str
    source: str
    sha256: str | None
    parameters: int
    image_size: int
    tower: str  # "vit", "resnet" or the tower's class name
    embed_dim: int
    context_length: int
    vocab_size: int
    quick_gelu: bool
    tokenizer: str
    precision: str = "fp32"
    nonfinite_parameters: int = 0  # NaN or infinite values among the weights and buffers (a broken model when > 0)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SuspectModel:
    """An open_clip model with its tokenizer, pixel normalisation, config and facts.

    Images enter as float tensors in [0, 1] at ``image_size`` px (triggers and overlays live in
    pixel space); normalisation happens inside :meth:`encode_image`.
    """

    clip: CLIP
    tokenizer: Callable[[list[str]], torch.Tensor]
    config: dict[str, Any]
    facts: ModelFacts
    backdoor: dict | None = None
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    # learnt class-wise prompts (CBPT):
    # {"class_names": [...], "context": C x n_ctx x width tensor, "template": "X X X X {}."};
    # zero-shot uses them for exactly these class names; saved as PROMPT_CONTEXT_KEY plus the sidecar's "class_prompts"
    class_prompts: dict | None = None

    @property
    def image_size(self) -> int:
        return self.facts.image_size

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @property
    def tower(self) -> str:
        return self.facts.tower

    def to(self, device: str | torch.device) -> "SuspectModel":
        self.clip.to(device)
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel-normalised [0, 1] images, in the input's memory layout (repairs choose theirs:
        forensics.core.precision.training_layout)."""
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of [0, 1] images (B x 3 x S x S); gradients flow."""
        # channels-last input: 1.2-1.3x faster convolutions on CPU (bench/repair_speed.py)
        images = images.to(self.device).contiguous(memory_format=torch.channels_last)
        features = self.clip.encode_image(self.normalize(images))
        return F.normalize(features.float(), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Resize the shorter side to ``image_size`` (bicubic), centre-crop, return 3 x S x S in [0, 1]."""
        return pil_to_model_tensor(image, self.image_size)

    def clone(self) -> "SuspectModel":
        """An independent deep copy without the cached class text embeddings (a repair changes the towers, so the
        copy must encode its class names anew)."""
        cache = self.__dict__.pop("text_cache", None)
        try:
            copied = copy.deepcopy(self)
        finally:
            if cache is not None:
                self.__dict__["text_cache"] = cache
        return copied


@contextmanager
def frozen(model: "SuspectModel | torch.nn.Module") -> Iterator[None]:
    """Freeze the parameters and put every module in eval mode for the block, then restore both exactly."""
    root = model.clip if isinstance(model, SuspectModel) else model
    if not isinstance(root, torch.nn.Module):
        yield
        return
    flags = [(p, p.requires_grad) for p in root.parameters()]
    modes = [(m, m.training) for m in root.modules()]
    try:
        root.requires_grad_(False)
        root.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def default_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class ModelRef:
    """Which model to load and how: one value carried from the CLI and the UI through every pipeline, so the
    network a pipeline scans or repairs is exactly the one the user chose (QuickGELU and device included).

    ``spec``: demo, demo-clean, a checkpoint path, random:ARCH, hf-hub:ORG/NAME or ARCH:TAG; ``arch`` for
    checkpoints that do not say; ``quick_gelu`` None lets the checkpoint decide; ``device`` None picks cuda
    when available.
    """

    spec: str
    arch: str | None = None
    quick_gelu: bool | None = None
    device: str | None = None

    @property
    def is_demo(self) -> bool:
        """Either bundled demo model (which reveal their planted backdoor and default to the demo probe)."""
        return self.spec in DEMO_MODELS

    def default_probe(self, clean_only: bool = False) -> str | None:
        """The probe set a demo model defaults to (demo, or demo-clean when only clean images make sense)."""
        if not self.is_demo:
            return None
        return "demo-clean" if clean_only else "demo"

    def load(self) -> "SuspectModel":
        """Load the model safely (see :func:`load_model`)."""
        return load_model(self.spec, arch=self.arch, quick_gelu=self.quick_gelu, device=self.device or default_device())


def as_ref(model: "str | ModelRef") -> ModelRef:
    """A ModelRef from a plain spec string (or the ref itself)."""
    if isinstance(model, ModelRef):
        return model
    if isinstance(model, (str, Path)):
        return ModelRef(str(model))
    raise ForensicsError(f"a model is a spec string, a ModelRef or a loaded SuspectModel, got {type(model).__name__}")


def resolve_model(model: "str | ModelRef | SuspectModel") -> tuple["SuspectModel", ModelRef | None]:
    """The loaded model and the reference it came from (None when a loaded SuspectModel was passed in)."""
    if isinstance(model, SuspectModel):
        return model, None
    ref = as_ref(model)
    return ref.load(), ref


# --------------------------------------------------------------------------- configs


def project_configs() -> dict[str, dict]:
    """The project's own small CLIP configs (``forensics/model_configs/*.json``) by name."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(PROJECT_CONFIG_DIR.glob("*.json"))}


def list_architectures() -> list[str]:
    """Every architecture name accepted by ``--arch``: the project's configs, then open_clip's."""
    return [*project_configs(), *open_clip.list_models()]


def architecture_config(arch: str) -> dict:
    """The full model config of an architecture name (project config or open_clip built-in)."""
    own = project_configs()
    if arch in own:
        return copy.deepcopy(own[arch])
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ForensicsError(
            f"unknown architecture {arch!r}; choose one of the project's ({', '.join(own)}) "
            f"or open_clip's (e.g. ViT-B-32, RN50; `python -m forensics list` lists all)"
        )
    return copy.deepcopy(cfg)


def build_clip(model_cfg: dict, quick_gelu: bool = False, vocab_size: int | None = None) -> CLIP:
    """Instantiate an open_clip CLIP (or CustomTextCLIP) from a config dict, randomly initialised."""
    cfg = copy.deepcopy(model_cfg)
    for key in ("description", "tokenizer", "preprocess_cfg", "quick_gelu"):
        cfg.pop(key, None)
    if vocab_size is not None:
        cfg["text_cfg"]["vocab_size"] = vocab_size
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    if "timm_model_name" in cfg.get("vision_cfg", {}) or "hf_model_name" in cfg.get("text_cfg", {}):
        raise ForensicsError(
            "architectures with timm or Hugging Face towers need downloads this tool does not make; "
            "choose an open_clip native architecture (ViT-*, RN*) or a project config"
        )
    cls = CustomTextCLIP if custom_text else CLIP
    return cls(**cfg, quick_gelu=quick_gelu)


def max_parameters() -> int:
    """The most parameters a model may have before it is built: ``FORENSICS_MAX_PARAMETERS``, else 5e9."""
    raw = os.environ.get(MAX_PARAMETERS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PARAMETERS
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise ForensicsError(f"{MAX_PARAMETERS_ENV} is {raw[:40]!r}; set it to a number of parameters such as 5e9")
    return int(value)


MAX_IMAGE_TOKENS = 4096  # grid cells per image: ViT-H-14 at 518 px has 1,369, RN50x64 at 448 px 196
MAX_IMAGE_ACTIVATION = 1 << 28  # values of the largest intermediate tensor per image (1 GiB in fp32)


def image_tower_cost(visual: torch.nn.Module, what: str) -> tuple[int, int]:
    """(grid cells, values of the largest intermediate tensor) per image of an image tower, read off a skeleton
    before any weight is allocated; refused in one line above :data:`MAX_IMAGE_TOKENS` or
    :data:`MAX_IMAGE_ACTIVATION`, since a consistent config (a ViT with 1-pixel patches) can otherwise exhaust memory
    on the first image. ViT: tokens x the MLP's width, or heads x tokens^2 (attention weights); ModifiedResNet:
    the attention pool's tokens, and width x side^2 / 4 (the stem and first stage)."""
    if isinstance(visual, open_clip.transformer.VisionTransformer):
        grid = tuple(int(g) for g in visual.grid_size)
        cells = grid[0] * grid[1]
        tokens = cells + 1
        blocks = visual.transformer.resblocks
        hidden = max([int(visual.transformer.width)] + [int(b.mlp.c_fc.out_features) for b in blocks[:1]])
        heads = max([1] + [int(b.attn.num_heads) for b in blocks[:1]])
        largest = max(tokens * hidden, heads * tokens * tokens)
        shape = f"patch size {visual.patch_size[0]} at {visual.image_size[0]} px"
    elif isinstance(visual, open_clip.modified_resnet.ModifiedResNet):
        side = int(visual.image_size)
        cells = int(visual.attnpool.positional_embedding.shape[0]) - 1
        width = int(visual.conv1.out_channels) * 2
        heads = int(visual.attnpool.num_heads)
        largest = max(width * side * side // 4, heads * (cells + 1) ** 2)
        shape = f"{side} px"
    else:
        return 0, 0
    if cells > MAX_IMAGE_TOKENS:
        raise ForensicsError(
            f"{what} cuts each image into {cells:,} tokens ({shape}); no CLIP this tool scans has more than "
            f"{MAX_IMAGE_TOKENS:,} (a ViT-H-14 at 518 px has 1,369)"
        )
    if largest > MAX_IMAGE_ACTIVATION:
        raise ForensicsError(
            f"{what} needs {largest:,} values for one image's largest intermediate tensor ({shape}); refusing above "
            f"{MAX_IMAGE_ACTIVATION:,} (1 GiB per image)"
        )
    return cells, largest


def build_bounded(model_cfg: dict, quick_gelu: bool, what: str) -> CLIP:
    """:func:`build_clip`, but first on the meta device (no memory) to count the parameters the config implies;
    refused above :func:`max_parameters`. ``what`` names the config in the one-line errors ("architecture RN50")."""
    limit = max_parameters()
    try:
        with torch.device("meta"):
            skeleton = build_clip(model_cfg, quick_gelu=quick_gelu)
    except ForensicsError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bad config fails open_clip's constructors in many ways
        raise ForensicsError(
            f"{what} does not describe a CLIP that open_clip can build ({exception_line(exc)})"
        ) from None
    count = sum(t.numel() for t in itertools.chain(skeleton.parameters(), skeleton.buffers()))
    visual = skeleton.visual
    del skeleton
    if count > limit:
        raise ForensicsError(
            f"{what} implies {count:,} parameters, above the limit of {limit:,}; refusing to build it "
            f"(set {MAX_PARAMETERS_ENV} to raise the limit if this model is genuine)"
        )
    image_tower_cost(visual, what)
    del visual
    try:
        return build_clip(model_cfg, quick_gelu=quick_gelu)
    except ForensicsError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory while allocating the weights
        raise ForensicsError(f"{what} could not be built ({exception_line(exc)})") from None


def make_tokenizer(spec: dict) -> Callable[[list[str]], torch.Tensor]:
    """Tokenizer from a sidecar spec: the project's word tokenizer or open_clip's bundled BPE."""
    if spec.get("kind") == "word":
        return WordTokenizer.from_dict(spec)
    return (
        open_clip.tokenize
        if spec.get("context_length", 77) == 77
        else (lambda texts, n=spec["context_length"]: open_clip.tokenize(texts, context_length=n))
    )


# --------------------------------------------------------------------------- reading checkpoints


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors from a checkpoint file without running any code from it.

    Accepts safetensors, ``torch.save`` files (zip or legacy pickle, loaded weights-only),
    dicts holding ``state_dict``/``model``, and OpenAI's TorchScript archives (their tensors are read
    from the zip by a restricted unpickler; nothing in the archive, scripted code included, is run).
    """
    if not path.is_file():
        raise ForensicsError(f"checkpoint {path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise ForensicsError(f"checkpoint {path} is empty")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ForensicsError(f"checkpoint {path.name} is not a readable safetensors file: {exc}") from None
    if _is_torchscript(path):
        return read_torchscript_tensors(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()
        detail = next(
            (line.strip() for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else ""
        )
        detail = detail.split(" was not an allowed global")[0]
        why = (
            "it is a pickle that needs code beyond tensors to load"
            if "GLOBAL" in detail
            else "it is no pickle of plain tensors (a text or corrupt file, or a pickle built to run code)"
        )
        raise UnsafeCheckpointError(
            f"refused {path.name}: {why} ({detail[:200]}); "
            "nothing in it was run. Convert trusted checkpoints to .safetensors first."
        ) from None
    except Exception as exc:  # noqa: BLE001 - garbage bytes fail the unpickler in many ways (KeyError, IndexError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if not isinstance(exc, (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile)) or not first:
            first = f"{type(exc).__name__} {first}".strip()
        raise ForensicsError(
            f"checkpoint {path.name} is not a readable PyTorch or safetensors file: {first[:200]}"
        ) from None
    return _unwrap_state_dict(obj, path.name)


def _unwrap_state_dict(obj: Any, name: str) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model_state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ForensicsError(f"checkpoint {name} holds no state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def clean_state_dict_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP/compile wrappers (``module.``, ``_orig_mod.``) and OpenAI's non-parameter entries."""
    out = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        if key in _NON_PARAMETER_KEYS:
            continue
        out[key] = value
    return out


def _convert_openai_text_keys(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Map OpenAI/CleanCLIP text keys onto a CustomTextCLIP's ``text.*`` names when needed."""
    if isinstance(model, CustomTextCLIP) and "token_embedding.weight" in state:
        return open_clip.model.convert_to_custom_text_state_dict(state)
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Load ``state`` strictly, naming every missing key, unexpected key and shape mismatch."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or mismatched:

        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {show(mismatched)}")
        raise CheckpointMismatchError(
            f"checkpoint {name} does not fit this architecture ({'; '.join(parts)}); "
            "check --arch (and --quick-gelu) or use a checkpoint saved by this tool"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


# --------------------------------------------------------------------------- building SuspectModel


def _tower_kind(clip: torch.nn.Module) -> str:
    visual = clip.visual
    if isinstance(visual, open_clip.transformer.VisionTransformer):
        return "vit"
    if isinstance(visual, open_clip.modified_resnet.ModifiedResNet):
        return "resnet"
    return type(visual).__name__


def count_nonfinite(tensors: Iterable[torch.Tensor]) -> int:
    """How many values of the floating (and complex) tensors are NaN or infinite."""
    total = 0
    for tensor in tensors:
        if tensor.is_meta or not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
            continue
        tensor = tensor.detach()
        if not tensor.is_complex() and bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
            continue  # a finite sum: every value is finite (the cheap path, no tensor-sized mask)
        total += int((~torch.isfinite(tensor)).sum())
    return total


def _model_tensors(model: SuspectModel) -> Iterator[torch.Tensor]:
    """Every tensor a model computes with: the CLIP's weights and buffers, and any learnt prompt context."""
    yield from model.clip.state_dict().values()
    if model.class_prompts and isinstance(model.class_prompts.get("context"), torch.Tensor):
        yield model.class_prompts["context"]


def _nonfinite_note(count: int) -> str:
    weights = "1 weight is" if count == 1 else f"{count:,} weights are"
    return f"{weights} NaN or infinite: this model's outputs cannot be trusted"


def check_finite_outputs(
    model: SuspectModel,
    images: torch.Tensor | None = None,
    what: str = "the model",
    consequence: str = "it cannot be scanned or repaired",
) -> None:
    """Refuse a model with a NaN or infinite weight, or whose embeddings or own logits (its learnt temperature
    ``exp(logit_scale)`` times the cosine) are NaN or infinite on ``images`` (a few real inputs; grey squares when
    none are given): every score of such a model is meaningless, so a scan would report nothing flagged and a
    repair would train on infinite losses and write NaN weights."""
    count = count_nonfinite(_model_tensors(model))
    why = f"{count:,} of its weights {'is' if count == 1 else 'are'} non-finite" if count else ""
    if not why:
        size = model.image_size
        pixels = torch.full((2, 3, size, size), 0.5) if images is None or not len(images) else images[:8].float()
        with frozen(model), torch.no_grad():
            image_emb = model.encode_image(pixels.to(model.device)).float()
            text_emb = model.encode_text(["a photo", "a drawing"]).float()
            scale_param = getattr(model.clip, "logit_scale", None)
            scale = scale_param.detach().float().exp() if isinstance(scale_param, torch.Tensor) else torch.tensor(1.0)
            logits = scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).t()
        if not (bool(torch.isfinite(image_emb).all()) and bool(torch.isfinite(text_emb).all())):
            why = "all its weights are finite: its computation overflows"
        elif not bool(torch.isfinite(scale).all()):
            log_scale = float(scale_param.detach().float().reshape(-1)[0])
            why = f"its logit scale exp({log_scale:.4g}) overflows"
        elif not bool(torch.isfinite(logits).all()):
            why = "its logits overflow"
    if why:
        raise ForensicsError(f"{what}'s outputs are NaN or infinite ({why}); {consequence}")


def _assemble(
    clip: CLIP,
    config: dict,
    source: str,
    sha: str | None,
    notes: list[str],
    backdoor: dict | None = None,
    class_prompts: dict | None = None,
) -> SuspectModel:
    """The SuspectModel around a loaded CLIP, its facts counted, and a warning when weights are NaN or infinite."""
    clip.eval()
    image_size = clip.visual.image_size
    image_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)
    tok_spec = config["tokenizer"]
    text_cfg = config["model_cfg"]["text_cfg"]
    pre = config.get("preprocess") or {}
    facts = ModelFacts(
        architecture=config["arch"],
        source=source,
        sha256=sha,
        parameters=sum(p.numel() for p in clip.parameters()),
        image_size=image_size,
        tower=_tower_kind(clip),
        embed_dim=int(config["model_cfg"]["embed_dim"]),
        context_length=int(tok_spec.get("context_length", text_cfg.get("context_length", 77))),
        vocab_size=int(text_cfg.get("vocab_size", 49408)),
        quick_gelu=bool(config.get("quick_gelu", False)),
        tokenizer=tok_spec.get("kind", "open_clip"),
        notes=notes,
    )
    model = SuspectModel(
        clip=clip,
        tokenizer=make_tokenizer(tok_spec),
        config=config,
        facts=facts,
        backdoor=backdoor,
        mean=tuple(pre.get("mean", OPENAI_MEAN)),
        std=tuple(pre.get("std", OPENAI_STD)),
        class_prompts=class_prompts,
    )
    facts.nonfinite_parameters = count_nonfinite(_model_tensors(model))
    if facts.nonfinite_parameters:
        note = _nonfinite_note(facts.nonfinite_parameters)
        notes.append(note)
        warnings.warn(f"{source}: {note}", RuntimeWarning, stacklevel=3)
    return model


def new_model(
    arch: str, quick_gelu: bool = False, tokenizer: WordTokenizer | None = None, seed: int = 0
) -> SuspectModel:
    """A randomly initialised model of ``arch`` (seeded); project configs need a word tokenizer."""
    cfg = architecture_config(arch)
    wants_words = cfg.get("tokenizer") == "word"
    if wants_words and tokenizer is None:
        raise ForensicsError(f"architecture {arch} uses a word vocabulary: build one from the captions first")
    if tokenizer is not None:
        cfg["text_cfg"]["vocab_size"] = tokenizer.vocab_size
        cfg["text_cfg"]["context_length"] = tokenizer.context_length
    quick_gelu = bool(quick_gelu or cfg.get("quick_gelu") or arch.endswith("-quickgelu"))
    torch.manual_seed(seed)
    clip = build_bounded(cfg, quick_gelu, f"architecture {arch}")  # the meta-device count draws no random numbers
    tok_spec = (
        tokenizer.to_dict()
        if tokenizer
        else {"kind": "open_clip", "context_length": cfg["text_cfg"].get("context_length", 77)}
    )
    config = {
        "arch": arch,
        "model_cfg": cfg,
        "quick_gelu": quick_gelu,
        "tokenizer": tok_spec,
        "preprocess": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
    }
    return _assemble(clip, config, source=f"random:{arch}", sha=None, notes=[f"random weights (seed {seed})"])


def load_model(
    spec: str, arch: str | None = None, quick_gelu: bool | None = None, device: str | torch.device = "cpu"
) -> SuspectModel:
    """Resolve a model spec and load it safely.

    ``spec`` is ``demo``, ``demo-clean``, a checkpoint path, ``random:ARCH``, ``hf-hub:ORG/NAME``,
    or ``ARCH:PRETRAINED_TAG`` (the last two need a network).
    """
    spec = str(spec).strip()
    if not spec:
        raise ForensicsError("no model given")
    if spec in DEMO_MODELS:
        path = DEMO_MODELS[spec]
        if not path.is_file():
            raise ForensicsError(
                f"demo model {path} is missing; rebuild the demo lab with `python -m forensics make-demo`"
            )
        return load_checkpoint(path, arch, quick_gelu).to(device)
    if spec.startswith("random:"):
        arch = spec.split(":", 1)[1]
        tokenizer = None
        if architecture_config(arch).get("tokenizer") == "word":  # the project's configs: the demo lab's vocabulary
            sidecar = read_sidecar(DEMO_MODELS["demo"])
            if sidecar is not None:
                tokenizer = WordTokenizer.from_dict(sidecar["tokenizer"])
        return new_model(arch, quick_gelu=bool(quick_gelu), tokenizer=tokenizer).to(device)
    path = Path(spec).expanduser()
    if path.exists():
        return load_checkpoint(path, arch, quick_gelu).to(device)
    if spec.startswith("hf-hub:") or (":" in spec and spec.split(":", 1)[0] in open_clip.list_models()):
        return _load_remote(spec, quick_gelu).to(device)
    raise ForensicsError(
        f"model {spec!r} is neither a file nor a known name; use demo, demo-clean, a checkpoint path, "
        "random:ARCH, hf-hub:ORG/NAME or ARCH:PRETRAINED_TAG"
    )


def load_checkpoint(path: Path, arch: str | None = None, quick_gelu: bool | None = None) -> SuspectModel:
    """Load a local checkpoint file of any supported format into a :class:`SuspectModel`."""
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise ForensicsError(f"{path} is a folder; give the checkpoint file inside it")
        path = candidates[0]
    sidecar = read_sidecar(path) if path.suffix == ".safetensors" else None
    state = clean_state_dict_keys(read_state_dict(path))
    context = state.pop(PROMPT_CONTEXT_KEY, None)  # learnt prompts are no CLIP parameter
    sha = sha256_of(path)
    notes: list[str] = []
    if sidecar and arch in (None, sidecar.get("arch")):
        config = {k: sidecar[k] for k in ("arch", "model_cfg", "quick_gelu", "tokenizer", "preprocess") if k in sidecar}
        if quick_gelu is not None:
            config["quick_gelu"] = quick_gelu
        what = f"sidecar {path.with_suffix('.json').name}: field 'model_cfg'"
        clip = build_bounded(config["model_cfg"], bool(config.get("quick_gelu")), what)
        load_into(clip, _convert_openai_text_keys(state, clip), path.name)
        prompts = _class_prompts(sidecar.get("class_prompts"), context, clip, path, notes)
        return _assemble(clip, config, str(path), sha, notes, backdoor=sidecar.get("backdoor"), class_prompts=prompts)
    if context is not None:
        notes.append("learnt prompts found but there is no sidecar naming their classes; they are ignored")
    if arch is None:
        if "visual.proj" in state or "visual.attnpool.c_proj.weight" in state:
            arch, cfg = _infer_openai_architecture(state)
            if cfg["text_cfg"]["vocab_size"] != 49408:  # not open_clip's BPE: the tokenizer is in a sidecar we lack
                raise ForensicsError(
                    f"checkpoint {path.name} has a {cfg['text_cfg']['vocab_size']}-token vocabulary, "
                    f"not open_clip's BPE, so its tokenizer is unknown; load the .safetensors this tool saved, "
                    f"with its sidecar {path.stem}.json beside it"
                )
            notes.append(f"architecture inferred from the checkpoint's shapes ({arch})")
        else:
            raise ForensicsError(
                f"checkpoint {path.name} does not say its architecture; pass --arch (e.g. ViT-B-32, RN50)"
            )
    else:
        cfg = architecture_config(arch)
        if cfg.get("tokenizer") == "word":
            raise ForensicsError(
                f"{arch} checkpoints need their sidecar JSON (vocabulary); "
                f"keep {path.with_suffix('.json').name} beside the file"
            )
    if quick_gelu is None:
        quick_gelu = arch.endswith("-quickgelu")
        if quick_gelu is False and "-quickgelu" not in arch and _is_torchscript(path):
            notes.append("OpenAI-format checkpoint: pass --quick-gelu if it was trained with QuickGELU")
    clip = build_bounded(cfg, quick_gelu, f"architecture {arch}")
    load_into(clip, _convert_openai_text_keys(state, clip), path.name)
    config = {
        "arch": arch,
        "model_cfg": cfg,
        "quick_gelu": quick_gelu,
        "tokenizer": {"kind": "open_clip", "context_length": cfg["text_cfg"].get("context_length", 77)},
        "preprocess": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
    }
    return _assemble(clip, config, str(path), sha, notes)


def _class_prompts(
    spec: dict | None, context: torch.Tensor | None, clip: CLIP, path: Path, notes: list[str]
) -> dict | None:
    """The learnt class prompts of a checkpoint: the sidecar's (checked) class names and template with its context
    tensor, which must hold one n_ctx x width block per class; None (and a note) when one of the two is absent."""
    if context is None:
        if spec is not None:
            notes.append("the sidecar names learnt prompts but the checkpoint holds none; they are ignored")
        return None
    if spec is None:
        notes.append("learnt prompts found but the sidecar does not name their classes; they are ignored")
        return None
    names = spec["class_names"]
    tower = clip if hasattr(clip, "token_embedding") else getattr(clip, "text", None)
    embedding = getattr(tower, "token_embedding", None)
    width = embedding.weight.shape[1] if isinstance(embedding, torch.nn.Embedding) else None
    length = getattr(tower, "context_length", None) or (tower.positional_embedding.shape[0] if tower else 0)
    shape = tuple(context.shape)
    fits = len(shape) == 3 and shape[0] == len(names) and 1 <= shape[1] <= length - 2
    if not fits or (width is not None and shape[2] != width):
        raise ForensicsError(
            f"sidecar {path.with_suffix('.json').name}: field 'class_prompts' names {len(names)} classes, but the "
            f"checkpoint's learnt prompts ({PROMPT_CONTEXT_KEY}) have shape {shape}, not "
            f"({len(names)}, n_ctx, {width or 'width'}) with n_ctx at most {length - 2}"
        )
    return {"class_names": list(names), "context": context.float(), "template": spec["template"]}


def _infer_openai_architecture(state: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """Rebuild an OpenAI-style config from tensor shapes (as open_clip does for OpenAI weights)."""
    vit = "visual.proj" in state
    embed_dim = state["text_projection"].shape[1]
    context_length = state["positional_embedding"].shape[0]
    vocab_size = state["token_embedding.weight"].shape[0]
    text_width = state["ln_final.weight"].shape[0]
    text_layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks")})
    if vit:
        width = state["visual.conv1.weight"].shape[0]
        layers = len(
            {
                k.split(".")[3]
                for k in state
                if k.startswith("visual.transformer.resblocks.") and k.endswith(".attn.in_proj_weight")
            }
        )
        patch = state["visual.conv1.weight"].shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision_cfg = {"image_size": patch * grid, "layers": layers, "width": width, "patch_size": patch}
        name = f"ViT-{patch}-{layers}x{width}"
    else:
        counts = [len({k.split(".")[2] for k in state if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)]
        width = state["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision_cfg = {"image_size": grid * 32, "layers": counts, "width": width, "patch_size": None}
        name = f"RN-{'-'.join(map(str, counts))}x{width}"
    cfg = {
        "embed_dim": int(embed_dim),
        "vision_cfg": vision_cfg,
        "text_cfg": {
            "context_length": int(context_length),
            "vocab_size": int(vocab_size),
            "width": int(text_width),
            "heads": int(text_width // 64),
            "layers": text_layers,
        },
    }
    return f"inferred:{name}", cfg


def _load_remote(spec: str, quick_gelu: bool | None) -> SuspectModel:
    """hf-hub ids and pretrained tags: only with a network; otherwise a clear message."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        if spec.startswith("hf-hub:"):
            clip = open_clip.create_model(spec)
            arch, tag = spec, None
        else:
            arch, tag = spec.split(":", 1)
            clip = open_clip.create_model(arch, pretrained=tag, force_quick_gelu=bool(quick_gelu))
    except Exception as exc:  # noqa: BLE001 - network and hub failures come in many types
        why = "HF_HUB_OFFLINE is set" if offline else "the download failed"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ForensicsError(
            f"cannot fetch {spec}: {why} ({first[:160]}). Download the weights where a network is available "
            "and pass the local file with --arch"
        ) from None
    cfg = open_clip.get_model_config(arch) if tag else {}
    config = {
        "arch": arch,
        "model_cfg": cfg,
        "quick_gelu": bool(quick_gelu),
        "tokenizer": {"kind": "open_clip", "context_length": 77},
        "preprocess": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
    }
    return _assemble(clip, config, spec, None, [])


# --------------------------------------------------------------------------- saving


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared (e.g. a non-root container)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never half of it."""
    _atomic_write_bytes(Path(path), text.encode("utf-8"))


def save_model(
    model: SuspectModel, path: str | Path, backdoor: dict | None = None, extra: dict | None = None, half: bool = False
) -> Path:
    """Save as ``path`` (.safetensors) plus a JSON sidecar; refuses to overwrite the model's own source file."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    source = Path(model.facts.source)
    if source.exists() and path.resolve() == source.resolve():
        raise ForensicsError(f"refusing to overwrite the input model {source}; choose another output path")
    dtype = torch.float16 if half else torch.float32
    state = {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.clip.state_dict().items()
    }
    prompts = model.class_prompts
    if prompts:
        state[PROMPT_CONTEXT_KEY] = prompts["context"].detach().to("cpu", torch.float32).contiguous()
    _atomic_write_bytes(path, save(state, metadata={"format": SIDECAR_FORMAT, "arch": model.config["arch"]}))
    sidecar = {
        "format": SIDECAR_FORMAT,
        **model.config,
        "backdoor": backdoor if backdoor is not None else model.backdoor,
        "precision": "fp16" if half else "fp32",
        **(extra or {}),
    }
    if prompts:
        sidecar["class_prompts"] = {
            "class_names": list(prompts["class_names"]),
            "template": prompts["template"],
            "key": PROMPT_CONTEXT_KEY,
        }
    atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=2))
    return path

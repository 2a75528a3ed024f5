"""Suspect CLIP models: safe loading of every checkpoint format, facts, and saving as safetensors.

A checkpoint is data, never code: pickles are read with ``torch.load(weights_only=True)``,
and a pickle that needs anything beyond tensors and plain containers is refused before
anything in it runs. The project's own outputs are ``.safetensors`` plus a JSON sidecar
holding the full model config, tokenizer and (for the demo lab) the planted backdoor.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import re
import tempfile
import typing
import warnings
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP
from PIL import Image

from forensics.core.errors import CheckpointMismatchError, ForensicsError, UnsafeCheckpointError
from forensics.core.images import pil_to_model_tensor
from forensics.core.tokenizer import WordTokenizer

SIDECAR_FORMAT = "clip-forensics/1"
PACKAGE_DIR = Path(__file__).resolve().parent.parent
PROJECT_CONFIG_DIR = PACKAGE_DIR / "model_configs"
ASSETS_DIR = PACKAGE_DIR.parent / "assets"
DEMO_MODELS = {
    "demo": ASSETS_DIR / "demo" / "models" / "demo_poisoned.safetensors",
    "demo-clean": ASSETS_DIR / "demo" / "models" / "demo_clean.safetensors",
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# entries of TorchScript state dicts that are no parameters: OpenAI's scalars, and the causal text mask
# that open_clip derives from the context length (a non-persistent buffer, which TorchScript saves)
_NON_PARAMETER_KEYS = {"input_resolution", "context_length", "vocab_size", "attn_mask"}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
PROMPT_CONTEXT_KEY = "prompt_learner.context"  # learnt prompt context vectors, saved beside the CLIP's own tensors
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
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of [0, 1] images (B x 3 x S x S); gradients flow."""
        # channels-last input: measured 1.5-2x faster convolutions on CPU (ResNet stem, ViT patch embedding)
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


ModelInput = "str | ModelRef | SuspectModel"


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
            f"or open_clip's (e.g. ViT-B-32, RN50; `python -m forensics archs` lists all)"
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


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
        raise ForensicsError(f"{what} does not describe a CLIP that open_clip can build ({_first_line(exc)})") from None
    count = sum(t.numel() for t in itertools.chain(skeleton.parameters(), skeleton.buffers()))
    del skeleton
    if count > limit:
        raise ForensicsError(
            f"{what} implies {count:,} parameters, above the limit of {limit:,}; refusing to build it "
            f"(set {MAX_PARAMETERS_ENV} to raise the limit if this model is genuine)"
        )
    try:
        return build_clip(model_cfg, quick_gelu=quick_gelu)
    except ForensicsError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory while allocating the weights
        raise ForensicsError(f"{what} could not be built ({_first_line(exc)})") from None


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


# --------------------------------------------------------------------------- TorchScript archives, read as data
#
# ``torch.jit.load`` runs code from the archive (a scripted ``__setstate__`` runs as the archive loads), so a
# TorchScript checkpoint is read here as what it is on disk: a zip holding ``<root>/data.pkl`` (the module tree
# as a pickle), ``<root>/data/<key>`` (raw storage bytes) and ``<root>/code/`` (the scripted source, which is only
# scanned as text for each class's ``__parameters__``/``__buffers__`` lists, never compiled).

_TORCHSCRIPT_STORAGE_DTYPES = {
    name: dtype
    for name, dtype in {
        "FloatStorage": torch.float32,
        "DoubleStorage": torch.float64,
        "HalfStorage": torch.float16,
        "BFloat16Storage": torch.bfloat16,
        "LongStorage": torch.int64,
        "IntStorage": torch.int32,
        "ShortStorage": torch.int16,
        "CharStorage": torch.int8,
        "ByteStorage": torch.uint8,
        "BoolStorage": torch.bool,
        "ComplexHalfStorage": getattr(torch, "complex32", None),
        "ComplexFloatStorage": torch.complex64,
        "ComplexDoubleStorage": torch.complex128,
        "UInt16Storage": getattr(torch, "uint16", None),
        "UInt32Storage": getattr(torch, "uint32", None),
        "UInt64Storage": getattr(torch, "uint64", None),
        "Float8_e5m2Storage": getattr(torch, "float8_e5m2", None),
        "Float8_e4m3fnStorage": getattr(torch, "float8_e4m3fn", None),
        "Float8_e5m2fnuzStorage": getattr(torch, "float8_e5m2fnuz", None),
        "Float8_e4m3fnuzStorage": getattr(torch, "float8_e4m3fnuz", None),
    }.items()
    if dtype is not None
}
_TORCHSCRIPT_MAX_DIMS = 64
_TORCHSCRIPT_MAX_DEPTH = 1000
_TORCHSCRIPT_MAX_TEXT_BYTES = 1 << 28  # data.pkl and each code file: OpenAI's are well under 10 MB
_TORCHSCRIPT_CLASS_RE = re.compile(r"^class (\w+)(?:\(([\w.]*)\))?:[ \t]*$", re.MULTILINE)
_TORCHSCRIPT_TOP_LEVEL_RE = re.compile(r"^\S", re.MULTILINE)
_TORCHSCRIPT_NAMES_RE = re.compile(r"^  (__parameters__|__buffers__) = (\[.*\])[ \t]*$", re.MULTILINE)


class _ScriptObject:
    """Inert stand-in for an instance of a class scripted in the archive: it keeps its state and runs nothing."""

    __slots__ = ("state",)
    type_name = ""  # the scripted class's qualified name, set on the per-name subclass

    def __new__(cls, *args: Any, **kwargs: Any) -> "_ScriptObject":
        obj = super().__new__(cls)
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # REDUCE construction: the arguments are ignored

    def __setstate__(self, state: Any) -> None:
        self.state = state  # stored, never interpreted or called


class _StorageType:
    """What ``torch.FloatStorage`` and its kin stand for in the pickle: only the dtype."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype


class _Storage:
    """One storage of the archive, read from ``<root>/data/<key>`` into a flat CPU tensor."""

    __slots__ = ("flat",)

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > _TORCHSCRIPT_MAX_DIMS:
        raise ForensicsError(f"its tensor {what} is not a short tuple of integers")
    if not all(isinstance(v, int) and v >= 0 for v in value):
        raise ForensicsError(f"its tensor {what} {value!r} holds a negative or non-integer entry")
    return tuple(value)


def _rebuild_tensor_safely(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, hooks: Any = None, *rest: Any
) -> torch.Tensor:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: a view of a storage, checked to lie inside it."""
    if not isinstance(storage, _Storage):
        raise ForensicsError("a tensor in it is built from something that is no storage of the archive")
    if not isinstance(offset, int) or offset < 0:
        raise ForensicsError(f"a tensor in it has the storage offset {offset!r}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise ForensicsError(f"a tensor in it has size {size} but stride {stride}")
    numel = storage.flat.numel()
    if 0 not in size:
        end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
        if end > numel:
            raise ForensicsError(f"a tensor in it ({size}, offset {offset}) reaches past its storage of {numel}")
    elif offset > numel:
        raise ForensicsError(f"a tensor in it starts at {offset}, past its storage of {numel}")
    return torch.as_strided(storage.flat, size, stride, offset)


def _rebuild_parameter_safely(data: Any, requires_grad: Any = False, hooks: Any = None, *rest: Any) -> torch.Tensor:
    """Stand-in for ``torch._utils._rebuild_parameter``: the tensor itself (a state dict needs no Parameter)."""
    if not isinstance(data, torch.Tensor):
        raise ForensicsError("a parameter in it wraps something that is no tensor")
    return data


def _same_value(value: Any, *rest: Any) -> Any:
    """Stand-in for ``torch.jit._pickle``'s list builders and ``restore_type_tag``: the value itself."""
    return value


def _device_name(*args: Any) -> str:
    """Stand-in for ``torch.device``: its text, which no tensor here needs."""
    return ":".join(str(a) for a in args if isinstance(a, (str, int)))


_TORCHSCRIPT_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_safely,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter_safely,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _same_value,
    ("torch.jit._pickle", "build_doublelist"): _same_value,
    ("torch.jit._pickle", "build_boollist"): _same_value,
    ("torch.jit._pickle", "build_tensorlist"): _same_value,
    ("torch.jit._pickle", "restore_type_tag"): _same_value,
    ("torch", "device"): _device_name,
    ("builtins", "complex"): complex,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _TORCHSCRIPT_STORAGE_DTYPES.items()},
}


class _TorchScriptUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` with inert stand-ins for scripted classes and a short list of tensor builders;
    every other global is refused before it could run, and storages come straight from the zip's bytes."""

    def __init__(self, data: bytes, zf: zipfile.ZipFile, root: str, name: str) -> None:
        super().__init__(io.BytesIO(data))
        self._zf, self._root, self._name = zf, root, name
        self._members = {info.filename: info for info in zf.infolist()}
        self._storages: dict[str, _Storage] = {}
        self._classes: dict[str, type[_ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type(
                    "_ScriptObject", (_ScriptObject,), {"__slots__": (), "type_name": qualname}
                )
            return self._classes[qualname]
        if (module, name) in _TORCHSCRIPT_GLOBALS:
            return _TORCHSCRIPT_GLOBALS[(module, name)]
        raise UnsafeCheckpointError(
            f"refused {self._name}: its TorchScript pickle names the global {module}.{name}, which no archive "
            "of tensors needs; nothing in it was run"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ForensicsError(f"it refers to a persistent object {str(pid)[:80]!r} that is no storage")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType):
            raise ForensicsError(f"its storage {str(key)[:40]!r} has no known storage type")
        if not isinstance(key, str) or not key or "/" in key or not isinstance(numel, int) or numel < 0:
            raise ForensicsError(f"it has a malformed storage reference {str(pid)[:80]!r}")
        if key in self._storages:
            storage = self._storages[key]
            if storage.flat.dtype != kind.dtype or storage.flat.numel() != numel:
                raise ForensicsError(f"its storage {key!r} is referred to with two different types or sizes")
            return storage
        member = f"{self._root}/data/{key}"
        info = self._members.get(member)
        if info is None:
            raise ForensicsError(f"its storage {key!r} should be {member}, which the archive lacks")
        expected = numel * kind.dtype.itemsize
        if info.file_size != expected:
            raise ForensicsError(
                f"its storage {member} holds {info.file_size} bytes, not the {expected} that {numel} "
                f"{kind.name} elements need (truncated or corrupt)"
            )
        buffer = bytearray(expected)
        view, filled = memoryview(buffer), 0
        with self._zf.open(info) as fh:
            while filled < expected:
                chunk = fh.read(min(1 << 24, expected - filled))
                if not chunk:
                    break
                view[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
        if filled != expected:
            raise ForensicsError(f"its storage {member} ends after {filled} of {expected} bytes")
        flat = torch.frombuffer(buffer, dtype=kind.dtype) if expected else torch.empty(0, dtype=kind.dtype)
        self._storages[key] = _Storage(flat)
        return self._storages[key]


def _torchscript_class_tensors(zf: zipfile.ZipFile, root: str) -> dict[str, tuple[bool, list[str] | None]]:
    """For each class in ``<root>/code/``: whether it is a Module, and its parameter and buffer names in order
    (None when they cannot be read). The source is only scanned as text."""
    classes: dict[str, tuple[bool, list[str] | None]] = {}
    prefix = f"{root}/code/"
    for info in zf.infolist():
        member = info.filename
        if not (member.startswith(prefix) and member.endswith(".py")) or info.file_size > _TORCHSCRIPT_MAX_TEXT_BYTES:
            continue  # an oversized code file leaves its classes unknown: all their tensor attributes count
        module = member[len(prefix) : -len(".py")].replace("/", ".")
        text = zf.read(member).decode("utf-8", errors="replace")
        for header in _TORCHSCRIPT_CLASS_RE.finditer(text):
            following = _TORCHSCRIPT_TOP_LEVEL_RE.search(text, header.end() + 1)
            body = text[header.end() : following.start() if following else len(text)]
            names: list[str] | None = []
            for match in _TORCHSCRIPT_NAMES_RE.finditer(body):
                try:
                    listed = ast.literal_eval(match.group(2))
                except (ValueError, SyntaxError, MemoryError, RecursionError):
                    listed = None
                if names is None or not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
                    names = None
                else:
                    names.extend(listed)
            classes[f"{module}.{header.group(1)}"] = (header.group(2) == "Module", names)
    return classes


def _collect_module_tensors(top: Any, classes: dict[str, tuple[bool, list[str] | None]]) -> dict[str, torch.Tensor]:
    """The parameters and buffers under their dotted attribute paths, as ``ScriptModule.state_dict()`` names them.

    A Module class contributes the tensors its ``__parameters__``/``__buffers__`` name; a class missing from the
    code every tensor attribute; non-Module scripted classes none. State that a scripted ``__getstate__`` made a
    tuple carries no names, so its tensors are skipped.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    stack: list[tuple[Any, str, int]] = [(top, "", 0)]
    while stack:
        obj, prefix, depth = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if depth > _TORCHSCRIPT_MAX_DEPTH:
            raise ForensicsError(f"its modules nest more than {_TORCHSCRIPT_MAX_DEPTH} deep")
        is_module, names = classes.get(obj.type_name, (True, None))
        state = obj.state
        if not is_module or not isinstance(state, dict):
            continue
        if names is None:
            names = [k for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)]
        for name in names:
            value = state.get(name)
            if isinstance(value, torch.Tensor):
                out[prefix + name] = value
        children = [(k, v) for k, v in state.items() if isinstance(k, str) and isinstance(v, _ScriptObject)]
        stack.extend((child, f"{prefix}{key}.", depth + 1) for key, child in reversed(children))
    return out


def _read_torchscript_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, read as data: nothing in the archive runs."""
    name = path.name
    try:
        with zipfile.ZipFile(path) as zf:
            pickles = [n for n in zf.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
            if len(pickles) != 1:
                raise ForensicsError(f"it has {len(pickles) or 'no'} <root>/data.pkl entries, not one")
            root = pickles[0].split("/", 1)[0]
            if zf.getinfo(pickles[0]).file_size > _TORCHSCRIPT_MAX_TEXT_BYTES:
                raise ForensicsError(f"its {pickles[0]} is larger than any module tree needs")
            members = set(zf.namelist())
            if f"{root}/byteorder" in members and zf.read(f"{root}/byteorder").strip() not in (b"", b"little"):
                raise ForensicsError("its tensors are big-endian, which this tool does not read")
            top = _TorchScriptUnpickler(zf.read(pickles[0]), zf, root, name).load()
            if not isinstance(top, _ScriptObject):
                raise ForensicsError("its data.pkl holds no scripted module")
            state = _collect_module_tensors(top, _torchscript_class_tensors(zf, root))
    except UnsafeCheckpointError:
        raise
    except ForensicsError as exc:
        raise ForensicsError(f"checkpoint {name} looks like a TorchScript archive but is malformed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt zip or pickle fails in many ways; each is one clear line
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ForensicsError(
            f"checkpoint {name} looks like a TorchScript archive but is malformed: {type(exc).__name__} {first}".strip()
        ) from None
    if not state:
        raise ForensicsError(f"checkpoint {name} is a TorchScript archive without named parameters or buffers")
    return state


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
        return _read_torchscript_tensors(path)
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


_SIDECAR_MAX_BYTES = 64 << 20  # the project's sidecars are a few kB to a few MB (vocabulary, training history)
_SIDECAR_KEYS = ("format", "arch", "model_cfg", "tokenizer")  # a JSON holding none of these is no sidecar of ours
_MAX_LAYERS = 256  # per tower (or ResNet stage): ViT-e-14 has 56; more only slows the build down to a crawl
_MAX_IMAGE_SIZE = 4096  # pixels a side: CLIPs take 224-448
_MAX_CONTEXT_LENGTH = 4096  # tokens: CLIPs take 77
_BPE_VOCAB_SIZE = 49408  # open_clip's tokenizer emits ids up to 49407
# top-level model_cfg keys build_clip passes on to CLIP(...) with their types; the others it drops
_MODEL_CFG_SETTINGS: dict[str, Any] = {
    "embed_dim": int,
    "vision_cfg": dict,
    "text_cfg": dict,
    "custom_text": bool,
    "init_logit_scale": float,
    "init_logit_bias": typing.Optional[float],
    "nonscalar_logit_scale": bool,
    "output_dict": bool,
}
_MODEL_CFG_IGNORED = {"description", "tokenizer", "preprocess_cfg", "quick_gelu"}
_TOWER_SETTINGS = {
    "vision_cfg": {f.name: f.type for f in fields(CLIPVisionCfg)},
    "text_cfg": {f.name: f.type for f in fields(CLIPTextCfg)},
}
_TOWER_DEFAULTS = {
    "vision_cfg": {f.name: f.default for f in fields(CLIPVisionCfg) if f.default is not MISSING},
    "text_cfg": {f.name: f.default for f in fields(CLIPTextCfg) if f.default is not MISSING},
}
_TOWER_SIZES = ("width", "layers", "heads", "head_width", "patch_size", "image_size", "context_length", "vocab_size")


def _describe(value: Any) -> str:
    """A JSON value in a few words, for messages: the string 'abc', the number 3, a list of 2, an object, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = repr(value)
        return f"the number {text if len(text) <= 24 else text[:21] + '...'}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}" + ("..." if len(value) > 40 else "")
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a JSON value fits an open_clip config annotation (int, float, bool, str, dict, Optional, Union, Tuple);
    null always fits (open_clip reads it as "unset"; where it cannot be, the build check names the config)."""
    if value is None or annotation is Any:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return any(_fits(value, a) for a in args if a is not type(None))
    if origin is tuple:
        items = [a for a in args if a is not Ellipsis]
        if Ellipsis in args:
            return isinstance(value, list) and all(_fits(v, items[0]) for v in value)
        return isinstance(value, list) and len(value) == len(items) and all(_fits(v, a) for v, a in zip(value, items))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return _is_int(value)
    if annotation is float:
        return _is_number(value)
    if annotation is str:
        return isinstance(value, str)
    if annotation is dict or origin is dict:
        return isinstance(value, dict)
    if annotation is list or origin is list:
        return isinstance(value, list)
    return True  # a type JSON cannot hold: left to the build check


def _type_words(annotation: Any) -> str:
    """An open_clip config annotation in words: "an integer", "a list of 4 integers or an integer", ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        return " or ".join(_type_words(a) for a in args if a is not type(None))
    if origin is tuple:
        items = [a for a in args if a is not Ellipsis]
        what = {int: "integers", float: "numbers", str: "strings"}.get(items[0] if items else None, "values")
        return f"a list of {what}" if Ellipsis in args or not items else f"a list of {len(items)} {what}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object"}.get(
        annotation if origin is None else origin, "a valid value"
    )


class _Sidecar:
    """Checks one sidecar's fields, raising a one-line ForensicsError that names the first bad field."""

    def __init__(self, name: str) -> None:
        self.name = name

    def error(self, key: str, problem: str) -> ForensicsError:
        return ForensicsError(f"sidecar {self.name}: field {key!r} {problem}")

    def need(self, ok: bool, key: str, expected: str, value: Any) -> None:
        if not ok:
            raise self.error(key, f"must be {expected}, not {_describe(value)}")

    def get(self, data: dict, key: str, prefix: str = "", required: bool = False) -> Any:
        if required and key not in data:
            raise self.error(prefix + key, "is missing")
        return data.get(key)

    def check(self, data: Any) -> dict:
        """The sidecar itself, every field the loader reads checked for presence, type and consistency."""
        fmt = self.get(data, "format", required=True)
        if fmt != SIDECAR_FORMAT:
            raise self.error(
                "format",
                f"is {_describe(fmt)}, not {SIDECAR_FORMAT!r} (a sidecar this tool wrote); "
                "move the JSON away to load the checkpoint without it",
            )
        arch = self.get(data, "arch", required=True)
        self.need(isinstance(arch, str) and bool(arch.strip()), "arch", "a non-empty string", arch)
        self.need(len(arch) <= 200 and arch.isprintable(), "arch", "an architecture name on one line", arch)
        if "quick_gelu" in data:
            self.need(isinstance(data["quick_gelu"], bool), "quick_gelu", "true or false", data["quick_gelu"])
        cfg = self.get(data, "model_cfg", required=True)
        self.need(isinstance(cfg, dict), "model_cfg", "an object (the open_clip model config)", cfg)
        self.model_cfg(cfg)
        self.tokenizer(self.get(data, "tokenizer", required=True), cfg["text_cfg"])
        self.preprocess(data.get("preprocess"))
        self.backdoor(data.get("backdoor"))
        self.class_prompts(data.get("class_prompts"))
        return data

    def model_cfg(self, cfg: dict) -> None:
        for key in ("embed_dim", "vision_cfg", "text_cfg"):
            self.get(cfg, key, "model_cfg.", required=True)
        embed_dim = cfg["embed_dim"]
        self.need(_is_int(embed_dim) and embed_dim >= 1, "model_cfg.embed_dim", "a positive integer", embed_dim)
        for key, value in cfg.items():
            if key in _MODEL_CFG_IGNORED or key == "embed_dim":
                continue
            if key not in _MODEL_CFG_SETTINGS:
                raise self.error(f"model_cfg.{key}", "is no setting of the CLIPs this tool builds")
            annotation = _MODEL_CFG_SETTINGS[key]
            ok = isinstance(value, dict) if annotation is dict else _fits(value, annotation)
            self.need(ok, f"model_cfg.{key}", _type_words(annotation), value)
        for tower in ("vision_cfg", "text_cfg"):
            self.tower(cfg[tower], tower)

    def tower(self, cfg: dict, tower: str) -> None:
        settings = _TOWER_SETTINGS[tower]
        for key, value in cfg.items():
            where = f"model_cfg.{tower}.{key}"
            if key not in settings:
                raise self.error(where, f"is no setting of open_clip's {tower}")
            self.need(_fits(value, settings[key]), where, _type_words(settings[key]), value)
            if key not in _TOWER_SIZES or (value is None and key == "patch_size"):
                continue  # ResNet towers have no patches
            sizes = value if isinstance(value, list) else [value]
            self.need(all(_is_int(v) and v >= 1 for v in sizes), where, "a positive integer", value)
            limit = {"layers": _MAX_LAYERS, "image_size": _MAX_IMAGE_SIZE, "context_length": _MAX_CONTEXT_LENGTH}
            if key in limit and max(sizes) > limit[key]:
                raise self.error(where, f"is {_describe(value)}; no CLIP this tool can load has more than {limit[key]}")

    def tokenizer(self, spec: Any, text_cfg: dict) -> None:
        self.need(isinstance(spec, dict), "tokenizer", "an object (the tokenizer spec)", spec)
        kind = spec.get("kind", "open_clip")
        self.need(kind in ("word", "open_clip"), "tokenizer.kind", "'word' or 'open_clip'", kind)
        model_length = text_cfg.get("context_length", _TOWER_DEFAULTS["text_cfg"]["context_length"])
        vocab_size = text_cfg.get("vocab_size", _TOWER_DEFAULTS["text_cfg"]["vocab_size"])
        length = spec.get("context_length", 32 if kind == "word" else 77)
        self.need(_is_int(length) and length >= 2, "tokenizer.context_length", "an integer of at least 2", length)
        if length != model_length:
            raise self.error(
                "tokenizer.context_length",
                f"is {length}, but the text tower (model_cfg.text_cfg.context_length) takes {model_length} tokens",
            )
        if kind == "word":
            words = self.get(spec, "words", "tokenizer.", required=True)
            ok = isinstance(words, list) and all(isinstance(w, str) for w in words)
            self.need(ok, "tokenizer.words", "a list of strings (the vocabulary)", words)
            if len(words) + 4 > vocab_size:
                raise self.error(
                    "tokenizer.words",
                    f"holds {len(words)} words, which with 4 special tokens do not fit the text tower's "
                    f"{vocab_size}-token vocabulary (model_cfg.text_cfg.vocab_size)",
                )
        elif vocab_size < _BPE_VOCAB_SIZE:
            raise self.error(
                "tokenizer.kind",
                f"is open_clip's BPE ({_BPE_VOCAB_SIZE} tokens), but the text tower has a {vocab_size}-token "
                "vocabulary (model_cfg.text_cfg.vocab_size)",
            )

    def preprocess(self, pre: Any) -> None:
        if pre is None:
            return
        self.need(isinstance(pre, dict), "preprocess", "an object with 'mean' and 'std'", pre)
        for key in ("mean", "std"):
            if key in pre:
                value = pre[key]
                ok = isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)
                ok = ok and (key == "mean" or all(v > 0 for v in value))
                what = "a list of 3 numbers" if key == "mean" else "a list of 3 positive numbers"
                self.need(ok, f"preprocess.{key}", what, value)

    def backdoor(self, planted: Any) -> None:
        if planted is None:
            return
        self.need(isinstance(planted, dict), "backdoor", "an object (the planted backdoor) or null", planted)
        for key in ("attack", "target"):
            if planted.get(key) is not None:
                self.need(isinstance(planted[key], str), f"backdoor.{key}", "a string", planted[key])
        trigger = planted.get("trigger")
        if trigger is not None:
            ok = isinstance(trigger, dict) and isinstance(trigger.get("attack"), str)
            self.need(ok, "backdoor.trigger", "an object naming its 'attack'", trigger)

    def class_prompts(self, spec: Any) -> None:
        if spec is None:
            return
        self.need(isinstance(spec, dict), "class_prompts", "an object (the learnt prompts' classes) or null", spec)
        names = self.get(spec, "class_names", "class_prompts.", required=True)
        ok = isinstance(names, list) and bool(names) and all(isinstance(n, str) for n in names)
        self.need(ok, "class_prompts.class_names", "a non-empty list of strings", names)
        template = self.get(spec, "template", "class_prompts.", required=True)
        self.need(
            isinstance(template, str) and "{}" in template, "class_prompts.template", "a string with {}", template
        )
        if "key" in spec:
            self.need(spec["key"] == PROMPT_CONTEXT_KEY, "class_prompts.key", repr(PROMPT_CONTEXT_KEY), spec["key"])


def read_sidecar(path: Path) -> dict | None:
    """The JSON sidecar the project writes beside its ``.safetensors`` outputs, if there is one, checked field by
    field: a sidecar is as untrusted as its checkpoint, so a bad one is refused in one line naming the field.

    A JSON beside the file that holds none of a sidecar's keys is someone else's file and is ignored.
    """
    side = path.with_suffix(".json")
    if not side.is_file():
        return None
    try:
        if side.stat().st_size > _SIDECAR_MAX_BYTES:
            raise ForensicsError(
                f"sidecar {side.name} is {side.stat().st_size:,} bytes, more than any sidecar this tool writes"
            )
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ForensicsError(f"sidecar {side.name} is not valid JSON: {_first_line(exc)}") from None
    if not isinstance(data, dict) or not any(key in data for key in _SIDECAR_KEYS):
        return None
    return _Sidecar(side.name).check(data)


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


def check_finite_outputs(model: SuspectModel) -> None:
    """Refuse a model whose embeddings are NaN or infinite (one tiny forward of both towers): every score of such a
    model is meaningless, so a scan would report nothing flagged and a repair would polish noise."""
    size = model.image_size
    with frozen(model), torch.no_grad():
        images = torch.full((2, 3, size, size), 0.5)
        finite = bool(torch.isfinite(model.encode_image(images)).all())
        finite = bool(torch.isfinite(model.encode_text(["a photo"])).all()) and finite
    if finite:
        return
    count = count_nonfinite(_model_tensors(model))
    why = (
        f"{count:,} of its weights are non-finite" if count else "all its weights are finite: its computation overflows"
    )
    raise ForensicsError(f"the model's outputs are NaN or infinite ({why}); it cannot be scanned or repaired")


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

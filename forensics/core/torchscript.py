"""TorchScript archives read as data: their parameters and buffers, without running anything in them.

``torch.jit.load`` runs code from the archive (a scripted ``__setstate__`` runs as the archive loads), so a
TorchScript checkpoint is read here as what it is on disk: a zip holding ``<root>/data.pkl`` (the module tree
as a pickle), ``<root>/data/<key>`` (raw storage bytes) and ``<root>/code/`` (the scripted source, which is only
scanned as text for each class's ``__parameters__``/``__buffers__`` lists, never compiled).
"""

from __future__ import annotations

import ast
import io
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from forensics.core.errors import ForensicsError, UnsafeCheckpointError

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


def read_torchscript_tensors(path: Path) -> dict[str, torch.Tensor]:
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

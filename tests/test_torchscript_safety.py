"""TorchScript checkpoints are read as data: the tensors come out exactly as ``torch.jit.load`` gives them,
while code in the archive (a scripted ``__setstate__``, a pickled call of ``os.system``) never runs.

The scripted classes live at module level because ``torch.jit.script`` needs their source.
"""

from __future__ import annotations

import os
import pickle
import shlex
import struct
import sys
import zipfile
from pathlib import Path
from typing import Tuple

import pytest
import torch

from forensics.core.errors import ForensicsError, UnsafeCheckpointError
from forensics.core.models import _is_torchscript, architecture_config, build_clip, load_model, read_state_dict

pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")

WRITTEN = b"AAAAAAAA"  # what the hostile __setstate__ writes


# --------------------------------------------------------------------------- scripted modules for the archives


@torch.jit.script
class Box:
    """A scripted (non-Module) class: its tensor is an attribute, not a parameter or buffer."""

    def __init__(self, t: torch.Tensor):
        self.t = t


class Leaf(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("half_buf", torch.randn(4).half())
        self.register_buffer("scratch", torch.randn(2), persistent=False)  # TorchScript saves it too
        self.plain = torch.randn(3)  # a plain tensor attribute: no state-dict entry
        self.count = 5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.plain.sum()


class Tree(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.leaf = Leaf()
        self.seq = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.LayerNorm(2))
        self.norm = torch.nn.BatchNorm1d(2)
        self.scale = torch.nn.Parameter(torch.tensor(2.5))
        self.register_buffer("ids", torch.tensor([3, 1, 2]))
        self.register_buffer("mask", torch.tensor([True, False]))
        self.register_buffer("bf", torch.randn(3).bfloat16())
        self.register_buffer("window", torch.arange(12.0).reshape(3, 4)[:, 1:3])  # a strided view, offset 1
        self.box = Box(torch.ones(2))
        self.sizes = [1, 2, 3]
        self.table = {"a": torch.ones(1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(self.leaf(x)) * self.scale + self.box.t.sum()


class FileWriter(torch.nn.Module):
    """Hostile: its scripted ``__setstate__`` maps the file at ``path`` shared (creating it when absent) and
    writes ``AAAAAAAA`` into it the moment ``torch.jit.load`` reads the archive."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.mapped = torch.zeros(0, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        self.mapped = torch.from_file(self.path, True, 8, dtype=torch.uint8)
        self.mapped.fill_(65)


class HostileHost(torch.nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.payload = FileWriter(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.payload(self.lin(x))


class HostileCheckpoint(torch.nn.Module):
    """A traced CLIP (``module.*`` keys, as a DDP save has them) beside the file-writing payload."""

    def __init__(self, clip: torch.nn.Module, path: str):
        super().__init__()
        self.module = clip
        self.payload = FileWriter(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.payload(x)


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def no_torch_loaders(monkeypatch):
    """Makes torch.jit.load and torch.load fail, so a passing test shows neither was used."""

    def refuse(*args, **kwargs):
        raise AssertionError("the TorchScript reader must not call torch.jit.load or torch.load")

    def install():
        monkeypatch.setattr(torch.jit, "load", refuse)
        monkeypatch.setattr(torch, "load", refuse)

    return install


def assert_same_tensors(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


def rewrite_zip(src: Path, dst: Path, change) -> None:
    """Copy an archive, passing each (name, bytes) through ``change``, which may return None to drop it."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)


def write_archive(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    """A hand-made archive in TorchScript's layout (``_is_torchscript`` accepts it), with no code folder."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data)
    assert _is_torchscript(path)
    return path


def _u(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _short(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def tensor_ops(key: str, numel: int, size: tuple[int, ...], offset: int = 0) -> bytes:
    """Pickle opcodes that rebuild a float32 tensor from storage ``key``, as TorchScript writes them."""
    stride = [1] * len(size)
    for i in range(len(size) - 2, -1, -1):
        stride[i] = stride[i + 1] * size[i + 1]
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + b"("
        + _u("storage")
        + b"ctorch\nFloatStorage\n"
        + _u(key)
        + _u("cpu")
        + _int(numel)
        + b"tQ"
        + _int(offset)
        + b"("
        + b"".join(_int(n) for n in size)
        + b"t("
        + b"".join(_int(s) for s in stride)
        + b"t\x89ccollections\nOrderedDict\n)RtR"
    )


def module_pickle(attributes: dict[str, bytes]) -> bytes:
    """A scripted module ``__torch__.Hand`` whose attributes are the given pickle opcodes."""
    items = b"".join(_u(name) + ops for name, ops in attributes.items())
    return b"\x80\x02c__torch__\nHand\n)\x81}(" + items + b"ub."


# --------------------------------------------------------------------------- 1. same tensors as torch.jit.load


def test_scripted_module_reads_like_torch_jit_load(tmp_path, no_torch_loaders):
    torch.manual_seed(0)
    path = tmp_path / "tree.pt"
    torch.jit.save(torch.jit.script(Tree()), str(path))
    want = dict(torch.jit.load(str(path)).state_dict())
    assert {"leaf.half_buf", "leaf.scratch", "leaf.lin.weight", "seq.2.bias", "norm.num_batches_tracked"} <= set(want)
    assert want["leaf.half_buf"].dtype == torch.float16 and want["bf"].dtype == torch.bfloat16
    no_torch_loaders()
    got = read_state_dict(path)
    assert_same_tensors(got, want)
    assert "leaf.plain" not in got and not any(k.startswith("box") for k in got)  # no parameters or buffers


def test_traced_clip_reads_like_torch_jit_load(tmp_path, no_torch_loaders):
    """OpenAI ships traced CLIPs; a traced tiny CLIP gives the same keys and tensors as ``torch.jit.load``."""
    torch.manual_seed(0)
    clip = build_clip(architecture_config("tiny-rn")).eval()
    traced = torch.jit.trace(clip, (torch.rand(1, 3, 128, 128), torch.randint(0, 1000, (1, 32))), check_trace=False)
    path = tmp_path / "traced.pt"
    traced.save(str(path))
    want = dict(torch.jit.load(str(path)).state_dict())
    no_torch_loaders()
    got = read_state_dict(path)
    assert_same_tensors(got, want)
    assert set(got) == set(clip.state_dict()) | {"attn_mask"}


def test_hand_made_archive_without_code_keeps_its_tensors(tmp_path):
    """A module class the archive has no code for: every tensor attribute counts (strided views included)."""
    data = struct.pack("<6f", 0, 1, 2, 3, 4, 5)
    path = write_archive(
        tmp_path / "hand.pt",
        module_pickle({"w": tensor_ops("0", 6, (2, 2), offset=1), "n": _int(7)}),
        {"0": data},
    )
    got = read_state_dict(path)
    assert list(got) == ["w"]
    assert torch.equal(got["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


# --------------------------------------------------------------------------- 2. a hostile archive runs nothing


@pytest.mark.parametrize("target_exists", [False, True], ids=["creates-file", "overwrites-file"])
def test_hostile_setstate_runs_under_jit_load_but_not_here(tmp_path, no_torch_loaders, target_exists):
    target = tmp_path / "written_by_archive.bin"
    original = b"original contents of a user's file"
    path = tmp_path / "hostile.pt"
    torch.jit.save(torch.jit.script(HostileHost(str(target))), str(path))
    assert not target.exists()  # scripting and saving ran nothing

    if target_exists:
        target.write_bytes(original)
    want = dict(torch.jit.load(str(path)).state_dict())  # the archive is hostile: loading it writes the file
    assert target.read_bytes()[:8] == WRITTEN
    target.unlink()

    if target_exists:
        target.write_bytes(original)
    no_torch_loaders()
    got = read_state_dict(path)
    if target_exists:
        assert target.read_bytes() == original
    else:
        assert not target.exists()
    assert_same_tensors(got, want)  # lin.weight, lin.bias: the payload module holds no tensors


@pytest.mark.slow
def test_hostile_checkpoint_loads_as_a_model_without_running(tmp_path, no_torch_loaders):
    """Through load_model (what the CLI and the web upload call): the model loads, the payload never runs."""
    arch = "ViT-S-32-alt"
    torch.manual_seed(0)
    clip = build_clip(architecture_config(arch)).eval()
    size = clip.visual.image_size[0] if isinstance(clip.visual.image_size, tuple) else clip.visual.image_size
    traced = torch.jit.trace(clip, (torch.rand(1, 3, size, size), torch.randint(0, 1000, (1, 77))), check_trace=False)
    target = tmp_path / "written_by_archive.bin"
    path = tmp_path / "openai_style_hostile.pt"
    try:
        torch.jit.save(torch.jit.script(HostileCheckpoint(traced, str(target))), str(path))
        del traced
        torch.jit.load(str(path))  # proof that the archive is hostile
        assert target.read_bytes() == WRITTEN
        target.unlink()

        no_torch_loaders()
        loaded = load_model(str(path), arch=arch)
        assert not target.exists()
        got, want = loaded.clip.state_dict(), clip.state_dict()
        assert set(got) == set(want)
        for key, value in want.items():
            assert torch.equal(got[key], value), key
    finally:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- 3. hand-made pickles and damage


def _live(marker: Path) -> dict[str, bytes]:
    """Pickles that each create ``marker`` when plainly unpickled, by GLOBAL (protocol 2) or STACK_GLOBAL (4)."""
    touch = _u(f"touch {shlex.quote(str(marker))}")
    return {
        "os.system": b"\x80\x02cos\nsystem\n(" + touch + b"tR.",
        "builtins.eval": b"\x80\x02cbuiltins\neval\n(" + _u(f"open({str(marker)!r}, 'w').close()") + b"tR.",
        "subprocess.Popen": b"\x80\x02csubprocess\nPopen\n(](" + _u("touch") + _u(str(marker)) + b"etR.",
        "subprocess.Popen-stack-global": (
            b"\x80\x04" + _short("subprocess") + _short("Popen") + b"\x93(](" + _u("touch") + _u(str(marker)) + b"etR."
        ),
    }


@pytest.mark.parametrize("kind", list(_live(Path("x"))))
def test_pickled_calls_are_refused_and_run_nothing(tmp_path, kind):
    marker = tmp_path / "marker"
    payload = _live(marker)[kind]
    result = pickle.loads(payload)  # the payload is live: plain unpickling creates the marker
    if hasattr(result, "wait"):
        result.wait()
    assert marker.exists()
    marker.unlink()

    path = write_archive(tmp_path / "evil.pt", payload)
    for read in (lambda: read_state_dict(path), lambda: load_model(str(path), arch="ViT-B-32")):
        with pytest.raises(UnsafeCheckpointError) as err:
            read()
        assert kind.split("-")[0] in str(err.value) and "nothing in it was run" in str(err.value)
        assert "\n" not in str(err.value)
    assert not marker.exists()


def test_pickled_call_inside_a_scripted_module_is_refused(tmp_path):
    marker = tmp_path / "marker"
    call = b"cos\nsystem\n(" + _u(f"touch {shlex.quote(str(marker))}") + b"tR"
    path = write_archive(tmp_path / "nested.pt", module_pickle({"w": call}))
    with pytest.raises(UnsafeCheckpointError, match=r"os\.system"):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "global_name",
    ["torch.load", "torch.jit.load", "torch._utils._rebuild_tensor", "torch.storage._load_from_bytes", "posix.system"],
)
def test_other_torch_globals_are_refused(tmp_path, global_name):
    module, name = global_name.rsplit(".", 1)
    path = write_archive(tmp_path / "evil.pt", b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"(" + _u("x") + b"tR.")
    with pytest.raises(UnsafeCheckpointError, match=global_name.replace(".", r"\.")):
        read_state_dict(path)


@pytest.fixture
def scripted_archive(tmp_path) -> tuple[Path, str]:
    path = tmp_path / "tree.pt"
    torch.jit.save(torch.jit.script(Tree()), str(path))
    with zipfile.ZipFile(path) as zf:
        root = next(n for n in zf.namelist() if n.endswith("/data.pkl")).split("/")[0]
    return path, root


def _one_line_error(path: Path) -> str:
    with pytest.raises(ForensicsError) as err:
        read_state_dict(path)
    assert not isinstance(err.value, UnsafeCheckpointError)
    message = str(err.value)
    assert "\n" not in message and path.name in message
    return message


def test_storage_key_without_member(tmp_path, scripted_archive):
    src, root = scripted_archive
    path = tmp_path / "missing.pt"
    rewrite_zip(src, path, lambda name, data: None if name == f"{root}/data/0" else data)
    message = _one_line_error(path)
    assert f"{root}/data/0" in message and "lacks" in message


def test_truncated_storage(tmp_path, scripted_archive):
    src, root = scripted_archive
    path = tmp_path / "truncated.pt"
    rewrite_zip(src, path, lambda name, data: data[:-1] if name == f"{root}/data/0" else data)
    assert "truncated" in _one_line_error(path)


def test_tensor_reaching_past_its_storage(tmp_path):
    path = write_archive(tmp_path / "oob.pt", module_pickle({"w": tensor_ops("0", 2, (5,))}), {"0": bytes(8)})
    assert "past its storage" in _one_line_error(path)


def test_storage_size_disagreeing_with_its_numel(tmp_path):
    path = write_archive(tmp_path / "size.pt", module_pickle({"w": tensor_ops("0", 4, (4,))}), {"0": bytes(12)})
    assert "truncated or corrupt" in _one_line_error(path)


@pytest.mark.parametrize(
    "data_pkl",
    [b"garbage, not a pickle", b"\x80\x02", b"\x80\x02]q\x00.", b"\x80\x02c__torch__\nHand\n)\x81}b."],
    ids=["garbage", "cut-short", "no-module", "no-tensors"],
)
def test_malformed_pickles_give_one_clear_line(tmp_path, data_pkl):
    _one_line_error(write_archive(tmp_path / "bad.pt", data_pkl))


def test_archive_without_data_pkl(tmp_path, scripted_archive):
    src, root = scripted_archive
    path = tmp_path / "nodata.pt"
    rewrite_zip(src, path, lambda name, data: None if name == f"{root}/data.pkl" else data)
    assert _is_torchscript(path)
    assert "data.pkl" in _one_line_error(path)


@pytest.mark.skipif(sys.platform == "win32", reason="shared file mapping semantics differ")
def test_file_writer_archive_is_hostile_on_this_platform(tmp_path):
    """Guards the hostile test itself: TorchScript's ``torch.from_file(shared=True)`` really writes files."""
    target = tmp_path / "probe.bin"
    torch.from_file(str(target), True, 8, dtype=torch.uint8).fill_(65)
    assert target.read_bytes() == WRITTEN
    assert os.path.getsize(target) == 8

"""Every PIL image mode reaches the models as the right 8-bit RGB: 16-bit, 32-bit and float images are scaled, not
clipped to white; transparency becomes white; CMYK, palette, 1-bit and gray convert as PIL converts them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from forensics.core.errors import ForensicsError
from forensics.core.images import load_image, pil_to_model_tensor, to_rgb, to_tensor

W = 256  # gradient width: one column per 8-bit level


def _rgb(image: Image.Image) -> np.ndarray:
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    return np.asarray(out).astype(int)


def _gradient16() -> np.ndarray:
    return np.linspace(0, 65535, W).round().astype(np.uint16)[None].repeat(4, axis=0)


def _assert_gradient(rgb: np.ndarray) -> None:
    """An 8-bit gray ramp 0..255 left to right, the same in all three channels."""
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    row = rgb[0, :, 0]
    assert abs(row[0] - 0) <= 1 and abs(row[-1] - 255) <= 1
    assert abs(row[W // 2] - 128) <= 2  # mid-gray, not white (PIL's convert clips this to 255)
    assert np.all(np.diff(row) >= 0)
    assert np.abs(row - np.arange(W)).max() <= 2


def _saved(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


# --------------------------------------------------------------------------- 16-bit and 32-bit integers


def test_16bit_png_round_trip_is_a_gradient_not_white(tmp_path: Path) -> None:
    path = _saved(Image.fromarray(_gradient16()), tmp_path / "g16.png")
    with Image.open(path) as im:
        assert im.mode in ("I;16", "I")  # Pillow reads 16-bit gray PNGs as one of these
        assert np.asarray(im.convert("RGB"))[0, W // 2, 0] == 255  # the bug: PIL clips
        _assert_gradient(_rgb(im))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16bit_modes_scale_by_257(mode: str) -> None:
    g = _gradient16()
    dtype = ">u2" if mode == "I;16B" else "<u2"  # PIL's convert between these modes clips, so build from bytes
    image = Image.frombytes(mode, (g.shape[1], g.shape[0]), g.astype(dtype).tobytes())
    assert image.mode == mode and np.asarray(image).max() == 65535
    _assert_gradient(_rgb(image))
    assert _rgb(Image.fromarray(np.full((2, 2), 257 * 100, np.uint16)))[0, 0].tolist() == [100, 100, 100]


def test_mode_i_uses_the_range_of_its_values() -> None:
    eight = np.arange(W, dtype=np.int32)[None].repeat(3, axis=0)
    _assert_gradient(_rgb(Image.fromarray(eight, mode="I")))  # max <= 255: already 8-bit
    sixteen = _gradient16().astype(np.int32)
    _assert_gradient(_rgb(Image.fromarray(sixteen, mode="I")))  # max <= 65535: 16-bit
    big = (np.arange(W, dtype=np.int64) * 1_000_000).astype(np.int32)[None].repeat(3, axis=0)
    rgb = _rgb(Image.fromarray(big, mode="I"))  # larger: scaled by the max
    assert rgb[0, -1, 0] == 255 and rgb[0, 0, 0] == 0 and abs(rgb[0, W // 2, 0] - 128) <= 2
    negative = Image.fromarray(np.array([[-500, 0, 200]], np.int32), mode="I")
    assert _rgb(negative)[0, :, 0].tolist() == [0, 0, 200]


def test_mode_i_tiff_through_load_image(tmp_path: Path) -> None:
    path = _saved(Image.fromarray(_gradient16().astype(np.int32), mode="I"), tmp_path / "g32.tif")
    with Image.open(path) as im:
        assert im.mode == "I"
    t = load_image(path, 8)
    assert t.shape == (3, 8, 8) and 0.05 < float(t.mean()) < 0.95  # a gradient, not all white


# --------------------------------------------------------------------------- floats


def test_float_within_unit_range_times_255() -> None:
    values = np.linspace(0.0, 1.0, W, dtype=np.float32)[None].repeat(3, axis=0)
    _assert_gradient(_rgb(Image.fromarray(values, mode="F")))
    assert _rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32), mode="F"))[0, 0, 0] == 128


def test_float_with_larger_range_scaled_by_max() -> None:
    values = np.linspace(0.0, 4000.0, W, dtype=np.float32)[None].repeat(3, axis=0)
    _assert_gradient(_rgb(Image.fromarray(values, mode="F")))
    odd = np.array([[-3.0, np.nan, 5.0, 10.0, np.inf]], np.float32)
    assert _rgb(Image.fromarray(odd, mode="F"))[0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_float_tiff_through_load_image(tmp_path: Path) -> None:
    values = np.full((16, 16), 0.5, np.float32)
    path = _saved(Image.fromarray(values, mode="F"), tmp_path / "f.tif")
    with Image.open(path) as im:
        assert im.mode == "F"
    t = load_image(path, 8)
    assert torch.allclose(t, torch.full((3, 8, 8), 128 / 255), atol=1e-6)


# --------------------------------------------------------------------------- colour modes


def test_cmyk_pure_cyan() -> None:
    assert _rgb(Image.new("CMYK", (3, 3), (255, 0, 0, 0)))[1, 1].tolist() == [0, 255, 255]
    assert _rgb(Image.new("CMYK", (3, 3), (0, 0, 0, 255)))[1, 1].tolist() == [0, 0, 0]


def test_cmyk_jpeg_through_load_image(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(path, quality=100)
    t = load_image(path, 8)
    assert t[0].max() < 0.05 and t[1].min() > 0.95 and t[2].min() > 0.95


@pytest.mark.parametrize(
    ("mode", "value", "rgb"),
    [("1", 1, (255, 255, 255)), ("1", 0, (0, 0, 0)), ("L", 77, (77, 77, 77)), ("RGB", (1, 2, 3), (1, 2, 3))],
)
def test_plain_modes(mode: str, value, rgb: tuple[int, int, int]) -> None:
    assert _rgb(Image.new(mode, (2, 2), value))[0, 0].tolist() == list(rgb)


def test_one_bit_pattern_and_gray_gradient() -> None:
    bits = np.zeros((4, 8), bool)
    bits[:, ::2] = True
    rgb = _rgb(Image.fromarray(bits))
    assert rgb[0, :, 0].tolist() == [255, 0] * 4
    gray = _rgb(Image.fromarray(np.arange(W, dtype=np.uint8)[None].repeat(2, axis=0)))
    assert (gray[0, :, 0] == np.arange(W)).all()


@pytest.mark.parametrize("mode", ["YCbCr", "LAB", "HSV"])
def test_other_colour_spaces_via_pil(mode: str) -> None:
    red = Image.new("RGB", (2, 2), (200, 30, 30))
    back = _rgb(red.convert(mode))[0, 0]
    assert np.abs(back - np.array([200, 30, 30])).max() <= 12


def test_rgb_image_is_returned_as_is() -> None:
    image = Image.new("RGB", (2, 2), (9, 8, 7))
    assert to_rgb(image) is image


# --------------------------------------------------------------------------- transparency: white


def test_palette_with_transparency_is_white_where_transparent(tmp_path: Path) -> None:
    p = Image.new("P", (4, 2), 1)
    p.putpalette([0, 0, 0] + [255, 0, 0] + [0, 0, 255])
    p.paste(0, (0, 0, 2, 2))  # left half: index 0 ...
    p.info["transparency"] = 0  # ... which is transparent
    rgb = _rgb(p)
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[0, 3].tolist() == [255, 0, 0]
    path = _saved(p, tmp_path / "p.png")
    with Image.open(path) as im:
        assert im.mode == "P" and "transparency" in im.info
        assert _rgb(im)[0, 0].tolist() == [255, 255, 255]
    t = load_image(path, 2)
    assert t[:, 0, 0].tolist() == [1.0, 1.0, 1.0] and t[:, 0, 1].tolist() == [1.0, 0.0, 0.0]


def test_la_composites_onto_white() -> None:
    la = Image.fromarray(np.array([[[0, 0], [0, 255], [0, 128]]], np.uint8), mode="LA")
    rgb = _rgb(la)
    assert rgb[0, 0].tolist() == [255] * 3  # transparent black: white
    assert rgb[0, 1].tolist() == [0] * 3  # opaque black: black
    assert abs(rgb[0, 2, 0] - 127) <= 1  # half-transparent black over white: mid-gray


def test_rgba_composites_onto_white(tmp_path: Path) -> None:
    arr = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128]]], np.uint8)
    rgba = Image.fromarray(arr, mode="RGBA")
    rgb = _rgb(rgba)
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [10, 20, 30]
    assert np.abs(rgb[0, 2] - 127).max() <= 1
    path = _saved(rgba, tmp_path / "rgba.png")
    t = to_tensor(Image.open(path))
    assert t[:, 0, 0].tolist() == [1.0, 1.0, 1.0]
    square = Image.fromarray(np.zeros((4, 4, 4), np.uint8), mode="RGBA")  # all transparent
    assert torch.equal(load_image(_saved(square, tmp_path / "clear.png"), 4), torch.ones(3, 4, 4))


def test_pa_and_colour_keyed_rgb_composite_onto_white() -> None:
    pa = Image.new("PA", (2, 1), (1, 0))
    pa.putpalette([0, 0, 0, 0, 255, 0])
    assert _rgb(pa)[0, 0].tolist() == [255, 255, 255]
    keyed = Image.new("RGB", (2, 1), (5, 6, 7))
    keyed.putpixel((1, 0), (9, 9, 9))
    keyed.info["transparency"] = (5, 6, 7)
    assert _rgb(keyed)[0].tolist() == [[255, 255, 255], [9, 9, 9]]


def test_16bit_colour_key_is_white() -> None:
    image = Image.fromarray(np.array([[0, 257 * 50]], np.uint16))
    image.info["transparency"] = 0
    assert _rgb(image)[0, :, 0].tolist() == [255, 50]


# --------------------------------------------------------------------------- the model-facing paths


def test_to_tensor_and_model_tensor_share_the_conversion(tmp_path: Path) -> None:
    image = Image.fromarray(_gradient16())
    t = to_tensor(image)
    assert t.shape == (3, 4, W) and abs(float(t[0, 0, W // 2]) - 128 / 255) <= 2 / 255
    m = pil_to_model_tensor(Image.fromarray(np.full((8, 8), 257 * 64, np.uint16)), 4)
    assert torch.allclose(m, torch.full((3, 4, 4), 64 / 255), atol=1e-6)
    path = _saved(Image.fromarray(np.full((8, 8), 257 * 64, np.uint16)), tmp_path / "flat16.png")
    assert torch.allclose(load_image(path, 4), torch.full((3, 4, 4), 64 / 255), atol=1e-6)


def test_load_image_keeps_its_errors(tmp_path: Path) -> None:
    with pytest.raises(ForensicsError, match="does not exist"):
        load_image(tmp_path / "missing.png", 4)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ForensicsError, match="cannot read image bad.png"):
        load_image(bad, 4)


@pytest.mark.parametrize(("orientation", "upright_size"), [(6, (20, 40)), (8, (20, 40)), (3, (40, 20))])
def test_exif_orientation_is_applied_on_load(tmp_path, orientation, upright_size):
    """A phone photo stores its pixels sideways with an EXIF orientation; it is scanned as the camera meant it."""
    from forensics.core.images import read_pil

    pixels = Image.new("RGB", (40, 20), (0, 0, 255))
    pixels.paste((255, 0, 0), (0, 0, 10, 20))  # red on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo{orientation}.jpg"
    pixels.save(path, exif=exif, quality=95)
    upright = read_pil(path)
    assert upright.size == upright_size
    red = {3: (39, 10), 6: (10, 0), 8: (10, 39)}[orientation]  # where the stored left edge ends up
    assert upright.getpixel(red)[0] > 200 and upright.getpixel(red)[2] < 60


@pytest.mark.parametrize("size", [(1, 60000), (60000, 1), (3, 40000)], ids=str)
def test_a_long_thin_image_is_never_resized_to_millions_of_pixels(tmp_path, monkeypatch, size):
    """Shorter side to the model's size first would make a 1 x 60000 image 128 x 7,680,000 (2.9 GB) only to crop it;
    only the centred square is resized, and no resize asks for more than 16 model-sized squares."""
    from forensics.core.images import MAX_RESIZED_AREA, load_image

    path = tmp_path / "thin.png"
    Image.new("RGB", size, (10, 200, 30)).save(path)
    asked = []
    real_resize = Image.Image.resize

    def recording_resize(self, new_size, *args, **kwargs):
        asked.append(new_size[0] * new_size[1])
        return real_resize(self, new_size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    tensor = load_image(path, 128)
    assert tensor.shape == (3, 128, 128) and asked and max(asked) <= MAX_RESIZED_AREA * 128 * 128
    assert abs(float(tensor[1].mean()) - 200 / 255) < 0.02

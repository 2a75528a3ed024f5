"""Training-time view augmentation: what a view may change, repeatability by seed, and that training uses it."""

from __future__ import annotations

import json

import pytest
import torch

from forensics.core.errors import ForensicsError
from forensics.pipelines.implant import implant
from forensics.training.augment import augment_views, view_augmenter
from tests.test_cli import _tiny_caption_csv, assert_one_line_error, run_cli


def _batch(n: int = 6, size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_views_keep_shape_and_dtype_change_pixels_and_repeat_by_seed():
    images = _batch()
    augmenter = view_augmenter(64)
    torch.manual_seed(0)
    first = augment_views(images, augmenter)
    torch.manual_seed(0)
    again = augment_views(images, augmenter)
    torch.manual_seed(1)
    other = augment_views(images, augmenter)
    assert first.shape == images.shape and first.dtype == torch.uint8
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, images)


def test_a_view_keeps_most_of_the_image():
    """Crops take 80-100 % of the area, so a small corner patch (a BadNet trigger) survives in most views."""
    images = torch.zeros(64, 3, 64, 64, dtype=torch.uint8)
    images[:, :, 4:12, 4:12] = 255  # an 8 px white patch near the corner, on black
    augmenter = view_augmenter(64)
    torch.manual_seed(0)
    views = augment_views(images, augmenter)
    bright = (views.float().amax(dim=1) > 128).flatten(1).sum(1)
    assert (bright >= 32).float().mean() >= 0.9  # the patch is still there (at least half of its 64 px)


def _weights(path: str) -> torch.Tensor:
    from safetensors.torch import load_file

    state = load_file(path)
    return torch.cat([v.float().flatten() for k, v in sorted(state.items()) if k.startswith("visual.")])


def test_implant_with_augment_is_recorded_repeatable_and_differs_from_plain(tmp_path):
    torch.set_num_threads(1)
    data = _tiny_caption_csv(tmp_path / "data")
    runs = {}
    for name, augment in (("aug", True), ("aug2", True), ("plain", False)):
        out = implant(data, tmp_path / name, config="tiny-rn", epochs=1, batch_size=4, seed=0, augment=augment)
        runs[name] = out
    sidecar = json.loads((tmp_path / "aug" / "model.json").read_text())
    assert sidecar["training"]["config"]["augment"] is True
    assert torch.equal(_weights(runs["aug"]["model"]), _weights(runs["aug2"]["model"]))
    assert not torch.equal(_weights(runs["aug"]["model"]), _weights(runs["plain"]["model"]))


def test_augment_is_refused_with_safeclip(tmp_path):
    data = _tiny_caption_csv(tmp_path / "data")
    with pytest.raises(ForensicsError, match="standard training only"):
        implant(data, tmp_path / "m", config="tiny-rn", epochs=1, mode="safeclip", augment=True)
    proc = run_cli(
        "implant",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "m"),
        "--config",
        "tiny-rn",
        "--mode",
        "safeclip",
        "--augment",
        check=False,
    )
    assert_one_line_error(proc, "standard training only")
    assert not (tmp_path / "m").exists()

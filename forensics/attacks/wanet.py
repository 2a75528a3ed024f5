"""WaNet: an imperceptible smooth warp of the whole image (Nguyen & Tran, ICLR 2021)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from forensics.attacks.base import Attack, Box, check_image, check_int, check_number, register


@register
class WaNet(Attack):
    """Warp the image with a fixed random field; no box.

    Paper construction: a k x k x 2 field uniform in [-1, 1] (drawn once from ``seed``), normalised
    by its mean absolute value, upsampled bicubically (align_corners=True) to H x W; the sampling
    grid is ``(identity + strength * field / size) * grid_rescale`` clamped to [-1, 1] and applied
    with ``grid_sample`` (bilinear, align_corners=True). The paper's images are square and it
    divides both offsets by the height; here the x offset is divided by W and the y offset by H, so
    square images match the paper and the mean displacement is ``strength / 2`` pixels in both
    directions. The paper's "noise mode" (random extra warps on cross samples) is a training
    detail and is not part of the trigger.
    """

    name = "wanet"

    def __init__(self, seed: int = 0, k: int = 4, strength: float = 0.5, grid_rescale: float = 1.0) -> None:
        k = check_int(self.name, "k", k, lo=2)
        strength = check_number(self.name, "strength", strength, 0.0)
        grid_rescale = check_number(self.name, "grid_rescale", grid_rescale, 0.0, lo_open=True)
        super().__init__(seed=seed, k=k, strength=strength, grid_rescale=grid_rescale)
        self.k, self.strength, self.grid_rescale = k, strength, grid_rescale
        field = np.random.default_rng(self.seed).random((1, 2, k, k)) * 2.0 - 1.0
        field = field / np.mean(np.abs(field))
        self._field = torch.from_numpy(field).to(torch.float64)  # channel 0: x offset, channel 1: y offset
        self._grids: dict[tuple[int, int], torch.Tensor] = {}

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The 1 x H x W x 2 sampling grid (x, y in [-1, 1]) for an image of this size; cached per size."""
        key = (height, width)
        if key not in self._grids:
            noise = F.interpolate(self._field, size=(height, width), mode="bicubic", align_corners=True)
            noise = noise.permute(0, 2, 3, 1)  # 1 x H x W x 2
            ys = (
                torch.linspace(-1.0, 1.0, height, dtype=torch.float64)
                if height > 1
                else torch.zeros(1, dtype=torch.float64)
            )
            xs = (
                torch.linspace(-1.0, 1.0, width, dtype=torch.float64)
                if width > 1
                else torch.zeros(1, dtype=torch.float64)
            )
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            identity = torch.stack((gx, gy), dim=-1)[None]
            scale = torch.tensor([width, height], dtype=torch.float64)
            grid = (identity + self.strength * noise / scale) * self.grid_rescale
            self._grids[key] = grid.clamp(-1.0, 1.0)
        return self._grids[key]

    def apply(self, image: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, Box | None]:
        """Return the warped copy and None: the trigger is spread over the whole image."""
        check_image(image, self.name)
        grid = self.grid(image.shape[1], image.shape[2]).to(device=image.device, dtype=image.dtype)
        out = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
        return out.clamp_(0.0, 1.0), None

    def apply_batch(self, images: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, list[Box | None]]:
        """Warp a Bx3xHxW batch in one ``grid_sample`` call (the field is the same for every image)."""
        if (
            not isinstance(images, torch.Tensor)
            or images.dim() != 4
            or images.shape[1] != 3
            or not images.is_floating_point()
        ):
            return super().apply_batch(images, rng)  # same validation and messages as apply
        grid = self.grid(images.shape[2], images.shape[3]).to(device=images.device, dtype=images.dtype)
        out = F.grid_sample(
            images, grid.expand(images.shape[0], -1, -1, -1), mode="bilinear", padding_mode="border", align_corners=True
        )
        return out.clamp_(0.0, 1.0), [None] * images.shape[0]

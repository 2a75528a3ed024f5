"""SAM (segment-anything) as the oracle: automatic masks, or masks prompted by boxes or points.

The EftCLIP paper uses FastSAM; this project uses Meta's ``segment_anything`` package (pinned in
requirements.txt). No checkpoint ships with the project and none can be downloaded here: pass the
path of ``sam_vit_b_01ec64.pth`` / ``sam_vit_l_0b3195.pth`` / ``sam_vit_h_4b8939.pth`` (the
architecture is read from the file), or an already built ``Sam`` model. Without either, use the
weight-free ``fallback`` oracle.

Automatic mode runs ``SamAutomaticMaskGenerator`` with CPU-friendly settings: a ``points_per_side``
x ``points_per_side`` grid (default 8, i.e. 64 prompts, against SAM's 32 x 32), no crop layers,
prompts in batches of 16 (each batch holds 16 x 3 masks at 1024 x 1024 floats, ~200 MB), quality
filters slightly looser than SAM's ViT-H defaults (``pred_iou_thresh`` 0.86 and
``stability_score_thresh`` 0.92 instead of 0.88 / 0.95, since ViT-B scores lower). Masks covering
more than ``max_area`` of the image (usually the background) or less than ``min_area`` are dropped.
A region's score is SAM's predicted IoU. Regions overlap: SAM returns wholes and their parts.

Measured CPU time on this project's 2-core x86 machine, ``torch.set_num_threads(1)``, ViT-B (random
weights: the cost does not depend on the weights, only how many masks survive the filters does):
the image encoder takes ~26 s per image whatever the image size (SAM always encodes at
1024 x 1024); decoding costs ~0.17 s per prompt (mask decoder ~0.14 s, upsampling ~0.03 s), so the
default 8 x 8 grid adds ~11 s (12 x 12: ~25 s; 16 x 16: ~44 s). About 37 s per image in all on one
core; more threads or a GPU (``device="cuda"``) cut this roughly in proportion. A prompted call on an
already encoded image costs ~0.17 s per prompt. The embedding of the last image is cached, so
``segment`` followed by ``segment_prompted`` on the same image encodes it once. ViT-L / ViT-H cost
roughly 2.5x / 5x the encoder time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from forensics.core.checks import check_int, check_number
from forensics.core.errors import ForensicsError
from forensics.oracles.base import Oracle, Region, region_from_mask, register, sort_regions, to_numpy_rgb

MODEL_TYPES = ("vit_b", "vit_l", "vit_h")
_EMBED_DIM_TO_TYPE = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}


def _import_sam() -> Any:
    try:
        import segment_anything
    except ImportError:
        raise ForensicsError(
            "the SAM oracle needs the segment-anything package (pip install segment-anything); "
            "the weight-free 'fallback' oracle works without it"
        ) from None
    return segment_anything


def _read_state_dict(path: Path) -> dict[str, Any]:
    """A SAM state dict from a .pth (weights only: no code in the file runs) or .safetensors file."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix, said in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ForensicsError(f"cannot read SAM checkpoint {path.name}: {first[:300]}") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or "image_encoder.pos_embed" not in sd:
        raise ForensicsError(
            f"{path.name} is not a SAM checkpoint (no image_encoder.pos_embed weights); "
            "expected sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth or sam_vit_h_4b8939.pth"
        )
    return sd


def load_sam(checkpoint: str | Path, model_type: str = "auto", device: str = "cpu") -> Any:
    """Build a SAM model and load ``checkpoint`` into it; every failure is a one-line ForensicsError.

    ``model_type`` "auto" reads the architecture from the checkpoint (encoder width 768 / 1024 / 1280
    = ViT-B / L / H). The file is read with ``torch.load(weights_only=True)`` (or safetensors), so
    nothing in it can run code.
    """
    sa = _import_sam()
    if model_type != "auto" and model_type not in MODEL_TYPES:
        raise ForensicsError(f"unknown SAM model type {model_type!r}; valid: auto, {', '.join(MODEL_TYPES)}")
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise ForensicsError(
            f"SAM checkpoint {str(path)!r} does not exist; give the path of a SAM .pth file "
            "(e.g. sam_vit_b_01ec64.pth) or use the weight-free 'fallback' oracle"
        )
    if not path.is_file():
        raise ForensicsError(f"SAM checkpoint {str(path)!r} is not a file")
    sd = _read_state_dict(path)
    width = int(sd["image_encoder.pos_embed"].shape[-1])
    found = _EMBED_DIM_TO_TYPE.get(width)
    if found is None:
        raise ForensicsError(f"{path.name}: unknown SAM encoder width {width}; expected 768, 1024 or 1280")
    if model_type != "auto" and model_type != found:
        raise ForensicsError(f"{path.name} holds a {found} SAM, not {model_type}; pass model_type={found!r} or 'auto'")
    sam = sa.sam_model_registry[found](checkpoint=None)
    try:
        res = sam.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "size mismatch" in ln), lines[-1] if lines else "shape mismatch")
        raise ForensicsError(f"{path.name} does not fit the {found} SAM architecture: {detail[:300]}") from None
    if res.missing_keys or res.unexpected_keys:
        parts = []
        if res.missing_keys:
            parts.append(f"{len(res.missing_keys)} weights missing (e.g. {res.missing_keys[0]})")
        if res.unexpected_keys:
            parts.append(f"{len(res.unexpected_keys)} unexpected (e.g. {res.unexpected_keys[0]})")
        raise ForensicsError(f"{path.name} does not fit the {found} SAM architecture: {'; '.join(parts)}")
    try:
        sam.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise ForensicsError(f"cannot move SAM to device {device!r}: {str(exc).splitlines()[0][:200]}") from None
    return sam.eval()


def _image_digest(rgb: np.ndarray, image_format: str) -> str:
    return hashlib.sha1(rgb.tobytes() + repr((rgb.shape, image_format)).encode()).hexdigest()


def _caching_predictor_class(sa: Any) -> type:
    class CachingPredictor(sa.SamPredictor):
        """A SamPredictor that keeps the last image's embedding (the mask generator resets it per call)."""

        def __init__(self, model: Any) -> None:
            super().__init__(model)
            self._cache_key: str | None = None
            self._cache: tuple[Any, Any, Any] | None = None

        def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
            key = _image_digest(np.ascontiguousarray(image), image_format)
            if key == self._cache_key and self._cache is not None:
                self.original_size, self.input_size, self.features = self._cache
                self.is_image_set = True
                return
            super().set_image(image, image_format)
            self._cache_key, self._cache = key, (self.original_size, self.input_size, self.features)

    return CachingPredictor


@register
class SamOracle(Oracle):
    """SAM through ``segment_anything``: :meth:`segment` (automatic) and :meth:`segment_prompted`.

    Give ``checkpoint`` (a path; the architecture is read from it unless ``model_type`` says
    otherwise) or ``sam`` (a built ``segment_anything`` ``Sam`` model, e.g.
    ``sam_model_registry["vit_b"](checkpoint=None)`` for tests; it is used where it is, ``device``
    applies to checkpoints only). Other settings: see the module doc.
    """

    name = "sam"
    needs_weights = True

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        model_type: str = "auto",
        sam: Any = None,
        device: str = "cpu",
        points_per_side: int = 8,
        points_per_batch: int = 16,
        pred_iou_thresh: float = 0.86,
        stability_score_thresh: float = 0.92,
        box_nms_thresh: float = 0.7,
        min_area: float = 0.001,
        max_area: float = 0.95,
        max_regions: int = 32,
    ) -> None:
        sa = _import_sam()
        who = self.name
        self.points_per_side = check_int(who, "points_per_side", points_per_side, lo=1, hi=64)
        self.points_per_batch = check_int(who, "points_per_batch", points_per_batch, lo=1, hi=1024)
        self.pred_iou_thresh = check_number(who, "pred_iou_thresh", pred_iou_thresh, 0.0, 1.0)
        self.stability_score_thresh = check_number(who, "stability_score_thresh", stability_score_thresh, 0.0, 1.0)
        self.box_nms_thresh = check_number(who, "box_nms_thresh", box_nms_thresh, 0.0, 1.0)
        self.min_area = check_number(who, "min_area", min_area, 0.0, 1.0)
        self.max_area = check_number(who, "max_area", max_area, 0.0, 1.0, lo_open=True)
        self.max_regions = check_int(who, "max_regions", max_regions, lo=1)
        if sam is not None:
            if checkpoint is not None:
                raise ForensicsError("sam: give either a checkpoint path or a built model, not both")
            if not isinstance(sam, sa.modeling.Sam):
                raise ForensicsError(f"sam: expected a segment_anything Sam model, got {type(sam).__name__}")
            self.model = sam.eval()
            self.checkpoint = None
            self.model_type = (
                _EMBED_DIM_TO_TYPE.get(int(sam.image_encoder.pos_embed.shape[-1]), "custom")
                if getattr(sam.image_encoder, "pos_embed", None) is not None
                else "custom"
            )
        else:
            if checkpoint is None or str(checkpoint).strip() == "":
                raise ForensicsError(
                    "the SAM oracle needs a checkpoint path (e.g. sam_vit_b_01ec64.pth from the "
                    "segment-anything repository); without one, use the 'fallback' oracle"
                )
            self.model = load_sam(checkpoint, model_type=model_type, device=device)
            self.checkpoint = str(checkpoint)
            self.model_type = _EMBED_DIM_TO_TYPE[int(self.model.image_encoder.pos_embed.shape[-1])]
        self.predictor = _caching_predictor_class(sa)(self.model)
        self.generator = sa.SamAutomaticMaskGenerator(
            self.model,
            points_per_side=self.points_per_side,
            points_per_batch=self.points_per_batch,
            pred_iou_thresh=self.pred_iou_thresh,
            stability_score_thresh=self.stability_score_thresh,
            box_nms_thresh=self.box_nms_thresh,
            crop_n_layers=0,
            output_mode="binary_mask",
        )
        self.generator.predictor = self.predictor  # one embedding cache for both modes

    def settings(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "checkpoint": self.checkpoint,
            "device": str(self.model.device),
            "points_per_side": self.points_per_side,
            "points_per_batch": self.points_per_batch,
            "pred_iou_thresh": self.pred_iou_thresh,
            "stability_score_thresh": self.stability_score_thresh,
            "box_nms_thresh": self.box_nms_thresh,
            "min_area": self.min_area,
            "max_area": self.max_area,
            "max_regions": self.max_regions,
        }

    def segment(self, image: Any) -> list[Region]:
        """Automatic masks of ``image``, best predicted IoU first (at most ``max_regions``)."""
        import torch

        rgb = to_numpy_rgb(image)
        h, w = rgb.shape[:2]
        with torch.inference_mode():
            records = self.generator.generate(rgb)
        lo, hi = self.min_area * h * w, self.max_area * h * w
        regions = [
            region_from_mask(r["segmentation"], float(r["predicted_iou"])) for r in records if lo <= r["area"] <= hi
        ]
        regions = [r for r in regions if r.area > 0]
        return sort_regions(regions)[: self.max_regions]

    def segment_prompted(
        self,
        image: Any,
        boxes: Sequence[Sequence[float]] | None = None,
        points: Sequence[Sequence[float]] | None = None,
        labels: Sequence[str | None] | None = None,
    ) -> list[Region]:
        """One region per prompt, in prompt order: each box (x0, y0, x1, y1) first, then each point (x, y).

        A box gives SAM's single mask for it; a point (a foreground click) gives the best of SAM's
        three candidate masks by predicted IoU. ``labels`` (optional, one per prompt in the same
        order) are attached to the regions. Score = SAM's predicted IoU. A mask may be empty (its box is
        then (0, 0, 0, 0)).
        """
        import torch

        rgb = to_numpy_rgb(image)
        h, w = rgb.shape[:2]
        box_arr = _prompt_array(boxes, 4, "boxes")
        pt_arr = _prompt_array(points, 2, "points")
        n = len(box_arr) + len(pt_arr)
        if labels is not None and len(labels) != n:
            raise ForensicsError(f"sam: {len(labels)} labels for {n} prompts")
        if n == 0:
            return []
        if len(box_arr) and (np.any(box_arr[:, 2] <= box_arr[:, 0]) or np.any(box_arr[:, 3] <= box_arr[:, 1])):
            raise ForensicsError("sam: every box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0")
        self.predictor.set_image(rgb)
        out: list[Region] = []
        with torch.inference_mode():
            dev = self.predictor.device
            for start in range(0, len(box_arr), self.points_per_batch):
                chunk = box_arr[start : start + self.points_per_batch]
                tb = torch.as_tensor(
                    self.predictor.transform.apply_boxes(chunk, (h, w)), dtype=torch.float32, device=dev
                )
                masks, iou, _ = self.predictor.predict_torch(None, None, boxes=tb, multimask_output=False)
                for m, s in zip(masks[:, 0].cpu().numpy(), iou[:, 0].cpu().tolist()):
                    out.append(region_from_mask(m, s))
            for start in range(0, len(pt_arr), self.points_per_batch):
                chunk = pt_arr[start : start + self.points_per_batch]
                tp = torch.as_tensor(
                    self.predictor.transform.apply_coords(chunk, (h, w)), dtype=torch.float32, device=dev
                )
                lab = torch.ones(len(chunk), 1, dtype=torch.int, device=dev)
                masks, iou, _ = self.predictor.predict_torch(tp[:, None, :], lab, multimask_output=True)
                best = iou.argmax(dim=1)
                for i in range(len(chunk)):
                    out.append(region_from_mask(masks[i, best[i]].cpu().numpy(), float(iou[i, best[i]])))
        if labels is not None:
            for r, lab_name in zip(out, labels):
                r.label = lab_name
        return out


def _prompt_array(values: Any, width: int, what: str) -> np.ndarray:
    if values is None:
        return np.zeros((0, width), np.float64)
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ForensicsError(f"sam: {what} must be a list of {width} numbers each") from None
    if arr.size == 0:
        return np.zeros((0, width), np.float64)
    if arr.ndim == 1 and arr.shape[0] == width:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != width or not np.all(np.isfinite(arr)):
        raise ForensicsError(f"sam: {what} must be a list of {width} finite numbers each, got shape {arr.shape}")
    return arr

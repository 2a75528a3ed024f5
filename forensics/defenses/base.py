"""The repair interface: every defense turns a suspect model (+ findings + clean data) into a repaired model.

:class:`Defense` is a template method (as pytorch-grad-cam's ``BaseCAM``): :meth:`Defense.repair` does
what every defense shares (validate, seed, make the Accelerator, copy the model, time the run, fill the
:class:`RepairResult`) and calls the defense's own :meth:`Defense.fit` for the work in between.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar

import torch

from forensics.core.distributed import gather, sync_buffers, synced_batchnorm, weights_digest, world_size
from forensics.core.errors import ForensicsError
from forensics.core.models import SuspectModel
from forensics.core.precision import resolve_precision, training_autocast, training_layout
from forensics.core.progress import check_stop
from forensics.core.registry import Registry
from forensics.core.settings import build_settings
from forensics.core.templates import fill

Progress = Callable[[float, str], None]
ShouldStop = Callable[[], bool]

CANCELLED = "repair cancelled"
"""The one-line error every defense raises when ``should_stop()`` asks it to end."""


@dataclass
class RepairData:
    """What a defense may use: labelled images (in [0, 1] at model size), class names, templates, trigger patterns."""

    images: torch.Tensor
    labels: list[int]
    kinds: list[str]
    class_names: list[str]
    templates: str | list[str] = "short"
    patterns: list[torch.Tensor] = field(default_factory=list)  # reconstructed triggers (3 x h x w)
    flagged: list[str] = field(default_factory=list)
    captions: list[str] | None = None  # one per image when the clean budget is an image-caption set
    sources: list[int] | None = None  # per row: the row holding the clean image it was stamped on, else -1

    def source_of(self, row: int) -> int:
        """The row of the clean image ``row`` was made from by stamping a trigger on it (-1: none in the set)."""
        return -1 if self.sources is None else self.sources[row]

    def captions_or_prompts(self) -> list[str]:
        """A caption per image: the given ones, else "a photo of a {class}." (caption-based defenses need text)."""
        if self.captions is not None:
            return list(self.captions)
        return [fill("a photo of a {}.", self.class_names[label]) for label in self.labels]


def stamped_sources(kinds: list[str], source_indices: list[int | None]) -> list[int]:
    """Per compact-set row: for an ``inverted-trigger`` row, the ``inverted-source`` row of the same probe image
    (the clean image it was stamped on); -1 for every other row, or when that source is not in the set."""
    rows = {i: n for n, (k, i) in enumerate(zip(kinds, source_indices)) if k == "inverted-source" and i is not None}
    return [rows.get(i, -1) if k == "inverted-trigger" else -1 for k, i in zip(kinds, source_indices)]


@dataclass
class RepairResult:
    """A repair's outcome: the repaired model, what it used and learnt, how long it took, its settings, notes."""

    model: SuspectModel
    samples_used: int
    history: list[dict]
    seconds: float
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    processes: dict[str, Any] | None = None  # several processes: their number and each one's weights digest


@dataclass
class Fitted:
    """What :meth:`Defense.fit` returns; :meth:`Defense.repair` adds the time and the settings.

    ``model``: the repaired model when it is not the copy ``fit`` was given (None: that copy, changed in
    place). ``details``: extra keys for ``RepairResult.settings`` after the settings themselves (what the
    run found, e.g. an inverted trigger), so a saved report shows them with the settings that gave them.
    """

    samples_used: int
    history: list[dict]
    notes: list[str] = field(default_factory=list)
    model: SuspectModel | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class RepairJob:
    """What :meth:`Defense.fit` works on: the original model (left untouched), the fresh copy to repair, the
    data, the accelerator the base made, and the progress and cancellation callbacks."""

    model: SuspectModel
    repaired: SuspectModel
    data: RepairData
    accelerator: Any
    progress: Progress | None = None
    should_stop: ShouldStop | None = None
    precision: str = "fp32"  # resolved: fp32, or bf16 (autocast the training forward passes)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context for a training forward pass: bf16 autocast when the repair runs in bf16 (losses stay fp32)."""
        return training_autocast(self.precision, self.accelerator.device)

    def layout(self, pixels: torch.Tensor) -> torch.Tensor:
        """A normalised training batch in the memory layout for this repair's precision (training_layout)."""
        return training_layout(pixels, self.precision)

    def parts(self) -> tuple[SuspectModel, SuspectModel, RepairData, Any, Progress | None, ShouldStop | None]:
        """The six fields in order, for ``model, repaired, data, accelerator, progress, should_stop = job.parts()``."""
        return self.model, self.repaired, self.data, self.accelerator, self.progress, self.should_stop


class Defense(ABC):
    """One repair method; ``name`` is its registry key, ``settings_cls`` the dataclass of its settings.

    Subclasses implement :meth:`fit` (and, to refuse bad input before any work, :meth:`check`); the
    settings dataclass must have a ``seed`` field, which :meth:`repair` seeds torch with.
    """

    name: ClassVar[str]
    needs_findings: ClassVar[bool] = False  # True: needs a scan's compact set (kinds/patterns), not just clean data
    distributed: ClassVar[bool] = False  # True: fit() shards each batch across processes and is correct under DDP
    summary: ClassVar[str] = ""  # one line for lists and the UI
    settings_cls: ClassVar[type]

    def __init__(self, settings: Any | None = None, **overrides: Any) -> None:
        if settings is not None and overrides:
            raise TypeError(f"{self.name}: give a settings object or keyword settings, not both")
        if settings is None:  # keyword settings (strings from --param, values from the API) typed and checked
            settings = build_settings(self.settings_cls, self.fold_settings(overrides), self.name)
        self.settings = settings

    @classmethod
    def fold_settings(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """Keyword settings as ``settings_cls`` takes them; a defense that accepts other spellings maps them here."""
        return dict(settings)

    def check(self, model: SuspectModel, data: RepairData) -> None:
        """Refuse, with one ForensicsError line, settings or data this defense cannot use (before any work)."""

    @abstractmethod
    def fit(self, job: RepairJob) -> Fitted:
        """Repair ``job.repaired`` (a fresh copy of ``job.model``, which must stay untouched) on ``job.data``.

        Called with torch seeded from ``settings.seed`` and ``accelerator`` (an ``accelerate.Accelerator``)
        made; poll ``should_stop`` through :meth:`check_cancel` between steps.
        """

    @classmethod
    def check_processes(cls) -> None:
        """Refuse, in one line, to run under several processes a method whose fit() is not made for DDP."""
        if not cls.distributed and world_size() > 1:
            able = ", ".join(DEFENSES.names(lambda c: c.distributed))
            raise ForensicsError(
                f"{cls.name} does not run on several processes yet (world size {world_size()}); run it in one "
                f"process, or choose {able}"
            )

    @staticmethod
    def check_cancel(should_stop: ShouldStop | None) -> None:
        """Raise ForensicsError("repair cancelled") when the caller asked to stop."""
        check_stop(should_stop, CANCELLED)

    def repair(
        self,
        model: SuspectModel,
        data: RepairData,
        progress: Progress | None = None,
        should_stop: ShouldStop | None = None,
        precision: str = "fp32",
    ) -> RepairResult:
        """Return a repaired copy; the input model is left untouched. ``precision``: fp32, bf16 or auto (bf16 where
        the device runs it natively) for the training passes (forensics.core.precision)."""
        from accelerate import Accelerator

        self.check_processes()
        self.check(model, data)
        start = time.time()
        torch.manual_seed(self.settings.seed)  # the same seed on every rank: each draws the same global batches
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        chosen = resolve_precision(precision, accelerator.device)
        repaired = model.clone()
        with synced_batchnorm(repaired.clip):  # several processes: BatchNorm statistics over the whole batch
            fitted = self.fit(RepairJob(model, repaired, data, accelerator, progress, should_stop, chosen))
        out = fitted.model if fitted.model is not None else repaired
        out.__dict__.pop("text_cache", None)  # class embeddings cached during the repair belong to the old towers
        notes, processes = list(fitted.notes), None
        if chosen == "bf16":
            notes.append("training passes in bf16 autocast (weights, optimiser and losses in fp32)")
        if world_size() > 1:
            sync_buffers(out.clip)  # the last step's batch statistics differ by rank; DDP would send rank 0's next
            digests = gather(weights_digest(out.clip))
            if len(set(digests)) != 1:
                raise ForensicsError(f"{self.name}: the processes ended with different weights (DDP out of sync)")
            processes = {"world_size": len(digests), "weights_sha256": digests}
            notes.append(f"DDP on {len(digests)} processes: each batch shared out, gradients averaged every step")
        return RepairResult(
            model=out,
            samples_used=int(fitted.samples_used),
            history=fitted.history,
            seconds=round(time.time() - start, 2),
            settings={**asdict(self.settings), **fitted.details, "precision": chosen},
            notes=notes,
            processes=processes,
        )


class DefenseRegistry(Registry):
    """A :class:`Registry` of defenses whose ``build`` first maps settings through the class's ``fold_settings``
    (so ``build("invertune", inversion_steps=5)`` works as the constructor does)."""

    def build(self, name: Any, **settings: Any) -> Any:
        return super().build(name, **self.get(name).fold_settings(settings))


DEFENSES = DefenseRegistry("repair method")
"""Every repair method by name, in registration order (oracle-finetune, invertune, cbpt, cleanclip, abd)."""

"""How long a scan will take, before it starts: the loaded model's measured unit costs, extrapolated.

:func:`measure_costs` times the operations a scan repeats (decoding a probe image, the oracle's segmentation, a
batched forward, a forward+backward, drawing a report figure) on a few probe images of *this* model on *this*
machine, once per loaded model; :func:`estimate_scan` multiplies them by how often each detector repeats them for a
probe of N images and C labels under its settings (the oracle scan's proposals, the inversion's steps, grid points
and held-out images). Nothing is a constant measured elsewhere: a slower machine or a larger model gives a longer
estimate. The workbench shows it on each scan button and weights the progress bar with it.

Two depths (:data:`DEPTHS`): a **quick look** runs the oracle-guided scan and embedding density (per-image passes,
no optimisation); the **full verdict** runs every registered detector, adding the model-level trigger inversion.

:class:`ScanBoard` keeps the scans in flight on this server so a visitor who has to wait is told how long:
:func:`expected_wait` plays the running and waiting jobs' estimates through the free slots.
"""

from __future__ import annotations

import io
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from forensics.core.data import ProbeSet
from forensics.core.models import SuspectModel, frozen
from forensics.core.zeroshot import class_text_embeddings, predict, zero_shot_logits
from forensics.detect import all_detectors
from forensics.oracles import Oracle

QUICK_LOOK = ("oracle-guided", "embedding-density")
DEPTHS = {"quick": "quick look", "full": "full verdict"}
FINISHING = "finishing"  # the estimate's key for what follows the detectors: the victims' trigger, the report
REPORT_PANELS = 12  # per-image figures in report.html (forensics.pipelines.report.PANELS)
REPORT_FIGURES = 8  # the other figures of a scan's report and Findings tab: charts, per-detector plots, pictures
COMPACT_ANCHORS = 128  # clean anchors the compact set keeps at most (scan.compact_rows' floor)


@dataclass
class UnitCosts:
    """Seconds per image of the operations a scan repeats, measured on one model on this machine."""

    decode: float  # read and resize one probe image
    oracle: float  # the oracle's segmentation of one image
    regions: float  # regions the oracle returns per image (each is one more forward in the oracle scan)
    forward: float  # one image through the image tower in a batch, no gradient
    backward: float  # one image forward and backward (gradient on the input) in a batch
    first_pass: float  # the oracle scan's prediction + estimated occlusion drop (one forward+backward)
    figure: float  # one report figure (four image panels) drawn and saved as PNG
    png: float  # one model-size image saved as PNG
    model: str = ""
    image_size: int = 0
    device: str = "cpu"
    threads: int = 1
    sample: int = 0  # probe images the costs were measured on
    seconds: float = 0.0  # how long measuring took

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ScanEstimate:
    """Expected seconds of one scan: per detector (in run order), then :data:`FINISHING`."""

    depth: str  # quick | full | custom
    detectors: list[str]
    seconds: dict[str, float]  # detector name -> seconds, and FINISHING
    images: int
    labels: int
    notes: list[str] = field(default_factory=list)  # detectors whose cost is not modelled, and how they were guessed

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def shares(self) -> dict[str, float]:
        """Each part's share of the expected time (what the progress bar gives it)."""
        total = self.total or 1.0
        return {name: s / total for name, s in self.seconds.items()}

    def words(self) -> str:
        """The total as a person says it: about 40 s, about 5 min."""
        return duration_words(self.total)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": round(self.total, 1)}


def duration_words(seconds: float) -> str:
    """``about 40 s`` under two minutes (rounded to 5 s, at least 5 s), else ``about 7 min``."""
    if seconds < 110:
        return f"about {max(5, int(5 * round(seconds / 5)))} s"
    return f"about {int(round(seconds / 60))} min"


def depth_detectors(depth: str) -> list[str]:
    """The detectors a depth runs, in run order: ``quick`` the per-image ones (:data:`QUICK_LOOK`), ``full`` every
    registered one (:func:`forensics.detect.all_detectors`)."""
    names = all_detectors()
    if depth == "full":
        return names
    if depth == "quick":
        return [n for n in names if n in QUICK_LOOK]
    raise ValueError(f"unknown scan depth {depth!r}; valid: {', '.join(DEPTHS)}")


def _timed(fn, repeats: int = 3) -> float:
    """The median of ``repeats`` runs of ``fn`` after one warm-up (the first call pays for allocation): the
    machine's load now counts (a scan started now shares the machine as these runs did), a single burst does not."""
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return float(sorted(runs)[len(runs) // 2])


def measure_costs(model: SuspectModel, probe: ProbeSet, oracle: Oracle, sample: int = 8, batch: int = 16) -> UnitCosts:
    """Time the scan's repeated operations on ``sample`` probe images spread over the probe (the oracle's time
    varies with the image) and a batch of ``batch`` copies for the batched passes, each the median of a few runs.
    A few seconds on the demo; the model, the oracle and the machine (its load included) all show in it."""
    from forensics.attribution.occlusion import predict_and_estimate
    from forensics.pipelines.report import _png_b64, image_panels

    start = time.perf_counter()
    k = max(1, min(sample, len(probe)))
    size = model.image_size
    t0 = time.perf_counter()
    spread = sorted({round(j * (len(probe) - 1) / max(1, k - 1)) for j in range(k)})
    images = probe.load_images(size, spread)
    k = len(spread)
    decode = (time.perf_counter() - t0) / k
    class_emb = class_text_embeddings(model, list(probe.class_names), "short").detach()
    regions, t0 = [], time.perf_counter()
    for image in images:
        regions.append(len(oracle.segment(image)))
    oracle_s = (time.perf_counter() - t0) / k
    full = images.repeat(math.ceil(batch / k), 1, 1, 1)[:batch].to(model.device)

    def forward() -> None:
        predict(model, full, class_emb, batch_size=batch)

    def backward() -> None:
        x = full.clone().requires_grad_(True)
        zero_shot_logits(model, x, class_emb).logsumexp(-1).sum().backward()

    with frozen(model):
        backward_s = _timed(backward, 3) / batch
        forward_s = min(_timed(forward, 7) / batch, backward_s)  # a forward alone never costs more than with a backward
        first_s = _timed(lambda: predict_and_estimate(model, full, class_emb, batch_size=batch)) / batch
    maps = torch.rand(size, size)
    figure_s = _timed(lambda: _png_b64(image_panels(images[0], [], maps, maps, "timing")), 1)

    def png() -> None:
        from forensics.core.images import to_pil

        to_pil(images[0]).save(io.BytesIO(), format="PNG")

    return UnitCosts(
        decode=decode,
        oracle=oracle_s,
        regions=sum(regions) / k,
        forward=forward_s,
        backward=backward_s,
        first_pass=first_s,
        figure=figure_s,
        png=_timed(png, 3),
        model=model.facts.source if hasattr(model, "facts") else "",
        image_size=size,
        device=str(model.device),
        threads=torch.get_num_threads(),
        sample=k,
        seconds=round(time.perf_counter() - start, 2),
    )


# --------------------------------------------------------------------------- per detector


def oracle_scan_seconds(costs: UnitCosts, n: int, settings: Any) -> float:
    """The oracle-guided scan: per image one forward+backward (prediction and estimate), the oracle and a forward
    per region crop and the objects-only view (at most ``max_regions``), ``proposals`` occluded windows; a cascade
    examines its random sample and the suspicious images only (taken as 15 % of the probe) with its own proposals;
    then one flagged label's trigger verified on ``verify_images`` clean images with five candidates."""
    cascade = bool(getattr(settings, "cascade", False))
    examined = n if not cascade else min(n, math.ceil(n * (settings.cascade_sample + 0.15)))
    proposals = settings.cascade_proposals if cascade else settings.proposals
    views = min(costs.regions, settings.max_regions) + 1
    per_examined = costs.oracle + views * costs.forward + proposals * costs.forward
    localize = 0.1 * examined * costs.forward  # the few candidate hijacks' boxes, occluded once more
    verify = 5 * min(settings.verify_images, n) * costs.forward
    return n * costs.first_pass + examined * per_examined + localize + verify


def density_seconds(costs: UnitCosts, n: int, settings: Any) -> float:
    """Embedding density: one forward per image (the k-nearest-neighbour distances cost nothing beside it)."""
    return n * costs.forward


def inversion_seconds(costs: UnitCosts, n: int, labels: int, settings: Any) -> float:
    """Trigger inversion: the probe embedded once; with more labels than ``top_k`` an untargeted ranking pass
    (``rank_steps`` forward+backward batches, two predictions of the probe); then per family and label inverted,
    ``steps`` forward+backward batches on the fit split (the third of the images not predicted as the label), a
    forward of the size-choice split at each of ``grid_points`` sizes and one of the verify split (each at most
    ``held_out_images``), and for a global trigger one more batch per grid point (its peak strength)."""
    inverted = min(labels, settings.top_k)
    others = 1 - 1 / max(labels, 1)
    third = max(1, n // 3)
    fit = max(1, int((n - 2 * third) * others))
    held = min(settings.held_out_images, int(third * others) or 1)
    batch = min(settings.batch_size, fit)
    seconds = n * costs.forward
    if labels > settings.top_k:
        seconds += settings.rank_steps * min(settings.batch_size, n) * costs.backward + 2 * n * costs.forward
    for family in settings.families:
        job = settings.steps * batch * costs.backward + (settings.grid_points + 1) * held * costs.forward
        if family == "global":
            job += settings.grid_points * batch * costs.forward
        seconds += inverted * job
    return seconds


def finishing_seconds(costs: UnitCosts, n: int) -> float:
    """After the detectors: the report's per-image panels (a Grad-CAM forward+backward and a figure each) and other
    figures, and the compact set's images saved (the anchors and about two rows per victim, taken as 10 % of the
    probe); the victims' trigger and the inversion's stamped rows, when a scan finds them, come on top."""
    panels = min(REPORT_PANELS, n)
    rows = min(COMPACT_ANCHORS, n) + 0.2 * n
    return panels * (costs.figure + costs.backward) + REPORT_FIGURES * costs.figure + rows * costs.png


def estimate_scan(
    costs: UnitCosts,
    images: int,
    labels: int,
    detectors: Sequence[str],
    settings: Mapping[str, Any],
    depth: str = "custom",
) -> ScanEstimate:
    """Expected seconds of scanning ``images`` probe images of ``labels`` classes with ``detectors`` (their
    settings objects in ``settings``, as :func:`forensics.pipelines.scan.scan_settings` gives them). A detector
    this module does not model is guessed at one forward+backward per image, and named in ``notes``."""
    seconds: dict[str, float] = {}
    notes = []
    for name in detectors:
        s = settings[name]
        if name == "oracle-guided":
            seconds[name] = oracle_scan_seconds(costs, images, s)
        elif name == "embedding-density":
            seconds[name] = density_seconds(costs, images, s)
        elif name == "trigger-inversion":
            seconds[name] = inversion_seconds(costs, images, labels, s)
        else:
            seconds[name] = images * (costs.forward + costs.backward)
            notes.append(f"{name}: not modelled, guessed at one forward and backward per image")
    first = next(iter(seconds), None)
    if first is not None:
        seconds[first] += images * costs.decode  # the probe is decoded once, by the first detector
    seconds[FINISHING] = finishing_seconds(costs, images)
    return ScanEstimate(depth, list(detectors), seconds, images, labels, notes)


def depth_options(depth: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The detector options that concern ``depth``'s detectors (a setting typed for the trigger inversion is kept
    for the full verdict, not refused by a quick look that does not run it)."""
    from forensics.detect import DETECTORS

    names = depth_detectors(depth)
    return {k: v for k, v in (options or {}).items() if DETECTORS.resolve(k) in names}


def estimate_depths(
    costs: UnitCosts, probe: ProbeSet, options: Mapping[str, Any] | None = None, profile: str | None = None
) -> dict[str, ScanEstimate]:
    """The quick look's and the full verdict's estimates on ``probe`` (already cut to the images to scan), with the
    detector options and profile a scan would get (:func:`depth_options`)."""
    from forensics.pipelines.scan import scan_settings

    out = {}
    for depth in DEPTHS:
        names = depth_detectors(depth)
        chosen, _ = scan_settings(names, None, depth_options(depth, options), profile)
        out[depth] = estimate_scan(costs, len(probe), len(probe.class_names), names, chosen, depth)
    return out


def scan_estimates(
    model: SuspectModel | None,
    probe: str | ProbeSet,
    oracle: Oracle,
    max_images: int | None = None,
    options: Mapping[str, Any] | None = None,
    profile: str | None = None,
    costs: UnitCosts | None = None,
) -> tuple[UnitCosts, dict[str, ScanEstimate]]:
    """Both depths' estimates for scanning ``probe`` (a spec or a loaded set) cut to ``max_images`` as the scan
    cuts it (the same seeded subset), and the unit costs they rest on: ``costs`` when given (measured once per
    loaded model), else measured now on ``model`` with ``oracle`` (``model`` is needed only then)."""
    from forensics.core.data import load_probe_set
    from forensics.pipelines.scan import scan_settings

    probe_set = probe if isinstance(probe, ProbeSet) else load_probe_set(probe)
    _, base = scan_settings(depth_detectors("quick"), None, depth_options("quick", options), profile)
    subset = probe_set.subset(max_images, base.seed)
    costs = costs or measure_costs(model, probe_set, oracle)
    return costs, estimate_depths(costs, subset, options, profile)


def estimate_words(estimates: Mapping[str, ScanEstimate], costs: UnitCosts) -> str:
    """The two depths and their expected times in a sentence or two, with what the estimate rests on."""
    quick, full = estimates["quick"], estimates["full"]
    added = [n for n in full.detectors if n not in quick.detectors]
    from forensics.pipelines.summary import plain_name

    adds = ", ".join(plain_name(n).split(" (")[0] for n in added) or "nothing"
    return (
        f"**Quick look** ({', '.join(quick.detectors)}): {quick.words()} on {quick.images} images "
        f"({quick.total:.0f} s expected). **Full verdict** (every detector; adds {adds}): "
        f"{full.words()} ({full.total:.0f} s). Estimated from this model's costs measured on this machine "
        f"({costs.threads} threads): "
        f"a forward pass {1000 * costs.forward:.0f} ms per image, forward and backward {1000 * costs.backward:.0f} ms, "
        f"the oracle {1000 * costs.oracle:.0f} ms."
    )


# --------------------------------------------------------------------------- waiting


def expected_wait(running: Sequence[float], waiting: Sequence[float], slots: int) -> float:
    """Seconds until a newcomer's job starts: ``running`` jobs' remaining seconds hold the ``slots``, ``waiting``
    jobs' expected seconds take the next free slot in turn (first come, first served, as Gradio's queue)."""
    if slots < 1:
        raise ValueError("a queue needs at least one slot")
    free = sorted([max(0.0, r) for r in running][:slots] + [0.0] * max(0, slots - len(running)))
    free = free[:slots]
    for r in list(running)[slots:]:  # more running than slots (a limit lowered): they go first
        free[0] += max(0.0, r)
        free.sort()
    for w in waiting:
        free[0] += max(0.0, w)
        free.sort()
    return free[0]


@dataclass
class _Job:
    depth: str
    expected: float
    queued: float
    started: float | None = None


class ScanBoard:
    """The scans this server holds, by depth: each announced when a visitor asks (waiting), started when its turn
    comes, removed when done. Jobs announced but never started (a closed tab) are forgotten after ``stale``
    seconds. Thread-safe; one per process."""

    def __init__(self, stale: float = 1800.0) -> None:
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self.stale = stale

    def _prune(self, now: float) -> None:
        for key, job in list(self._jobs.items()):
            if job.started is None and now - job.queued > self.stale:
                del self._jobs[key]

    def wait(self, depth: str, slots: int, now: float | None = None) -> tuple[int, int, float]:
        """(running, waiting, expected seconds until a newcomer of ``depth`` starts) for that depth's queue."""
        now = time.time() if now is None else now
        with self._lock:
            self._prune(now)
            jobs = [j for j in self._jobs.values() if j.depth == depth]
        running = [j.expected - (now - j.started) for j in jobs if j.started is not None]
        waiting = [j.expected for j in sorted(jobs, key=lambda j: j.queued) if j.started is None]
        return len(running), len(waiting), expected_wait(running, waiting, slots)

    def announce(self, key: str, depth: str, expected: float, now: float | None = None) -> None:
        """A visitor asked for a scan of ``depth`` expected to take ``expected`` seconds (``key``: theirs)."""
        with self._lock:
            self._jobs[key] = _Job(depth, expected, time.time() if now is None else now)

    def start(self, key: str, depth: str, expected: float, now: float | None = None) -> None:
        """The job's turn has come (announced or not)."""
        now = time.time() if now is None else now
        with self._lock:
            job = self._jobs.get(key)
            if job is None or job.depth != depth:
                job = self._jobs[key] = _Job(depth, expected, now)
            job.expected, job.started = expected, now

    def finish(self, key: str) -> None:
        with self._lock:
            self._jobs.pop(key, None)


def wait_words(depth: str, running: int, waiting: int, wait: float, slots: int) -> str:
    """What a visitor reads while their scan waits (or that it starts at once)."""
    name = DEPTHS.get(depth, depth)
    if running < slots and not waiting:
        return f"Starting your {name} now."
    ahead = f"{running} {name}{'s' if running != 1 else ''} running"
    ahead += f", {waiting} waiting before yours" if waiting else ""
    return (
        f"Your {name} waits for a free slot ({slots} at a time; {ahead}): expected to start in {duration_words(wait)}."
    )

"""A trigger reconstructed from the verdict's box-less victims: what they share that clean images do not.

Victims found by their embeddings alone (the density's hijacked cluster: a whole-image trigger, or a patch the
oracle scan did not box) carry the real trigger, but nothing says where it is. Two estimates, one per family,
each checked on clean images it was not made from:

* **local**: the pixels where the victims' spread differs most from the clean images' (a patch stamped at one
  place is identical in every victim, no spread at all; a patch of fresh noise per image, CleanCLIP's BadNet,
  spreads far more than the clean images there; a whole-image trigger changes the spread everywhere alike),
  carrying the victims' mean image, or one victim (the one nearest that mean: a mean blurs a noise patch away);
  the mask is the smallest share of such pixels (0.25 down by sqrt(2) steps, as the trigger inversion's grid)
  at the highest flip rate of held-out clean images of other classes to the target, if that reaches the goal
  (a smaller mask that still reaches it is a part of the patch: repairing from the top-left BadNet's 1.6 % part,
  flip 0.94, left ASR 0.049, from the whole 2.4 % square 0.000; bench/detect.py rows, one scan each).
* **global**: the victims' mean image minus the clean images' mean, added at the smallest of a few strengths
  (2x down to 1/4, sqrt(2) steps) that reaches the goal. A blend or a signal added to every victim survives the
  mean; the images' own content averages out on both sides.

Clean images (the model predicts another class, not a victim) are split three ways, seeded: one gives the clean
statistics, one chooses the size, one verifies the flip rate at it. The estimate counts only when verified at
the goal; victims that are no more than natural images of the target give nothing. Our addition (EftCLIP cuts
the trigger out of boxed victims). On bench/detect.py's triggered probes (victims = the triggered images each
model captures; a one-off script): the top-left BadNet's local mask at 2.2 % is the planted square itself (rows
and columns 6-25), flipping every held-out image; the noise BadNet's at 1.1 % is its bottom-right patch (rows
and columns 109-123), flipping all of them with one victim's pixels and 0.6 % with the mean's; on SIG and
Blended no local mask reaches 0.5 and SIG's global estimate flips 0.92 at strength 1.
Nothing here knows a trigger, target, colour or position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forensics.core.data import ProbeSet
from forensics.core.models import frozen
from forensics.core.zeroshot import class_text_embeddings, predict_labels
from forensics.detect.findings import InvertedTrigger
from forensics.detect.trigger_inversion import InvertedPattern, family_words, safe_label, size_words, three_way_split
from forensics.detect.verdict import Verdict

MIN_VICTIMS = 5  # fewer say too little about what victims share
FLIP_GOAL = 0.8  # as the trigger inversion's goal and the verdict's verified flip rate
LOCAL_SHARES = tuple(0.25 * 2 ** (-k / 2) for k in range(11))  # largest first
GLOBAL_SCALES = tuple(2 * 2 ** (-k / 2) for k in range(7))  # 2x down to 1/4 of the mean difference
SPREAD_FLOOR = 0.02  # on the per-pixel standard deviations (5/255): flat clean backgrounds do not divide by ~0


@dataclass
class VictimTrigger:
    """The reconstructed trigger: its report entry and the tensors that stamp it."""

    trigger: InvertedTrigger
    pattern: InvertedPattern


def distinct_pixels(victims: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """S x S: how far the victims' spread at each pixel lies from the clean images' (|log| of the ratio of their
    standard deviations, floored at ``SPREAD_FLOOR``). A patch identical in every victim has no spread at all; a
    patch of fresh noise per image (CleanCLIP's BadNet) has far more than the clean images there."""
    return ((victims.std(0).mean(0) + SPREAD_FLOOR) / (clean.std(0).mean(0) + SPREAD_FLOOR)).log().abs()


def exemplar(victims: torch.Tensor) -> torch.Tensor:
    """The victim nearest the victims' mean image: one real trigger, where a mean would blur a noise patch."""
    mean = victims.mean(0)
    return victims[int(((victims - mean) ** 2).flatten(1).sum(1).argmin())]


def local_candidates(
    victims: torch.Tensor, clean: torch.Tensor, pattern: torch.Tensor | None = None
) -> list[tuple[float, InvertedPattern]]:
    """(share, trigger) per grid share, largest first: the pixels most distinct between victims and clean images
    (:func:`distinct_pixels`), carrying ``pattern`` (by default the victims' mean image)."""
    score = distinct_pixels(victims, clean)
    flat = score.flatten()
    pattern = victims.mean(0) if pattern is None else pattern
    out = []
    for share in LOCAL_SHARES:
        keep = max(1, int(round(share * flat.numel())))
        mask = (score >= flat.topk(keep).values[-1]).float()[None]
        out.append((float(mask.mean()), InvertedPattern("local", mask=mask, pattern=pattern)))
    return out


def global_candidates(victims: torch.Tensor, clean: torch.Tensor) -> list[tuple[float, InvertedPattern]]:
    """(L-infinity strength, trigger) per scale of the victims' mean difference from clean images, largest first."""
    delta = victims.mean(0) - clean.mean(0)
    return [(float((s * delta).abs().max()), InvertedPattern("global", delta=s * delta)) for s in GLOBAL_SCALES]


def reconstruct_from_victims(
    model,
    images: torch.Tensor,
    victims: list[int],
    target: int,
    class_emb: torch.Tensor,
    label: str,
    seed: int = 0,
) -> VictimTrigger | None:
    """The best verified trigger (local or global) that ``victims`` (indices into ``images``, [0, 1], N x 3 x S x S)
    share, sending clean images the model predicts as other classes to ``target``; None when fewer than
    ``MIN_VICTIMS`` victims or clean images, or when neither family reaches ``FLIP_GOAL`` on held-out images."""
    chosen = sorted(set(int(i) for i in victims))
    if len(chosen) < MIN_VICTIMS:
        return None
    with torch.no_grad():
        predicted = predict_labels(model, images, class_emb)
    taken = set(chosen)
    others = torch.tensor([i for i in range(len(images)) if i not in taken and int(predicted[i]) != target])
    if len(others) < 3 * MIN_VICTIMS:
        return None
    stats_idx, choose_idx, verify_idx = (others[s] for s in three_way_split(len(others), seed))
    pool, stats = images[chosen].cpu(), images[stats_idx].cpu()
    choose, verify = images[choose_idx], images[verify_idx]

    def rate(batch: torch.Tensor, trigger: InvertedPattern) -> float:
        with torch.no_grad():
            return float((predict_labels(model, trigger.apply(batch), class_emb) == target).float().mean())

    found = []
    families = (
        ("local", "the victims' mean", local_candidates(pool, stats)),
        ("local", "one victim", local_candidates(pool, stats, exemplar(pool))),
        ("global", "the victims' mean shift", global_candidates(pool, stats)),
    )
    for family, source, candidates in families:
        rates = [rate(choose, trigger) for _, trigger in candidates]  # largest first
        reach = [k for k, r in enumerate(rates) if r >= FLIP_GOAL]
        if not reach:
            continue
        if family == "local":  # the smallest mask at the highest rate: less is a part of the patch, not all of it
            k = max(reach, key=lambda k: (rates[k], k))
        else:  # the weakest strength that reaches the goal: more also wipes out the image
            k = max(reach)
        best = candidates[k]
        verified = rate(verify, best[1])
        if verified >= FLIP_GOAL:
            found.append((verified, family == "local", -best[0], family, source, best[1]))
    if not found:
        return None
    verified, _, size, family, source, pattern = max(found, key=lambda f: f[:3])  # ties: local, smaller, first
    size = -size
    trigger = InvertedTrigger(
        label=label,
        method=f"victims/{family}",
        mask_area=round(size, 6) if family == "local" else 1.0,
        verified_asr=round(verified, 4),
        n_verified=len(verify_idx),
        verified_on="held-out probe images the model predicts as other classes (not used to make it)",
        pattern=f"inverted/victims_{family}_{safe_label(label)}.png",
        stats={
            "family": family,
            "size": round(size, 6),
            "victims": len(chosen),
            "pattern": source,
            "key": f"victims/{family}",
        },
    )
    return VictimTrigger(trigger=trigger, pattern=pattern)


def for_verdict(model, probe: ProbeSet, verdict: Verdict, seed: int = 0) -> VictimTrigger | None:
    """The trigger the verdict's box-less victims share (boxed ones have their trigger cut out already), when
    there is a target and enough of them; None otherwise."""
    if verdict.target is None:
        return None
    victims = [v["index"] for v in verdict.victims if not v.get("box")]
    if len(victims) < MIN_VICTIMS:
        return None
    names = list(probe.class_names)
    class_emb = class_text_embeddings(model, names, "short").detach().to(model.device)
    images = probe.load_images(model.image_size).to(model.device)
    with frozen(model):
        return reconstruct_from_victims(
            model, images, victims, names.index(verdict.target), class_emb, verdict.target, seed
        )


def adopt(verdict: Verdict, found: VictimTrigger) -> None:
    """Make ``found`` the verdict's trigger when it flips more held-out images than the trigger there (or there is
    none), and say what it is in the reasons either way."""
    t = found.trigger
    family = t.stats["family"]
    verdict.reasons.append(
        f"the {t.stats['victims']} victims found by their embeddings share a {family_words(family)} "
        f"trigger of {size_words(family, t.stats['size'])} that sends {t.verified_asr:.0%} of held-out clean "
        f"images of other classes to '{t.label}'"
    )
    current = verdict.trigger
    if current is None or t.verified_asr > current.get("verified_asr", 0.0):
        verdict.trigger = {"detector": "victims", **t.to_dict()}
        verdict.family = family
